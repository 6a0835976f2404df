"""Errors the runtime reports. The planner's ``tilec.errors`` is not
imported here (a device may not have the planner); the CLI catches both."""
import math


class RuntimeFault(Exception):
    """Base class of every error the runtime reports to a user."""


class ProgramError(RuntimeFault):
    """A program (from a plan file or the network) is malformed."""


class WeightsError(RuntimeFault):
    """A weights file does not match the model; the message names the key."""


class DataError(RuntimeFault):
    """A data file does not match the model; the message names the array."""


class Diverged(RuntimeFault):
    """The loss is not finite: training cannot go on."""


def check_loss(step, loss):
    """Raise :class:`Diverged` naming ``step`` (0-based; said 1-based, as the
    progress line counts) when ``loss`` is not finite (or its part, on a
    worker that computes one); the one check of the training loop and of
    the workers."""
    if loss is not None and not math.isfinite(loss):
        raise Diverged(f"step {step + 1}: the loss diverged ({float(loss)}): lower --lr")
