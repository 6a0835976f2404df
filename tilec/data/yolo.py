"""Reading a dataset in the YOLO layout (see :mod:`tilec.data`).

A split is either ``ROOT/images/SPLIT`` (every image file in it, sorted) or
a list file (darknet's ``train.txt``: one image path a line, relative paths
relative to the list). An image's labels are at the path darknet uses: the
last ``images`` directory replaced by ``labels`` and the extension by
``.txt``.

Bad files — an image that is missing or cannot be read, a label file that
is missing or has a malformed line — are never passed over silently: with
``on_error="skip"`` each is reported by path (one line to ``log``) and
left out; with ``on_error="fail"`` the first one raises
:class:`~tilec.data.DatasetError` naming it.
"""
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from tilec.data import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
ON_ERROR = ("skip", "fail")


@dataclass
class Item:
    image: str
    boxes: np.ndarray  # (K, 5) class cx cy w h


@dataclass
class Dataset:
    items: list
    classes: list
    root: str
    split: str
    problems: list = field(default_factory=list)  # (path, reason) of what was left out


class Reporter:
    """Applies the bad-file policy: report and skip, or raise."""

    def __init__(self, on_error="skip", log=None):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error, self.log = on_error, log
        self.problems = []

    def bad(self, path, reason):
        if self.on_error == "fail":
            raise file_error(path, reason)
        self.problems.append((path, reason))
        log = self.log or sys.stderr  # looked up per call: tests swap sys.stderr
        log.write(f"tilec: skipping {path}: {reason}\n")
        log.flush()


def file_error(path, reason):
    """A DatasetError ``path: reason`` that keeps both parts for the reporter."""
    err = DatasetError(f"{path}: {reason}")
    err.path, err.reason = path, reason
    return err


def label_path(image):
    """darknet's rule: ``.../images/.../x.jpg`` -> ``.../labels/.../x.txt``."""
    head, tail = os.path.split(image)
    parts = head.split(os.sep)
    for k in range(len(parts) - 1, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            break
    return os.path.join(os.sep.join(parts), os.path.splitext(tail)[0] + ".txt")


def read_classes(root):
    """Class names from ``ROOT/classes.txt`` (or the one ``*.names`` file in ROOT)."""
    path = os.path.join(root, "classes.txt")
    if not os.path.exists(path):
        names = sorted(f for f in os.listdir(root) if f.endswith(".names")) if os.path.isdir(root) else []
        if len(names) != 1:
            raise DatasetError(f"{root}: no classes.txt (one class name a line)")
        path = os.path.join(root, names[0])
    with open(path, encoding="utf-8") as f:
        classes = [line.strip() for line in f if line.strip()]
    if not classes:
        raise DatasetError(f"{path}: no class names")
    return classes


def parse_labels(path, classes):
    """(K, 5) array from a label file; DatasetError ``path:line: what`` on a bad line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise file_error(path, f"cannot read label file: {exc}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 5:
            raise file_error(where, f"expected 'class cx cy w h', got {line.strip()!r}")
        try:
            cls, cx, cy, w, h = int(fields[0]), *map(float, fields[1:])
        except ValueError:
            raise file_error(where, f"expected an integer class and four numbers, got {line.strip()!r}") from None
        if not 0 <= cls < classes:
            raise file_error(where, f"class {cls} out of range 0..{classes - 1}")
        if not (0 <= cx <= 1 and 0 <= cy <= 1 and 0 < w <= 1 and 0 < h <= 1):
            raise file_error(where, f"box {cx} {cy} {w} {h} is not normalised (centre in [0, 1], size in (0, 1])")
        rows.append((cls, cx, cy, w, h))
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def write_labels(path, labels):
    """A label file: one ``class cx cy w h`` line per (class, cx, cy, w, h)."""
    with open(path, "w", encoding="utf-8") as f:
        for cls, cx, cy, w, h in labels:
            f.write(f"{int(cls)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")


def open_image(path):
    """The decoded RGB PIL image; DatasetError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            return img.convert("RGB")
    except FileNotFoundError:
        raise file_error(path, "image file missing") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise file_error(path, f"cannot read image: {exc}") from None


def _check_image(path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()  # headers and (PNG) checksums, without decoding
    except FileNotFoundError:
        raise file_error(path, "image file missing") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise file_error(path, f"cannot read image: {exc}") from None


def image_paths(root, split):
    """The image paths of a split: a list file, or the files of ``ROOT/images/SPLIT``."""
    if os.path.isfile(split) or split.endswith(".txt"):
        try:
            with open(split, encoding="utf-8") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError as exc:
            raise DatasetError(f"{split}: cannot read the image list: {exc.strerror}") from None
        base = os.path.dirname(os.path.abspath(split))
        return [p if os.path.isabs(p) else os.path.join(base, p) for p in lines]
    folder = os.path.join(root, "images", split)
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder}: no such directory (expected ROOT/images/{split}/ with "
                           f"ROOT/labels/{split}/ beside it)")
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.lower().endswith(IMAGE_EXTENSIONS)]


def load_split(root, split, *, classes=None, on_error="skip", verify=True, log=None):
    """The :class:`Dataset` of a split, bad files reported and left out (or fatal).

    Parameters
    ----------
    root : str
        The dataset directory (holding ``classes.txt``).
    split : str
        ``train``, ``val``, ... or the path of a list file.
    classes : list of str, optional
        Default: ``read_classes(root)``.
    on_error : {"skip", "fail"}
    verify : bool
        Check every image's header now (a file that is not an image, or a
        corrupt PNG, is found before training starts rather than during it).
    """
    classes = classes or read_classes(root)
    report = Reporter(on_error, log)
    items = []
    for image in image_paths(root, split):
        try:
            if verify:
                _check_image(image)
            elif not os.path.exists(image):
                raise file_error(image, "image file missing")
            labels = label_path(image)
            if not os.path.exists(labels):
                raise file_error(labels, "label file missing (an image without objects needs an empty one)")
            items.append(Item(image, parse_labels(labels, len(classes))))
        except DatasetError as exc:
            report.bad(exc.path, exc.reason)
    if not items:
        raise DatasetError(f"{root}: split {split!r} has no usable images")
    return Dataset(items, classes, root, split, report.problems)
