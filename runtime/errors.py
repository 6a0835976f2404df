"""Errors the runtime reports. The planner's ``tilec.errors`` is not
imported here (a device may not have the planner); the CLI catches both."""


class RuntimeFault(Exception):
    """Base class of every error the runtime reports to a user."""


class ProgramError(RuntimeFault):
    """A program (from a plan file or the network) is malformed."""


class WeightsError(RuntimeFault):
    """A weights file does not match the model; the message names the key."""


class DataError(RuntimeFault):
    """A data file does not match the model; the message names the array."""
