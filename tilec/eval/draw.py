"""Detections drawn onto an image: a box and a ``class score`` tag each."""
import colorsys

import numpy as np


def class_colour(c, classes):
    """A distinct, saturated colour per class."""
    r, g, b = colorsys.hsv_to_rgb((c / max(classes, 1) + 0.05) % 1.0, 0.9, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(img, boxes, scores, labels, names):
    """A copy of PIL image ``img`` with the detections (boxes ``cx cy w h``
    normalised to the image) drawn, highest score on top."""
    from PIL import ImageDraw

    out = img.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    width = max(1, round(min(w, h) / 150))
    for k in np.argsort(np.asarray(scores), kind="stable"):
        cx, cy, bw, bh = boxes[k]
        x0, y0 = (cx - bw / 2) * w, (cy - bh / 2) * h
        x1, y1 = (cx + bw / 2) * w, (cy + bh / 2) * h
        colour = class_colour(int(labels[k]), len(names))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        tag = f"{names[int(labels[k])]} {scores[k]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), tag)
        ty = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
        draw.rectangle((x0, ty, x0 + right - left + 3, ty + bottom - top + 2), fill=colour)
        draw.text((x0 + 1, ty - top + 1), tag, fill=(0, 0, 0))
    return out
