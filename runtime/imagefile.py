"""A step's images in a file every local worker reads its own pieces from.

Local workers share the launcher's machine, so its disk: rather than send
every step's pieces of the images over loopback (the launcher framing and
authenticating them, each worker's reader taking and checking them, all on
the cores the workers compute on), the launcher writes each step's images
into an ``.npy`` file and each worker reads the rows of its pieces straight
into its tiles' input regions before the step (``RankExecutor.input_views``:
it never holds a piece beside them; a piece narrower than the image goes
through a buffer of whole rows). The launcher still sends each step's
labels or targets to the ranks that compute the loss (each its part:
``shards.target_part``), and every other rank an empty BATCH frame: the
step's go, so that a STOP still ends every worker after the same step.

The file is a ring of ``BATCHES_AHEAD`` batches (``ImageRing``): step s's
images in slot s % ``BATCHES_AHEAD``, written before its go. The launcher
writes step s + ``BATCHES_AHEAD`` once every worker has reported step s
(every worker read it when the step began), while they may read the steps
between: no slot is written while a worker may still read it. Only one
batch at a time is copied, whatever the size of the data set.

The file is the launcher's own, in a directory only this job uses; a worker
checks its header against the plan (shape, dtype, size) before it allocates
anything, and reads no pickle.
"""
import os

import numpy as np

from tilec_runtime.errors import DataError
from tilec_runtime.executor import BATCHES_AHEAD, LANDED
from tilec_runtime.geometry import Region

IMAGES = "images.npy"


class ImageRing:
    """The launcher's side: ``spec`` is the job's ``data``; ``put`` writes a
    step's images before its go."""

    def __init__(self, directory, shape, dtype, batch):
        path = os.path.join(directory, IMAGES)
        self.dtype = np.dtype(dtype)
        self.bytes = batch * int(np.prod(shape)) * self.dtype.itemsize
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                     "fortran_order": False,
                                                     "shape": (BATCHES_AHEAD * batch, *shape)})
            self.offset = f.tell()
            f.truncate(self.offset + BATCHES_AHEAD * self.bytes)
        self.fd = os.open(path, os.O_WRONLY)
        self.spec = {"images": path}

    def put(self, step, images):
        data = np.ascontiguousarray(images, self.dtype)
        if data.nbytes != self.bytes:
            raise ValueError(f"a batch of images of shape {images.shape}, the ring takes {self.bytes} bytes")
        view, at = memoryview(data).cast("B"), self.offset + (step % BATCHES_AHEAD) * self.bytes
        while len(view):
            n = os.pwrite(self.fd, view, at)
            view, at = view[n:], at + n

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f".npy version {version} is not supported")


class ImagePieces:
    """Rank ``rank``'s pieces of a step's images (``{message id: array}``,
    as the launcher would send them) read from the file of ``ImageRing``."""

    def __init__(self, spec, plan, pieces):
        """``pieces``: [(message id, shape)] of the rank's input messages (``executor.input_messages``)."""
        path, batch = spec["images"], plan["batch"]
        self.dtype = np.dtype(plan["dtype"])
        c, h, w = self.shape = tuple(plan["program"][0]["in_shape"])
        whole = Region.whole(h, w)
        self.pieces = []
        for k, shape in pieces:
            m = plan["messages"][k]
            region = Region.of((m["rows"], m["cols"]))
            if not whole.contains(region) or tuple(shape) != (batch, c, region.height, region.width):
                raise DataError(f"input message {k} does not lie in the {h} x {w} image")
            self.pieces.append((k, region))
        want = (BATCHES_AHEAD * batch, c, h, w)
        self.fd = None
        try:
            self.fd = os.open(path, os.O_RDONLY)
            with os.fdopen(os.dup(self.fd), "rb") as f:
                shape, fortran, got = _header(f)
                self.offset = f.tell()
            if tuple(shape) != want or fortran or got != self.dtype:
                raise DataError(f"{path}: {got} {tuple(shape)}{' (Fortran order)' if fortran else ''}, the job "
                                f"needs {self.dtype} {want}")
            if os.fstat(self.fd).st_size != self.offset + int(np.prod(want)) * self.dtype.itemsize:
                raise DataError(f"{path}: the file is not {want} {self.dtype} whole")
        except BaseException as exc:
            self.close()
            if isinstance(exc, (OSError, ValueError, EOFError)) and not isinstance(exc, DataError):
                raise DataError(f"{path}: cannot read images: {exc or type(exc).__name__}") from None
            raise
        self.batch = batch
        self.rows = None  # full-width rows of one image's channels, where a piece is narrower (``_rows``)

    def read(self, step, into=None):
        """{message id: piece} of ``step``; ``into``: {message id: the view
        a piece lands in} (``RankExecutor.input_views``), written there
        directly, given as ``executor.LANDED``."""
        c, h, w = self.shape
        row = w * self.dtype.itemsize
        first = (step % BATCHES_AHEAD) * self.batch  # the step's slot of the ring
        out = {}
        for k, region in self.pieces:
            r0, r1, c0, c1 = region.rows[0], region.rows[1] + 1, region.cols[0], region.cols[1] + 1
            shape = (self.batch, c, r1 - r0, c1 - c0)
            dest = into.get(k) if into else None
            if dest is not None and dest.shape != shape:
                raise ValueError(f"input {k}: a view of {dest.shape} for a piece of {shape}")
            piece = np.empty(shape, self.dtype) if dest is None else dest
            # rows straight into the piece where they are whole rows of it (every image's and channel's
            # rows one run of memory), else through a buffer
            direct = c1 - c0 == w and piece.strides[2:] == (row, self.dtype.itemsize)
            for b in range(self.batch):
                rows = piece[b] if direct else self._rows(r1 - r0)
                for ch in range(c):
                    view = memoryview(rows[ch]).cast("B")
                    if os.preadv(self.fd, [view], self.offset + (((first + b) * c + ch) * h + r0) * row) != len(view):
                        raise DataError("the image file is shorter than its header says")
                if not direct:
                    piece[b] = rows[:, :, c0:c1]
            out[k] = piece if dest is None else LANDED
        return out

    def _rows(self, n):
        """A buffer of ``n`` full-width rows of one image's channels."""
        if self.rows is None or self.rows.shape[1] < n:
            self.rows = np.empty((self.shape[0], n, self.shape[2]), self.dtype)
        return self.rows[:, :n]

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
