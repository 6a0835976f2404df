"""Reading .npz archives and .npy arrays from users and peers: data only, never code."""
import zipfile

import numpy as np

_UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile)


def load_npz(path, error, what):
    """All arrays of the .npz archive at ``path`` as a dict.

    Anything that is not a readable .npz archive (missing, empty, truncated,
    a bare .npy, pickled objects) raises ``error`` with a one-line message
    naming the file. ``allow_pickle=False``: an archive is data, never code.
    """
    try:
        data = np.load(path, allow_pickle=False)
    except _UNREADABLE as exc:
        raise error(f"{path}: cannot read {what}: {exc or type(exc).__name__}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise error(f"{path}: cannot read {what}: not an .npz archive")
    try:
        with data:
            return {k: data[k] for k in data.files}
    except _UNREADABLE as exc:
        raise error(f"{path}: cannot read {what}: {exc or type(exc).__name__}") from None


def load_npy(path, error, what):
    """The array in the .npy file at ``path``; like :func:`load_npz`, anything
    else (missing, truncated, an .npz archive, pickled objects) raises
    ``error`` naming the file."""
    try:
        data = np.load(path, allow_pickle=False)
    except _UNREADABLE as exc:
        raise error(f"{path}: cannot read {what}: {exc or type(exc).__name__}") from None
    if not isinstance(data, np.ndarray):
        data.close()
        raise error(f"{path}: cannot read {what}: not a .npy array")
    return data
