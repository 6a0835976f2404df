"""Detection data on the planner's side: datasets in the YOLO directory
layout, their conversion from Pascal VOC, augmentation, and the batches a
training loop reads (``get(step)``, as ``tilec_runtime.data.BatchSource``).

- :mod:`tilec.data.synth`: a synthetic dataset (shapes on textured
  backgrounds, real PNG/JPEG files) in the YOLO layout.
- :mod:`tilec.data.yolo`: reading that layout, with every bad file reported
  by path.
- :mod:`tilec.data.voc`: Pascal VOC XML annotations to the YOLO layout.
- :mod:`tilec.data.augment`: letterbox resize, flip, scale jitter.
- :mod:`tilec.data.batches`: deterministic batches per step, prefetched on
  a thread.

The YOLO layout (darknet's): ``ROOT/images/SPLIT/NAME.{jpg,png}`` with
``ROOT/labels/SPLIT/NAME.txt``, one line ``class cx cy w h`` per object
(normalised to the image, class 0-based); an empty file is an image with no
objects. ``ROOT/classes.txt`` names the classes, one a line.
"""
from tilec.errors import TilecError


class DatasetError(TilecError):
    """A dataset file is missing or malformed; the message names the file."""
