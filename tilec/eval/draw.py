"""Detections drawn onto an image: a box and a ``class score`` tag each."""
import colorsys

import numpy as np


def class_colour(c, classes):
    """A distinct, saturated colour per class."""
    r, g, b = colorsys.hsv_to_rgb((c / max(classes, 1) + 0.05) % 1.0, 0.9, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


MIN_SIDE = 400
"""Smaller images are enlarged (by a whole factor, pixels kept sharp) so that the tags stay readable."""


def draw_detections(img, boxes, scores, labels, names):
    """A copy of PIL image ``img`` with the detections (boxes ``cx cy w h``
    normalised to the image) drawn, highest score on top."""
    from PIL import Image, ImageDraw

    out = img.convert("RGB")
    factor = -(-MIN_SIDE // max(out.size))
    out = out.resize((out.width * factor, out.height * factor), Image.NEAREST) if factor > 1 else out.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    width = max(1, round(min(w, h) / 150))
    for k in np.argsort(np.asarray(scores), kind="stable"):
        cx, cy, bw, bh = boxes[k]
        # inside the image: Pillow's time grows with the rectangle drawn, even off the image
        x0, x1 = np.clip([(cx - bw / 2) * w, (cx + bw / 2) * w], 0, w - 1)
        y0, y1 = np.clip([(cy - bh / 2) * h, (cy + bh / 2) * h], 0, h - 1)
        colour = class_colour(int(labels[k]), len(names))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        tag = f"{names[int(labels[k])]} {scores[k]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), tag)
        ty = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
        draw.rectangle((x0, ty, x0 + right - left + 3, ty + bottom - top + 2), fill=colour)
        draw.text((x0 + 1, ty - top + 1), tag, fill=(0, 0, 0))
    return out
