"""A data set's images in a file every local worker reads its own pieces from.

Local workers share the launcher's machine, so its disk: rather than send
every step's pieces of the images over loopback (the launcher framing and
authenticating them, each worker's reader taking and checking them, all on
the cores the workers compute on), the launcher writes the images once as an
``.npy`` file and each worker reads the rows of its pieces straight into
them. The launcher still sends each step's labels or targets to rank 0, and
every other rank an empty BATCH frame: the step's go, so that a STOP still
ends every worker after the same step.

A fixed data set (a ``data.BatchSource``) is written whole, once
(``FixedImages``); batches made step by step (augmented) go into a ring of
``RING`` batches (``ImageRing``), each written before its step's go and not
again before every worker has finished that step (the launcher is
``BATCHES_AHEAD`` steps ahead at most: it writes step s + 2 once every
worker has reported step s, while they may read s + 1).

The file is the launcher's own, in a directory only this job uses; a worker
checks its header against the plan (shape, dtype, size) before it allocates
anything, and reads no pickle.
"""
import os

import numpy as np

from tilec_runtime.errors import DataError
from tilec_runtime.executor import BATCHES_AHEAD
from tilec_runtime.geometry import Region

IMAGES = "images.npy"
RING = BATCHES_AHEAD + 1  # batches a ring holds: the one being read, and those written ahead


class FixedImages:
    """A fixed data set's images, written once: ``spec`` is the job's ``data``."""

    def __init__(self, source, directory):
        path = os.path.join(directory, IMAGES)
        images = np.ascontiguousarray(source.images)
        np.save(path, images, allow_pickle=False)
        self.spec = {"images": path, "count": int(images.shape[0]), "batch": int(source.batch)}

    def put(self, step, images):
        """(Nothing: the workers find step ``step``'s images among all of them:
        the launcher takes only its targets, ``data.BatchSource.target_of``.)"""

    def close(self):
        pass


class ImageRing:
    """Batches made step by step: step s's images in slot s % ``RING``."""

    def __init__(self, directory, shape, dtype, batch):
        self.path = os.path.join(directory, IMAGES)
        self.dtype = np.dtype(dtype)
        self.bytes = batch * int(np.prod(shape)) * self.dtype.itemsize
        count = RING * batch
        with open(self.path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                     "fortran_order": False, "shape": (count, *shape)})
            self.offset = f.tell()
            f.truncate(self.offset + RING * self.bytes)
        self.fd = os.open(self.path, os.O_WRONLY)
        self.spec = {"images": self.path, "count": count, "batch": batch, "ring": RING}

    def put(self, step, images):
        data = np.ascontiguousarray(images, self.dtype)
        if data.nbytes != self.bytes:
            raise ValueError(f"a batch of images of shape {images.shape}, the ring takes {self.bytes} bytes")
        view, at = memoryview(data).cast("B"), self.offset + (step % RING) * self.bytes
        while len(view):
            n = os.pwrite(self.fd, view, at)
            view, at = view[n:], at + n

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def batch_items(step, batch, count, ring=False):
    """The data set's items of training step ``step`` (``data.BatchSource.get``),
    or its slot's of a ring."""
    if ring:
        return (step % (count // batch)) * batch + np.arange(batch)
    return (np.arange(batch) + step * batch) % count


def _header(f, path):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise DataError(f"{path}: .npy version {version} is not supported")


class ImagePieces:
    """Rank ``rank``'s pieces of a step's images (``{message id: array}``,
    as the launcher would send them) read from the file of ``FixedImages``
    or ``ImageRing``."""

    def __init__(self, spec, plan, pieces):
        """``pieces``: [(message id, shape)] of the rank's input messages (``executor.input_messages``)."""
        path, self.count, self.batch = spec["images"], int(spec["count"]), int(spec["batch"])
        self.ring = bool(spec.get("ring"))
        if self.ring and self.count != int(spec["ring"]) * self.batch:
            raise DataError(f"{path}: a ring of {spec['ring']} batches of {self.batch} holds "
                            f"{int(spec['ring']) * self.batch} images, not {self.count}")
        dtype = np.dtype(plan["dtype"])
        c, h, w = plan["program"][0]["in_shape"]
        if self.batch != plan["batch"] or self.count < 1:
            raise DataError(f"{path}: {self.count} images in batches of {self.batch}, the plan's batch is "
                            f"{plan['batch']}")
        want = (self.count, c, h, w)
        self.fd = os.open(path, os.O_RDONLY)
        try:
            with os.fdopen(os.dup(self.fd), "rb") as f:
                shape, fortran, got = _header(f, path)
                self.offset = f.tell()
            if tuple(shape) != want or fortran or got != dtype:
                raise DataError(f"{path}: {got} {tuple(shape)}{' (Fortran order)' if fortran else ''}, the job "
                                f"needs {dtype} {want}")
            if os.fstat(self.fd).st_size != self.offset + int(np.prod(want)) * dtype.itemsize:
                raise DataError(f"{path}: the file is not {want} {dtype} whole")
        except BaseException:
            os.close(self.fd)
            raise
        self.shape, self.dtype = (c, h, w), dtype
        whole = Region.whole(h, w)
        self.pieces = []
        for k, shape in pieces:
            m = plan["messages"][k]
            region = Region.of((m["rows"], m["cols"]))
            if not whole.contains(region) or tuple(shape) != (self.batch, c, region.height, region.width):
                raise DataError(f"input message {k} does not lie in the {h} x {w} image")
            self.pieces.append((k, region))
        # full-width rows of one image's channels, where a piece is narrower than the image
        widest = max((r.height for _, r in self.pieces if r.width != w), default=0)
        self.rows = np.empty((c, widest, w), dtype) if widest else None

    def read(self, step):
        items = batch_items(step, self.batch, self.count, self.ring)
        c, h, w = self.shape
        row = w * self.dtype.itemsize
        out = {}
        for k, region in self.pieces:
            r0, r1, c0, c1 = region.rows[0], region.rows[1] + 1, region.cols[0], region.cols[1] + 1
            piece = np.empty((self.batch, c, r1 - r0, c1 - c0), self.dtype)
            for b, item in enumerate(items):
                into = piece[b] if c1 - c0 == w else self.rows[:, :r1 - r0]
                for ch in range(c):
                    at = self.offset + ((int(item) * c + ch) * h + r0) * row
                    view = memoryview(into[ch]).cast("B")
                    if os.preadv(self.fd, [view], at) != len(view):
                        raise DataError("the image file is shorter than its header says")
                if c1 - c0 != w:
                    piece[b] = into[:, :, c0:c1]
            out[k] = piece
        return out

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
