"""The build cache: a directory of generated sources and built modules.

Default ``~/.cache/tilec`` (``TILEC_CACHE`` overrides it). Entries are keyed
by a hash of everything that changes what is built, so an entry is never
stale and a second build of the same thing builds nothing. Writers take a
per-entry file lock (two workers on one device may build the same kernels at
the same time) and publish with an atomic rename (``tilec_runtime.files``),
so a reader never sees a half-written file. Nothing here writes outside the cache directory.
"""
import contextlib
import errno
import hashlib
import os
import time

CACHE_ENV = "TILEC_CACHE"


def cache_dir():
    """The cache root (created on first use)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "tilec")
    os.makedirs(root, exist_ok=True)
    return root


def digest(*parts):
    """SHA-256 hex digest of text parts, unambiguously separated."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path, timeout=600.0):
    """Exclusive lock on ``path`` (created if missing) across processes.

    fcntl's advisory lock is released by the kernel if the holder dies, so a
    crashed build never blocks the next one.
    """
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}: still locked after {timeout:.0f} s (another build hung?)") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def entry_dir(kind, key):
    """``<cache>/<kind>/<key>``, created."""
    path = os.path.join(cache_dir(), kind, key)
    os.makedirs(path, exist_ok=True)
    return path
