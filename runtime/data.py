"""Training batches: the ``.npz`` batch format, and a generated batch.

A batch file holds ``images`` (N, C, H, W) and either ``labels`` (N,)
integers (softmax models) or ``targets`` (N, *output shape) (sse models).
With N larger than the batch size, step k takes the k-th consecutive batch,
wrapping around.
"""
import zipfile

import numpy as np

from tilec_runtime.errors import DataError


def target_kind(program):
    return "labels" if program[-1]["kind"] == "softmax" else "targets"


class BatchSource:
    def __init__(self, images, target, batch):
        self.images, self.target, self.batch = images, target, batch

    def __len__(self):
        return self.images.shape[0]

    def get(self, step):
        """The images and labels/targets of training step ``step`` (0-based)."""
        n = len(self)
        idx = (np.arange(self.batch) + step * self.batch) % n
        return self.images[idx], self.target[idx]


def load_batches(path, program, batch, dtype="float32"):
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read data: {exc}") from None
    if "images" not in arrays:
        raise DataError(f"{path}: no 'images' array")
    images = arrays["images"]
    want = tuple(program[0]["in_shape"])
    if images.ndim != 4 or images.shape[1:] != want:
        raise DataError(f"{path}: 'images' has shape {images.shape}, the model needs (N, {', '.join(map(str, want))})")
    if images.shape[0] == 0:
        raise DataError(f"{path}: 'images' is empty")
    key = target_kind(program)
    if key not in arrays:
        raise DataError(f"{path}: no {key!r} array (the model ends in {program[-1]['kind']})")
    target = arrays[key]
    if key == "labels":
        classes = int(np.prod(program[-1]["in_shape"]))
        if target.shape != (images.shape[0],) or not np.issubdtype(target.dtype, np.integer):
            raise DataError(f"{path}: 'labels' must be {images.shape[0]} integers, got {target.dtype} {target.shape}")
        if target.min() < 0 or target.max() >= classes:
            raise DataError(f"{path}: 'labels' must lie in [0, {classes - 1}]")
        target = target.astype(np.int64)
    else:
        tshape = (images.shape[0], *program[-1]["in_shape"])
        if target.shape != tshape:
            raise DataError(f"{path}: 'targets' has shape {target.shape}, the model needs {tshape}")
        target = target.astype(dtype)
    return BatchSource(images.astype(dtype), target, batch)


def generated_batches(program, batch, seed, dtype="float32", count=None):
    """A deterministic random data set of ``count`` (default 4 * batch) items."""
    rng = np.random.default_rng([seed, 0x5EED])
    n = count or 4 * batch
    images = rng.standard_normal((n, *program[0]["in_shape"])).astype(dtype)
    if target_kind(program) == "labels":
        target = rng.integers(0, int(np.prod(program[-1]["in_shape"])), size=n)
    else:
        target = rng.standard_normal((n, *program[-1]["in_shape"])).astype(dtype)
    return BatchSource(images, target, batch)
