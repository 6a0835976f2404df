"""The YOLOv2 ``[region]`` loss: darknet's region layer, as a differentiable loss.

Input ``x`` (B, num*(5+classes), H, W): for anchor ``n`` the channels
``n*(5+classes) + e`` hold entry ``e`` = tx, ty, tw, th, to, then the class
scores (darknet's ``entry_index`` order, which is what a conv writes).
Decoded, the box of anchor ``n`` at cell (row ``j``, column ``i``) is

    cx = (i + sig(tx)) / W     w = exp(tw) * anchor_w[n] / W
    cy = (j + sig(ty)) / H     h = exp(th) * anchor_h[n] / H

with objectness ``sig(to)`` and class probabilities ``softmax(classes)``
(``softmax=1``) or ``sig(classes)`` (``softmax=0``); anchors are in cells.

Truth per image: (max_boxes, 5) rows ``class cx cy w h`` normalised to [0, 1];
a row whose class is negative is padding (``PAD``) and is skipped.

Targets, as darknet's ``forward_region_layer`` assigns them (one batch image
at a time):

1. Every prediction whose decoded box has IoU > ``thresh`` with some truth
   gets no objectness term; the others get ``noobject`` (target 0).
2. Each truth picks the cell holding its centre (``i = floor(cx*W)``,
   clipped to the map) and there the anchor whose *shape* best matches it
   (IoU of boxes centred at 0; the anchor's shape with ``bias_match=1``,
   the predicted shape otherwise; the first anchor on ties). That prediction
   is *responsible*: coordinate targets ``tx* = cx*W - i``, ``ty* = cy*H -
   j``, ``tw* = log(w*W / anchor_w)``, ``th* = log(h*H / anchor_h)`` with
   weight ``coord_scale * (2 - w*h)``; objectness target 1, or with
   ``rescore=1`` the IoU of its decoded box with the truth; class target.
   When two truths pick the same prediction the later one wins (darknet
   overwrites its deltas).
3. The early-training prior: while ``seen`` (images trained on, this batch
   included) is below 12800, every prediction that is not responsible is
   pulled to its anchor at the cell centre (``sig(tx), sig(ty) -> 0.5``,
   ``tw, th -> 0``) with weight 0.01. The runtime's step carries no image
   count, so training calls :func:`forward` without ``seen`` and the prior
   is off: darknet's behaviour after its first 12800 images (the usual case
   when starting from published weights).

The loss (``/B`` below is the mean over the batch, as ``ops.sse``):

    L = 1/B * sum over predictions of
        0.5 * coord_weight * ((tx* - sig(tx))^2 + (ty* - sig(ty))^2 + (tw* - tw)^2 + (th* - th)^2)
      + 0.5 * obj_weight * (to* - sig(to))^2
      + class_scale * CE                       (responsible predictions only)

where CE is softmax cross-entropy ``-log p[class]`` (``softmax=1``) or the
sum of per-class binary cross-entropies (``softmax=0``). Its gradient is
exactly darknet's GPU delta (``-delta``, with the logistic derivative
applied to x, y and objectness; the class delta ``scale * (onehot - p)``
used as the logit gradient), divided by B. Not implemented: darknet's
reported cost (``|delta|^2``, which is not the loss its gradient descends),
the multi-label shortcut of ``softmax=0`` when two truths share a
prediction, ``coords > 4``, ``background``, softmax trees and class maps.

The assignment (which prediction is responsible, which get no objectness
term, the rescore IoU target) is treated as a constant of the step, as in
darknet: it is piecewise constant in ``x`` except for the rescore target,
whose dependence on ``x`` darknet (and this gradient) ignores.
"""
from dataclasses import dataclass

import numpy as np

PAD = -1.0
"""The class value of a padding row of the truth array."""

PRIOR_IMAGES = 12800
PRIOR_SCALE = 0.01


def entries(layer):
    """Entries per anchor: 4 coordinates, objectness, classes."""
    return layer["coords"] + 1 + layer["classes"]


def _split(x, layer):
    """(B, num, entries, H, W) view of the region input."""
    b, _, h, w = x.shape
    return x.reshape(b, layer["num"], entries(layer), h, w)


def _sigmoid(z):
    # exp of a non-positive number only: no overflow for large |z|
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _anchors(layer):
    a = np.asarray(layer["anchors"], dtype=np.float64).reshape(layer["num"], 2)
    return a[:, 0], a[:, 1]


def boxes(x, layer):
    """Decoded boxes (B, num, H, W, 4) as normalised ``cx, cy, w, h`` (float64)."""
    v = _split(x.astype(np.float64, copy=False), layer)
    _, _, _, h, w = v.shape
    aw, ah = _anchors(layer)
    cols = np.arange(w)[None, None, None, :]
    rows = np.arange(h)[None, None, :, None]
    cx = (cols + _sigmoid(v[:, :, 0])) / w
    cy = (rows + _sigmoid(v[:, :, 1])) / h
    bw = np.exp(v[:, :, 2]) * aw[None, :, None, None] / w
    bh = np.exp(v[:, :, 3]) * ah[None, :, None, None] / h
    return np.stack([cx, cy, bw, bh], axis=-1)


def class_probs(x, layer):
    """Class probabilities (B, num, classes, H, W), float64."""
    z = _split(x.astype(np.float64, copy=False), layer)[:, :, 5:]
    if layer["softmax"]:
        z = z - z.max(axis=2, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=2, keepdims=True)
    return _sigmoid(z)


def activate(x, layer):
    """What darknet's region layer outputs at inference: ``x`` with the
    logistic applied to tx, ty and objectness and the class scores turned
    into probabilities (:func:`class_probs`); tw, th unchanged. Computed in
    float64, returned in ``x``'s dtype."""
    v = _split(x.astype(np.float64), layer)
    v[:, :, [0, 1, 4]] = _sigmoid(v[:, :, [0, 1, 4]])
    v[:, :, 5:] = class_probs(x, layer)
    return v.reshape(x.shape).astype(x.dtype, copy=False)


def decode(x, layer):
    """Per image: (boxes (K, 4) cx cy w h, objectness (K,), class probs (K, classes))
    over every anchor and cell, in (anchor, row, column) order."""
    bx = boxes(x, layer)
    obj = _sigmoid(_split(x.astype(np.float64, copy=False), layer)[:, :, 4])
    probs = class_probs(x, layer)
    b, n, h, w, _ = bx.shape
    out = []
    for k in range(b):
        out.append((bx[k].reshape(n * h * w, 4), obj[k].reshape(n * h * w),
                    probs[k].transpose(0, 2, 3, 1).reshape(n * h * w, -1)))
    return out


def iou(a, b):
    """IoU of boxes ``cx, cy, w, h`` along the last axis (broadcasting), as darknet's ``box_iou``."""
    def overlap(c1, w1, c2, w2):
        lo = np.maximum(c1 - w1 / 2, c2 - w2 / 2)
        hi = np.minimum(c1 + w1 / 2, c2 + w2 / 2)
        return np.maximum(hi - lo, 0.0)
    inter = overlap(a[..., 0], a[..., 2], b[..., 0], b[..., 2]) * overlap(a[..., 1], a[..., 3], b[..., 1], b[..., 3])
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


@dataclass
class Targets:
    """What the loss pulls each prediction towards; arrays (B, num, H, W)
    unless noted. A weight of 0 means the term is absent."""
    coord_weight: np.ndarray
    coord_target: np.ndarray  # (B, num, 4, H, W): sig(tx), sig(ty), tw, th targets
    obj_weight: np.ndarray
    obj_target: np.ndarray
    cls_weight: np.ndarray
    cls_target: np.ndarray    # class index (int), meaningful where cls_weight > 0


def assign(x, truth, layer, seen=None):
    """The targets of a batch (darknet's forward_region_layer): see the module text."""
    bsz, _, h, w = x.shape
    n = layer["num"]
    truth = np.asarray(truth, dtype=np.float64).reshape(bsz, -1, 5)
    pred = boxes(x, layer)                                   # (B, n, H, W, 4)
    aw, ah = _anchors(layer)
    shape = (bsz, n, h, w)
    coord_w = np.zeros(shape)
    coord_t = np.zeros((bsz, n, 4, h, w))
    obj_w = np.full(shape, float(layer["noobject_scale"]))
    obj_t = np.zeros(shape)
    cls_w = np.zeros(shape)
    cls_t = np.zeros(shape, dtype=np.int64)
    valid = truth[:, :, 0] >= 0                              # (B, T)
    if valid.any():
        # 1. no objectness term where a prediction already overlaps a truth well
        ious = iou(pred[:, :, :, :, None, :], truth[:, None, None, None, :, 1:])
        best = np.where(valid[:, None, None, None, :], ious, 0.0).max(axis=-1)
        obj_w[best > layer["thresh"]] = 0.0
    if seen is not None and seen < PRIOR_IMAGES:
        coord_w[...] = PRIOR_SCALE
        coord_t[:, :, 0:2] = 0.5
    # 2. responsibility: in truth order, so that a later truth overwrites
    bs, ts = np.nonzero(valid)
    if len(bs):
        t = truth[bs, ts]                                    # (K, 5)
        cls, cx, cy, tw, th = t.T
        i = np.clip((cx * w).astype(np.int64), 0, w - 1)
        j = np.clip((cy * h).astype(np.int64), 0, h - 1)
        if layer["bias_match"]:
            sw, sh = np.broadcast_to(aw / w, (len(bs), n)), np.broadcast_to(ah / h, (len(bs), n))
        else:
            cell = pred[bs, :, j, i]                         # (K, n, 4)
            sw, sh = cell[..., 2], cell[..., 3]
        inter = np.minimum(sw, tw[:, None]) * np.minimum(sh, th[:, None])
        shape_iou = inter / (sw * sh + (tw * th)[:, None] - inter)
        best_n = shape_iou.argmax(axis=1)                    # first anchor on ties, as darknet's strict >
        slot = ((bs * n + best_n) * h + j) * w + i
        # keep the last truth of each slot (numpy does not promise an order for repeated indices)
        _, last_rev = np.unique(slot[::-1], return_index=True)
        keep = np.sort(len(slot) - 1 - last_rev)
        bs, best_n, j, i = bs[keep], best_n[keep], j[keep], i[keep]
        cls, cx, cy, tw, th = cls[keep], cx[keep], cy[keep], tw[keep], th[keep]
        at = (bs, best_n, j, i)
        coord_w[at] = layer["coord_scale"] * (2 - tw * th)
        coord_t[bs, best_n, 0, j, i] = cx * w - i
        coord_t[bs, best_n, 1, j, i] = cy * h - j
        coord_t[bs, best_n, 2, j, i] = np.log(tw * w / aw[best_n])
        coord_t[bs, best_n, 3, j, i] = np.log(th * h / ah[best_n])
        obj_w[at] = layer["object_scale"]
        if layer["rescore"]:
            obj_t[at] = iou(pred[at], np.stack([cx, cy, tw, th], axis=-1))
        else:
            obj_t[at] = 1.0
        cls_w[at] = layer["class_scale"]
        cls_t[at] = cls.astype(np.int64)
    return Targets(coord_w, coord_t, obj_w, obj_t, cls_w, cls_t)


def loss_and_grad(x, targets, layer):
    """(loss, dL/dx) of the loss in the module text for fixed ``targets``;
    computed in float64, the gradient returned in ``x``'s dtype."""
    bsz = x.shape[0]
    v = _split(x.astype(np.float64, copy=False), layer)
    g = np.zeros(v.shape)
    tg = targets
    # coordinates: x, y through the logistic, w, h raw
    sxy = _sigmoid(v[:, :, 0:2])
    d_xy = sxy - tg.coord_target[:, :, 0:2]
    d_wh = v[:, :, 2:4] - tg.coord_target[:, :, 2:4]
    cw = tg.coord_weight[:, :, None]
    loss = 0.5 * float(np.sum(cw * d_xy ** 2) + np.sum(cw * d_wh ** 2))
    g[:, :, 0:2] = cw * d_xy * sxy * (1 - sxy)
    g[:, :, 2:4] = cw * d_wh
    # objectness
    so = _sigmoid(v[:, :, 4])
    d_o = so - tg.obj_target
    loss += 0.5 * float(np.sum(tg.obj_weight * d_o ** 2))
    g[:, :, 4] = tg.obj_weight * d_o * so * (1 - so)
    # classes, on responsible predictions only
    z = v[:, :, 5:]                                          # (B, n, C, H, W)
    onehot = np.zeros(z.shape)
    np.put_along_axis(onehot, tg.cls_target[:, :, None], 1.0, axis=2)
    cwt = tg.cls_weight[:, :, None]
    if layer["softmax"]:
        zs = z - z.max(axis=2, keepdims=True)
        lse = np.log(np.exp(zs).sum(axis=2, keepdims=True))
        logp = zs - lse
        loss += float(np.sum(cwt * -(onehot * logp)))
        g[:, :, 5:] = cwt * (np.exp(logp) - onehot)
    else:
        # BCE(sig(z), t) = softplus(z) - t*z, written stably
        softplus = np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))
        loss += float(np.sum(cwt * (softplus - onehot * z)))
        g[:, :, 5:] = cwt * (_sigmoid(z) - onehot)
    return loss / bsz, (g / bsz).reshape(x.shape).astype(x.dtype, copy=False)


def forward(x, truth, layer, seen=None):
    """The region loss of a batch; returns (loss, dL/dx) like ``ops.sse``."""
    return loss_and_grad(x, assign(x, truth, layer, seen), layer)


def check(layer):
    """Error text for a malformed region layer dict (from a plan file or a socket), or None."""
    for key in ("classes", "num", "coords", "max_boxes"):
        v = layer[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            return f"{key} must be a positive integer, got {v!r}"
    for key in ("object_scale", "noobject_scale", "class_scale", "coord_scale", "thresh", "jitter"):
        v = layer[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            return f"{key} must be a finite number >= 0, got {v!r}"
    for key in ("softmax", "rescore", "bias_match"):
        if not isinstance(layer[key], bool):
            return f"{key} must be true or false, got {layer[key]!r}"
    if layer["coords"] != 4:
        return f"coords={layer['coords']}: only 4 is supported"
    anchors = layer["anchors"]
    if not isinstance(anchors, list) or len(anchors) != 2 * layer["num"]:
        return f"anchors must be a list of 2*num = {2 * layer['num']} numbers, got {anchors!r}"
    if not all(not isinstance(a, bool) and isinstance(a, (int, float)) and 0 < a < float("inf") for a in anchors):
        return f"anchors must be positive numbers, got {anchors!r}"
    c = layer["in_shape"][0]
    if c != layer["num"] * entries(layer):
        return (f"input has {c} channels, but num={layer['num']} x (4 coords + 1 + "
                f"{layer['classes']} classes) = {layer['num'] * entries(layer)}")
    return None
