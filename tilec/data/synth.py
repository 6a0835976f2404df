"""A synthetic detection dataset: coloured shapes on textured backgrounds.

Each image is a real file (JPEG or PNG, chosen per image) of a random size
around 128 px, with a background of smooth colour noise, stripes and pixel
noise, and 1-4 shapes (one class each) of 18-55 % of the image's short side
that overlap each other little. Labels are the shapes' tight boxes. Every
image follows from ``(seed, index)`` alone, so a dataset is reproducible.
"""
import json
import os

import numpy as np

from tilec.data.yolo import write_labels

CLASSES = ("circle", "square", "triangle", "cross")
VERSION = 1
"""Bumped whenever the images change, so that cached datasets are remade."""


def _background(rng, h, w):
    """Smooth colour noise + stripes + pixel noise, uint8 (h, w, 3)."""
    from PIL import Image

    coarse = rng.uniform(40, 215, size=(rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 30)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    img += rng.uniform(5, 30) * stripes[..., None] * rng.uniform(-1, 1, size=3)
    img += rng.normal(0, rng.uniform(2, 12), size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _contrasting(rng, background_mean):
    """A colour that differs from the local background by at least 80 (L1 over RGB / 3)."""
    for _ in range(50):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - background_mean).mean() >= 80:
            return tuple(int(c) for c in colour)
    return tuple(int(c) for c in np.where(background_mean > 127, 0, 255))


def _overlaps(box, boxes, limit=0.2):
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in boxes:
        iw, ih = min(x1, a1) - max(x0, a0), min(y1, b1) - max(y0, b0)
        if iw > 0 and ih > 0:
            inter = iw * ih
            if inter / ((x1 - x0) * (y1 - y0) + (a1 - a0) * (b1 - b0) - inter) > limit:
                return True
    return False


def make_image(seed, index):
    """(PIL image, labels [(class, cx, cy, w, h)]) of image ``index``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    w, h = int(rng.integers(112, 161)), int(rng.integers(96, 145))
    pixels = _background(rng, h, w)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    placed, labels = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            cls = int(rng.integers(len(CLASSES)))
            side = rng.uniform(0.18, 0.55) * min(w, h)
            bw = side * (rng.uniform(0.8, 1.25) if cls != 1 else 1.0)
            bh = side
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            box = (x0, y0, x0 + bw, y0 + bh)
            if not _overlaps(box, placed):
                break
        else:
            continue
        region = pixels[int(y0):int(y0 + bh) + 1, int(x0):int(x0 + bw) + 1]
        colour = _contrasting(rng, region.reshape(-1, 3).mean(axis=0))
        x1, y1 = x0 + bw, y0 + bh
        if cls == 0:
            draw.ellipse(box, fill=colour)
        elif cls == 1:
            draw.rectangle(box, fill=colour)
        elif cls == 2:
            apex = x0 + rng.uniform(0.2, 0.8) * bw
            draw.polygon([(apex, y0), (x1, y1), (x0, y1)], fill=colour)
        else:
            bar = rng.uniform(0.25, 0.4)
            draw.rectangle((x0, y0 + (1 - bar) / 2 * bh, x1, y0 + (1 + bar) / 2 * bh), fill=colour)
            draw.rectangle((x0 + (1 - bar) / 2 * bw, y0, x0 + (1 + bar) / 2 * bw, y1), fill=colour)
        placed.append(box)
        labels.append((cls, (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, bw / w, bh / h))
    return img, labels


def make_dataset(out, n=1200, val_fraction=0.15, seed=0, progress=None):
    """Write ``n`` images (the last ``val_fraction`` of them the ``val`` split)
    to ``out`` in the YOLO layout, with ``classes.txt`` and ``dataset.json``.
    Returns the dataset description (what ``dataset.json`` holds)."""
    n_val = max(1, int(round(n * val_fraction))) if n > 1 else 0
    splits = {"train": range(0, n - n_val), "val": range(n - n_val, n)}
    for split in splits:
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        os.makedirs(os.path.join(out, "labels", split), exist_ok=True)
    for index in range(n):
        split = "train" if index < n - n_val else "val"
        img, labels = make_image(seed, index)
        name = f"{index:06d}"
        # both formats, so that the loader is exercised on both
        ext = ".jpg" if index % 2 == 0 else ".png"
        path = os.path.join(out, "images", split, name + ext)
        if ext == ".jpg":
            img.save(path, quality=92)
        else:
            img.save(path)
        write_labels(os.path.join(out, "labels", split, name + ".txt"), labels)
        if progress:
            progress(index + 1, n)
    with open(os.path.join(out, "classes.txt"), "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    info = {"generator": "tilec.data.synth", "seed": seed, "images": n,
            "splits": {k: len(v) for k, v in splits.items()}, "classes": list(CLASSES)}
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info
