"""The exception hierarchy: one base class, one subclass per pipeline stage.

Every message says *where*: the file and line of a .cfg, the IR node, the plan
field, the device. The CLI prints ``str(err)`` as one line and exits non-zero.

Errors that devices report too are the runtime's (``tilec_runtime.errors``,
which cannot import the planner); the CLI catches those as well. One of
them is re-exported here: :class:`WeightsError` (a weights file does not fit
the model), raised by the runtime's .npz loader and the planner's darknet
reader alike.
"""
from tilec_runtime.errors import WeightsError  # noqa: F401 (one class for both sides)


class TilecError(Exception):
    """Base class of every error tilec reports to a user."""


class ConfigError(TilecError):
    """A model description (.cfg or builder call) is malformed."""

    def __init__(self, message, path=None, line=None, section=None):
        self.path, self.line, self.section = path, line, section
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        if section is not None:
            where += f"[{section}]: "
        super().__init__(where + message)


class IRError(TilecError):
    """The graph IR is inconsistent; the message names the failing node."""


class PlanError(TilecError):
    """A plan is malformed, or cannot be made for the requested split."""
