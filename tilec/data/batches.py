"""Training batches of a detection dataset: ``get(step)`` -> (images, boxes).

The batch of step ``k`` is a function of ``(seed, k)`` alone: the items are
visited in a fresh permutation each epoch, and each item's augmentation
draws from its own random stream. So a run resumed at step ``k``, or run on
another number of devices, reads exactly the same batches, whatever the
prefetching thread happened to do first.

``images`` is (B, 3, H, W) in [0, 1]; ``boxes`` is (B, max_boxes, 5) rows
``class cx cy w h`` in the letterboxed frame, padded with rows of class -1
(``tilec_runtime.region.PAD``), the target of a ``[region]`` loss.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tilec.data import DatasetError
from tilec.data.augment import letterbox, random_params
from tilec.data.yolo import Reporter, open_image
from tilec_runtime.region import PAD


def pad_boxes(boxes, max_boxes):
    """(max_boxes, 5) rows: ``boxes`` first, then padding. Extra boxes are dropped."""
    out = np.zeros((max_boxes, 5))
    out[:, 0] = PAD
    k = min(len(boxes), max_boxes)
    out[:k] = boxes[:k]
    return out


class DetectionBatches:
    """Batches of a :class:`~tilec.data.yolo.Dataset` for a network input ``net`` (w, h).

    Parameters
    ----------
    dataset : Dataset
    net : (int, int)
        The network's input width and height.
    batch, max_boxes : int
    seed : int
    augment : bool
        Random scale jitter, placement and flip (training); otherwise a
        centred letterbox.
    jitter : float
        Scale jitter: the scale is uniform in ``[1 - jitter, 1 + jitter]``.
    dtype : str
    on_error : {"skip", "fail"}
        An image that cannot be decoded is reported and replaced by the next
        readable item, or raises.
    """

    def __init__(self, dataset, net, batch, max_boxes, *, seed=0, augment=True, jitter=0.2, dtype="float32",
                 on_error="skip", log=None):
        self.dataset, self.net, self.batch, self.max_boxes = dataset, tuple(net), batch, max_boxes
        self.seed, self.augment, self.jitter, self.dtype = seed, augment, jitter, np.dtype(dtype)
        self.report = Reporter(on_error, log)
        self.bad = set()
        self._lock = threading.Lock()
        self._perm = None
        self.truncated = sum(len(item.boxes) > max_boxes for item in dataset.items)

    def __len__(self):
        return len(self.dataset.items)

    def close(self):
        """Nothing to release (the same interface as :class:`Prefetcher`)."""

    def indices(self, step):
        """Dataset indices of the items of ``step``: epoch-wise permutations."""
        n = len(self)
        out = []
        for pos in range(step * self.batch, (step + 1) * self.batch):
            epoch, k = divmod(pos, n)
            out.append(int(self._permutation(epoch)[k]))
        return out

    def _permutation(self, epoch):
        cached = self._perm
        if cached is None or cached[0] != epoch:
            cached = self._perm = (epoch, np.random.default_rng([self.seed, 0xE70C, epoch]).permutation(len(self)))
        return cached[1]

    def _image(self, index):
        """(index actually used, PIL image): the next readable item from ``index``."""
        n = len(self)
        for k in range(n):
            i = (index + k) % n
            if i in self.bad:
                continue
            try:
                return i, open_image(self.dataset.items[i].image)
            except DatasetError as exc:
                with self._lock:
                    if i not in self.bad:
                        self.bad.add(i)
                        self.report.bad(exc.path, exc.reason)
        raise DatasetError(f"{self.dataset.root}: no readable image in split {self.dataset.split!r}")

    def item(self, index, rng=None):
        """(CHW image, (max_boxes, 5) truth) of dataset item ``index``; augmented with ``rng``."""
        index, img = self._image(index)
        boxes = self.dataset.items[index].boxes
        if rng is None:
            array, boxes = letterbox(img, self.net, boxes)
        else:
            scale, offset, flip = random_params(rng, self.jitter)
            array, boxes = letterbox(img, self.net, boxes, scale, offset, flip)
        return array, pad_boxes(boxes, self.max_boxes)

    def get(self, step):
        """The images and truth of training step ``step`` (0-based)."""
        images = np.empty((self.batch, 3, self.net[1], self.net[0]), self.dtype)
        truth = np.empty((self.batch, self.max_boxes, 5), self.dtype)
        for t, index in enumerate(self.indices(step)):
            rng = np.random.default_rng([self.seed, 0xA06, step, t]) if self.augment else None
            images[t], truth[t] = self.item(index, rng)
        return images, truth


class Prefetcher:
    """``get(step)`` of a source, computed ahead on one thread.

    After serving step ``k`` it starts steps ``k+1 .. k+depth``, so that
    loading the next batches overlaps the training step. Results are the
    source's own (its ``get`` must depend on the step alone); errors are
    raised by the ``get`` of the step that failed. A context manager.
    """

    def __init__(self, source, depth=2):
        self.source, self.depth = source, depth
        self.batch = source.batch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tilec-prefetch")
        self._futures = {}
        self._lock = threading.Lock()

    def __len__(self):
        return len(self.source)

    def _future(self, step):
        fut = self._futures.get(step)
        if fut is None:
            fut = self._futures[step] = self._pool.submit(self.source.get, step)
        return fut

    def get(self, step):
        with self._lock:
            fut = self._future(step)
            for ahead in range(step + 1, step + 1 + self.depth):
                self._future(ahead)
            del self._futures[step]
            for old in [s for s in self._futures if s < step]:
                self._futures.pop(old).cancel()  # a step skipped over
        return fut.result()

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def dataset(self):
        return self.source.dataset

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def for_model(program, root, batch, *, split="train", seed=0, dtype="float32", on_error="skip", augment=True,
              prefetch=2, log=None):
    """The batches of a region model's training on the dataset at ``root``:
    its input size, ``max_boxes`` and ``jitter`` from the program; prefetched
    ``prefetch`` steps ahead (0: not at all). Close it when done."""
    from tilec.data.yolo import load_split
    region = program[-1]
    if region["kind"] != "region":
        raise DatasetError(f"{root}: a detection dataset needs a model that ends in [region], not "
                           f"[{region['kind']}]")
    dataset = load_split(root, split, on_error=on_error, log=log)
    if len(dataset.classes) != region["classes"]:
        raise DatasetError(f"{root} has {len(dataset.classes)} classes, the model {region['classes']}")
    _, h, w = program[0]["in_shape"]
    source = DetectionBatches(dataset, (w, h), batch, region["max_boxes"], seed=seed, augment=augment,
                              jitter=region["jitter"], dtype=dtype, on_error=on_error, log=log)
    return Prefetcher(source, prefetch) if prefetch else source
