"""Inspection: human-readable views of the IR and, later, of plans."""
