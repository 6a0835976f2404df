"""Files written atomically: complete or absent, never half-written.

Every file tilec writes for someone else to read (plans, weights,
checkpoints, profiles, the build cache's sources and modules, a dataset
directory) goes through here: written under a temporary name beside the
target (same directory, so the rename cannot cross file systems), flushed
and fsynced, then renamed over the target; on an error the temporary is
removed and the target keeps its old contents. ``sync_dir`` also fsyncs the
directory, so that the rename itself survives a power cut (checkpoints).
"""
import contextlib
import json
import os
import shutil
import threading


def _tmp_name(path):
    # pid and thread: two workers, or two threads of one, never share a temporary
    return f"{path}.tmp{os.getpid()}-{threading.get_ident()}"


def _discard(tmp):
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.lexists(tmp):
        os.unlink(tmp)


def _sync_dir(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, sync_dir=False):
    """A temporary path beside ``path`` for a writer that needs a name (a
    compiler's ``-o``, a directory built file by file); a file there is
    fsynced and renamed over ``path`` when the block ends without an error;
    whatever is there is removed otherwise."""
    path = os.fspath(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        if os.path.isfile(tmp):
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        _discard(tmp)
    if sync_dir:
        _sync_dir(path)


@contextlib.contextmanager
def atomic_open(path, mode="wb", sync_dir=False):
    """An open file (``mode`` "wb" or "w") that replaces ``path`` when the
    block ends without an error."""
    with atomic_path(path, sync_dir) as tmp:
        with open(tmp, mode) as f:
            yield f


def atomic_write(path, data, sync_dir=False):
    """Write bytes or text to ``path`` atomically."""
    with atomic_open(path, "wb", sync_dir) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def atomic_json(path, obj, **dumps):
    """Write ``obj`` as JSON (``json.dumps`` options) and a newline, atomically."""
    atomic_write(path, json.dumps(obj, **dumps) + "\n")


def atomic_savez(path, arrays, sync_dir=False):
    """Write ``arrays`` (name -> array) as an .npz atomically (``path`` as
    given: numpy adds no suffix to an open file)."""
    import numpy as np
    with atomic_open(path, "wb", sync_dir) as f:
        np.savez(f, **arrays)
