"""The graph IR (the only stage besides ``analysis`` that imports networkx).

- :mod:`tilec.ir.graph`: :class:`Graph`, layers as nodes, shape inference,
  verification, conversion to the runtime's program.
- :mod:`tilec.ir.stats`: parameters, FLOPs and activation bytes per layer.
"""
from tilec.ir.graph import INPUT, Graph
from tilec.ir.stats import LayerStats, Totals, layer_stats, totals

__all__ = ["INPUT", "Graph", "LayerStats", "Totals", "layer_stats", "totals"]
