"""Letterbox resize with scale jitter and horizontal flip, boxes carried along.

Boxes are arrays (K, 5) of ``class cx cy w h`` normalised to their image.
The letterbox keeps the aspect ratio: the image is scaled to fit the
network's input (times a jitter factor ``s``), placed on a grey (0.5)
canvas at a fractional offset (0.5, 0.5: centred, as darknet's
``letterbox_image``; random when augmenting) and cropped where it sticks
out; boxes are clipped to the canvas and dropped when less than
``MIN_VISIBLE`` of their area or less than a pixel across remains.
"""
import numpy as np

GREY = 0.5
MIN_VISIBLE = 0.25


def placement(size, net, scale=1.0, offset=(0.5, 0.5)):
    """(new width, new height, x offset, y offset) of an image of ``size``
    (w, h) letterboxed into ``net`` (w, h)."""
    (iw, ih), (nw_net, nh_net) = size, net
    s = min(nw_net / iw, nh_net / ih) * scale
    nw, nh = max(1, int(round(iw * s))), max(1, int(round(ih * s)))
    return nw, nh, int(round((nw_net - nw) * offset[0])), int(round((nh_net - nh) * offset[1]))


def letterbox(img, net, boxes=None, scale=1.0, offset=(0.5, 0.5), flip=False):
    """(CHW float32 array in [0, 1], boxes in the letterboxed frame).

    ``img`` is a PIL image (converted to RGB); ``net`` is (width, height).
    """
    from PIL import Image

    img = img.convert("RGB")
    nw, nh, ox, oy = placement(img.size, net, scale, offset)
    canvas = Image.new("RGB", net, (int(GREY * 255 + 0.5),) * 3)
    canvas.paste(img.resize((nw, nh), Image.BILINEAR), (ox, oy))
    if flip:
        canvas = canvas.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    if boxes is None:
        return array, None
    return array, transform_boxes(boxes, img.size, net, (nw, nh, ox, oy), flip)


def transform_boxes(boxes, size, net, place, flip=False):
    """Boxes of an image of ``size`` into the letterboxed frame ``net`` given
    its ``placement``; clipped, small remnants dropped."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    nw, nh, ox, oy = place
    netw, neth = net
    x0 = ((boxes[:, 1] - boxes[:, 3] / 2) * nw + ox) / netw
    x1 = ((boxes[:, 1] + boxes[:, 3] / 2) * nw + ox) / netw
    y0 = ((boxes[:, 2] - boxes[:, 4] / 2) * nh + oy) / neth
    y1 = ((boxes[:, 2] + boxes[:, 4] / 2) * nh + oy) / neth
    area = (x1 - x0) * (y1 - y0)
    cx0, cx1, cy0, cy1 = np.clip(x0, 0, 1), np.clip(x1, 0, 1), np.clip(y0, 0, 1), np.clip(y1, 0, 1)
    w, h = cx1 - cx0, cy1 - cy0
    keep = (w * netw >= 1) & (h * neth >= 1) & (w * h >= MIN_VISIBLE * area)
    out = np.stack([boxes[:, 0], (cx0 + cx1) / 2, (cy0 + cy1) / 2, w, h], axis=1)[keep]
    if flip:
        out[:, 1] = 1 - out[:, 1]
    return out


def unletterbox(boxes, size, net):
    """Boxes (..., 4) ``cx cy w h`` predicted on a centred letterbox (scale 1)
    of an image of ``size`` back to that image's normalised frame."""
    nw, nh, ox, oy = placement(size, net)
    netw, neth = net
    out = np.array(boxes, dtype=np.float64, copy=True)
    out[..., 0] = (out[..., 0] * netw - ox) / nw
    out[..., 1] = (out[..., 1] * neth - oy) / nh
    out[..., 2] = out[..., 2] * netw / nw
    out[..., 3] = out[..., 3] * neth / nh
    return out


def random_params(rng, jitter):
    """(scale, offset, flip) for one training image: scale uniform in
    [1 - jitter, 1 + jitter], offset uniform, a flip with probability 1/2."""
    scale = rng.uniform(1 - jitter, 1 + jitter) if jitter else 1.0
    return scale, (rng.uniform(), rng.uniform()), bool(rng.integers(2))
