"""tilec: a compiler for fused-tile CNN training on clusters of edge devices.

Importing this package is cheap: the heavy stages (networkx IR, OR-Tools
solver, Jinja2 codegen) are imported only by the modules that need them.
"""
from tilec.errors import TilecError

__version__ = "0.1.0"
__all__ = ["TilecError", "__version__"]
