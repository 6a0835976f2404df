"""Training batches: the ``.npz`` batch format, and a generated batch.

A batch file holds ``images`` (N, C, H, W) and either ``labels`` (N,)
integers (softmax models), ``targets`` (N, *output shape) (sse models) or
``boxes`` (N, max_boxes, 5) rows ``class cx cy w h`` normalised, padded with
rows of class -1 (region models, ``tilec_runtime.region``). With N larger
than the batch size, step k takes the k-th consecutive batch, wrapping
around.
"""

import numpy as np

from tilec_runtime.errors import DataError
from tilec_runtime.npzfile import load_npz


def target_kind(program):
    return {"softmax": "labels", "region": "boxes"}.get(program[-1]["kind"], "targets")


def target_shape(program):
    """The shape of one item's target (without the batch axis)."""
    last = program[-1]
    kind = target_kind(program)
    if kind == "labels":
        return ()
    if kind == "boxes":
        return (last["max_boxes"], 5)
    return tuple(last["in_shape"])


class BatchSource:
    def __init__(self, images, target, batch):
        self.images, self.target, self.batch = images, target, batch

    def __len__(self):
        return self.images.shape[0]

    def get(self, step):
        """The images and labels/targets of training step ``step`` (0-based)."""
        n = len(self)
        start = step * self.batch % n
        if start + self.batch <= n:  # views: the launcher copies a batch once, into what it sends or writes
            return self.images[start:start + self.batch], self.target[start:start + self.batch]
        idx = (np.arange(self.batch) + start) % n
        return self.images[idx], self.target[idx]


def load_batches(path, program, batch, dtype="float32"):
    arrays = load_npz(path, DataError, "data")
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
        tshape = (images.shape[0], *target_shape(program))
        if target.shape != tshape:
            raise DataError(f"{path}: {key!r} has shape {target.shape}, the model needs {tshape}")
        target = target.astype(dtype)
        if key == "boxes":
            problem = check_boxes(target, program[-1]["classes"])
            if problem:
                raise DataError(f"{path}: 'boxes' {problem}")
    return BatchSource(images.astype(dtype), target, batch)


def check_boxes(boxes, classes):
    """Error text for a malformed (N, max_boxes, 5) truth array, or None."""
    real = boxes[..., 0] >= 0
    cls = boxes[..., 0][real]
    if not np.all(np.isfinite(boxes)):
        return "has values that are not finite"
    if np.any(cls != np.floor(cls)) or np.any(cls >= classes):
        return f"classes must be integers in [0, {classes - 1}] (or -1 for padding)"
    if np.any(boxes[..., 0][~real] != -1):
        return "padding rows must have class -1"
    xywh = boxes[..., 1:][real]
    if np.any(xywh[:, :2] < 0) or np.any(xywh[:, :2] > 1) or np.any(xywh[:, 2:] <= 0) or np.any(xywh[:, 2:] > 1):
        return "centres must lie in [0, 1] and sizes in (0, 1]"
    return None


def generated_batches(program, batch, seed, dtype="float32", count=None):
    """A deterministic random data set of ``count`` (default 4 * batch) items."""
    rng = np.random.default_rng([seed, 0x5EED])
    n = count or 4 * batch
    images = rng.standard_normal((n, *program[0]["in_shape"])).astype(dtype)
    kind = target_kind(program)
    if kind == "labels":
        target = rng.integers(0, int(np.prod(program[-1]["in_shape"])), size=n)
    elif kind == "boxes":
        target = random_boxes(rng, n, program[-1]["max_boxes"], program[-1]["classes"]).astype(dtype)
    else:
        target = rng.standard_normal((n, *program[-1]["in_shape"])).astype(dtype)
    return BatchSource(images, target, batch)


def random_boxes(rng, n, max_boxes, classes):
    """(n, max_boxes, 5) truth: 1..min(3, max_boxes) boxes per item inside the image, then padding."""
    out = np.full((n, max_boxes, 5), -1.0)
    out[..., 1:] = 0.0
    for k in range(n):
        for t in range(int(rng.integers(1, min(3, max_boxes) + 1))):
            w, h = rng.uniform(0.05, 0.6, size=2)
            out[k, t] = [rng.integers(0, classes), rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2), w, h]
    return out
