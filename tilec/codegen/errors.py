"""The code generator's error (a stage subclass of ``TilecError``)."""
from tilec.errors import TilecError


class CodegenError(TilecError):
    """Kernel templates cannot be rendered, lowered or compiled."""
