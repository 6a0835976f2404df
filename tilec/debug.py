"""See what the compiler did: ``TILEC_DEBUG``, like tinygrad's ``DEBUG``.

On stderr, nothing at level 0 (unset):

- ``TILEC_DEBUG=1``: every pipeline stage as it ends, with its wall time
  and what it made: frontend, ir, analysis, cost (+ candidates), solver,
  plan, codegen render / cythonize / build (each "cached" when the build
  cache had it).
- ``TILEC_DEBUG=2``: also what the stages produced: the regions of every
  tile of every group, every rank's schedule (its ops in order) and the
  CP-SAT search log.

Any other non-empty value (``yes``) is level 1.
"""
import contextlib
import os
import sys
import time

ENV = "TILEC_DEBUG"
PREFIX = "[tilec]"


def level():
    """The level ``TILEC_DEBUG`` asks for (read on every call: tests and
    callers change it)."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        return 1


def _write(text):
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()


class Stage:
    """What a timed block tells its end line: ``detail`` (text after the time)."""

    def __init__(self, name):
        self.name, self.detail, self.seconds = name, "", None


@contextlib.contextmanager
def stage(name):
    """Time the block; at level 1 and up print ``[tilec] NAME  S s  DETAIL``
    when it ends (``DETAIL``: what the block set on the yielded
    :class:`Stage`). A block that raises prints nothing: its error speaks."""
    st = Stage(name)
    t0 = time.perf_counter()
    yield st
    st.seconds = time.perf_counter() - t0
    if level() >= 1:
        _write(f"{PREFIX} {name:<18} {st.seconds:8.3f} s  {st.detail}".rstrip())


def dump(min_level, text):
    """Print ``text`` (or what a callable returns: computed only when shown)
    at level ``min_level`` and up, each line prefixed."""
    if level() < min_level:
        return
    text = text() if callable(text) else text
    _write("\n".join(f"{PREFIX}   {line}" for line in str(text).splitlines()))
