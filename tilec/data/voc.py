"""Pascal VOC annotations (XML) to the YOLO layout, as darknet's ``voc_label.py``.

Input: a VOC year directory (``VOC2007/``) with ``Annotations/ID.xml``,
``JPEGImages/ID.jpg`` and, optionally, ``ImageSets/Main/SPLIT.txt`` listing
the IDs of each split (without them every annotation goes to ``train``).
Output: ``OUT/images/SPLIT/ID.jpg`` (a symbolic link to the original, or a
copy), ``OUT/labels/SPLIT/ID.txt`` and ``OUT/classes.txt``.

Boxes convert as darknet does: VOC's 1-based pixel corners to a centre
``((xmin + xmax)/2 - 1) / width``, size ``(xmax - xmin) / width``. Objects
marked ``difficult`` and objects of classes not in ``classes`` are left out
(and counted); an unreadable annotation, a missing image or an impossible
box is a bad file: reported by path and skipped, or fatal.
"""
import os
import shutil
import xml.etree.ElementTree as ET

from tilec.data import DatasetError
from tilec.data.yolo import Reporter, file_error, write_labels

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def parse_annotation(path, classes):
    """(width, height, labels [(class, cx, cy, w, h)], left out {reason: count}) of one VOC XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise file_error(path, f"cannot read annotation: {exc}") from None
    try:
        width = float(root.findtext("size/width"))
        height = float(root.findtext("size/height"))
    except (TypeError, ValueError):
        raise file_error(path, "no numeric size/width and size/height") from None
    if width <= 0 or height <= 0:
        raise file_error(path, f"image size {width}x{height}")
    labels, left_out = [], {}
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            left_out[f"class {name!r}"] = left_out.get(f"class {name!r}", 0) + 1
            continue
        if (obj.findtext("difficult") or "0").strip() == "1":
            left_out["difficult"] = left_out.get("difficult", 0) + 1
            continue
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise file_error(path, f"object {name!r} has no numeric bndbox") from None
        if not (0 < xmin < xmax <= width + 1 and 0 < ymin < ymax <= height + 1):
            raise file_error(path, f"object {name!r} box ({xmin}, {ymin}, {xmax}, {ymax}) does not fit "
                               f"the {width:g}x{height:g} image")
        cx, cy = ((xmin + xmax) / 2 - 1) / width, ((ymin + ymax) / 2 - 1) / height
        labels.append((classes.index(name), cx, cy, (xmax - xmin) / width, (ymax - ymin) / height))
    return width, height, labels, left_out


def _splits(voc):
    main = os.path.join(voc, "ImageSets", "Main")
    found = {}
    for split in ("train", "val", "trainval", "test"):
        path = os.path.join(main, f"{split}.txt")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                found[split] = [line.split()[0] for line in f if line.strip()]
    if "train" in found or "val" in found:
        found.pop("trainval", None)  # the union of the two: not a split of its own
    if not found:
        ids = sorted(f[:-4] for f in os.listdir(os.path.join(voc, "Annotations")) if f.endswith(".xml"))
        found["train"] = ids
    return found


def convert_voc(voc, out, *, classes=VOC_CLASSES, copy=False, on_error="skip", log=None):
    """Convert a VOC year directory to the YOLO layout in ``out``.

    Returns ``{"images": {split: count}, "left_out": {reason: count}, "bad": [(path, reason)]}``.
    """
    if not os.path.isdir(os.path.join(voc, "Annotations")):
        raise file_error(voc, "no Annotations/ directory (expected a VOC year directory such as VOC2007/)")
    classes = list(classes)
    report = Reporter(on_error, log)
    counts, left_out = {}, {}
    for split, ids in _splits(voc).items():
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        os.makedirs(os.path.join(out, "labels", split), exist_ok=True)
        counts[split] = 0
        for image_id in ids:
            xml = os.path.join(voc, "Annotations", f"{image_id}.xml")
            jpg = os.path.join(voc, "JPEGImages", f"{image_id}.jpg")
            try:
                if not os.path.exists(jpg):
                    raise file_error(jpg, "image file missing")
                _, _, labels, dropped = parse_annotation(xml, classes)
            except DatasetError as exc:
                report.bad(exc.path, exc.reason)
                continue
            for reason, n in dropped.items():
                left_out[reason] = left_out.get(reason, 0) + n
            target = os.path.join(out, "images", split, f"{image_id}.jpg")
            if os.path.lexists(target):
                os.unlink(target)
            if copy:
                shutil.copyfile(jpg, target)
            else:
                os.symlink(os.path.abspath(jpg), target)
            write_labels(os.path.join(out, "labels", split, f"{image_id}.txt"), labels)
            counts[split] += 1
    with open(os.path.join(out, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(classes) + "\n")
    return {"images": counts, "left_out": left_out, "bad": report.problems}
