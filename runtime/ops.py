"""Reference numpy kernels, forward and backward, on NCHW arrays.

Every spatial kernel works on a *region* of a map: the caller passes the
input rows/columns it has and the padding that applies at the real map
border (``pads = (top, bottom, left, right)``). A whole map is the region
with the layer's own padding; a tile is a region with padding only where it
touches the border. This is what makes tiled execution exact: padding is
never invented at a tile's edge.

Batch-norm statistics are accumulated in float64 whatever the data dtype, so
that combining per-device statistics does not lose precision.
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

LEAKY_SLOPE = 0.1
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def _windows(xp, k, stride, ho, wo):
    """(B, C, ho, wo, k, k) view of the k x k windows of a padded map."""
    v = sliding_window_view(xp, (k, k), axis=(2, 3))
    return v[:, :, : (ho - 1) * stride + 1 : stride, : (wo - 1) * stride + 1 : stride]


def out_size(n, k, stride, lo, hi):
    return (n + lo + hi - k) // stride + 1


def conv2d_forward(x, w, stride, pads):
    """Cross-correlation of a region ``x`` (B, C, h, w) with ``w`` (F, C, k, k).

    Rows beyond the last full window are ignored (their gradient is zero).
    """
    pt, pb, pl, pr = pads
    f, c, k, _ = w.shape
    b = x.shape[0]
    ho = out_size(x.shape[2], k, stride, pt, pb)
    wo = out_size(x.shape[3], k, stride, pl, pr)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))) if any(pads) else x
    cols = _windows(xp, k, stride, ho, wo).transpose(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * k * k)
    y = cols @ w.reshape(f, c * k * k).T
    return np.ascontiguousarray(y.reshape(b, ho, wo, f).transpose(0, 3, 1, 2))


def conv2d_backward(x, w, stride, pads, dy, dw=None, input_grad=True, weight_grad=True):
    """Gradients (dx, dw) of ``conv2d_forward`` for an output gradient ``dy``
    (with ``dw``, the weight gradient is added to it); without
    ``input_grad`` or ``weight_grad``, that one is not computed (None)."""
    pt, pb, pl, pr = pads
    f, c, k, _ = w.shape
    b, _, ho, wo = dy.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))) if any(pads) else x
    dy2 = dy.transpose(0, 2, 3, 1).reshape(b * ho * wo, f)
    if weight_grad:
        cols = _windows(xp, k, stride, ho, wo).transpose(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * k * k)
        grad = (dy2.T @ cols).reshape(w.shape)
        if dw is None:
            dw = grad
        else:
            dw += grad
    else:
        dw = None
    if not input_grad:
        return None, dw
    dcols = (dy2 @ w.reshape(f, c * k * k)).reshape(b, ho, wo, c, k, k)
    dxp = np.zeros(xp.shape, dtype=dy.dtype)
    span_h, span_w = (ho - 1) * stride + 1, (wo - 1) * stride + 1
    for i in range(k):
        for j in range(k):
            dxp[:, :, i : i + span_h : stride, j : j + span_w : stride] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, pt : pt + x.shape[2], pl : pl + x.shape[3]], dw


def maxpool_forward(x, size, stride, pads):
    """Max-pool with -inf padding; returns (y, argmax) where argmax is the
    index of the first maximum of each window in row-major order."""
    pt, pb, pl, pr = pads
    ho = out_size(x.shape[2], size, stride, pt, pb)
    wo = out_size(x.shape[3], size, stride, pl, pr)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=-np.inf) if any(pads) else x
    win = _windows(xp, size, stride, ho, wo).reshape(x.shape[0], x.shape[1], ho, wo, size * size)
    arg = win.argmax(axis=-1).astype(np.int16 if size * size < 32000 else np.int32)
    y = np.take_along_axis(win, arg[..., None].astype(np.intp), axis=-1)[..., 0]
    return y, arg


def maxpool_backward(x_shape, size, stride, pads, arg, dy):
    pt, pb, pl, pr = pads
    b, c, h, w = x_shape
    ho, wo = dy.shape[2], dy.shape[3]
    dxp = np.zeros((b, c, h + pt + pb, w + pl + pr), dtype=dy.dtype)
    span_h, span_w = (ho - 1) * stride + 1, (wo - 1) * stride + 1
    for i in range(size):
        for j in range(size):
            hit = arg == i * size + j
            if hit.any():
                dxp[:, :, i : i + span_h : stride, j : j + span_w : stride] += np.where(hit, dy, 0)
    return dxp[:, :, pt : pt + h, pl : pl + w]


def act_forward(z, kind):
    if kind == "linear":
        return z
    if kind == "leaky":
        return np.where(z > 0, z, z * z.dtype.type(LEAKY_SLOPE))
    if kind == "relu":
        return np.maximum(z, 0)
    raise ValueError(f"unknown activation {kind!r}")


def act_backward(y, kind, dy, inplace=False):
    """Gradient through an activation, from its *output* ``y`` (y > 0 iff z > 0);
    ``inplace``: into ``dy`` itself (the same numbers)."""
    if kind not in ("linear", "leaky", "relu"):
        raise ValueError(f"unknown activation {kind!r}")
    if kind == "linear":
        return dy
    if not inplace:
        if kind == "leaky":
            return np.where(y > 0, dy, dy * dy.dtype.type(LEAKY_SLOPE))
        return np.where(y > 0, dy, 0).astype(dy.dtype, copy=False)
    off = ~(y > 0)
    if kind == "leaky":
        np.multiply(dy, dy.dtype.type(LEAKY_SLOPE), out=dy, where=off)
    else:
        dy[off] = 0
    return dy


# -- batch norm -------------------------------------------------------------
# Statistics are triples (count, mean, m2) per channel, m2 the sum of squared
# deviations. Combining triples with Chan's formula is exact in exact
# arithmetic and stable in floating point, unlike a sum of squares.

def bn_stats(z):
    """(count, mean, m2) per channel of a region ``z`` (B, C, h, w), float64."""
    n = z.shape[0] * z.shape[2] * z.shape[3]
    if n == 0:
        zero = np.zeros(z.shape[1])
        return 0, zero, zero.copy()
    z64 = z.astype(np.float64, copy=False)
    mean = z64.mean(axis=(0, 2, 3))
    dev = z64 - mean[None, :, None, None]
    return n, mean, np.einsum("bchw,bchw->c", dev, dev)


def bn_combine(stats):
    """Chan's parallel combination of (count, mean, m2) triples, in order."""
    n, mean, m2 = 0, None, None
    for nb, mb, m2b in stats:
        if nb == 0:
            continue
        if n == 0:
            n, mean, m2 = nb, mb.copy(), m2b.copy()
            continue
        total = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta * delta * (n * nb / total)
        n = total
    return n, mean, m2


def bn_normalize(z, mean, var, gamma, beta):
    """Returns (y, xhat, inv_std); mean/var float64, cast to the data dtype."""
    dt = z.dtype
    inv_std = (1.0 / np.sqrt(var + BN_EPS)).astype(dt)
    xhat = (z - mean.astype(dt)[None, :, None, None]) * inv_std[None, :, None, None]
    y = xhat * gamma[None, :, None, None] + beta[None, :, None, None]
    return y, xhat, inv_std


def bn_update_running(running_mean, running_var, n, mean, m2):
    """In-place running-statistics update as torch's batch_norm(training=True)."""
    var_unbiased = m2 / max(n - 1, 1)
    running_mean *= 1 - BN_MOMENTUM
    running_mean += BN_MOMENTUM * mean.astype(running_mean.dtype)
    running_var *= 1 - BN_MOMENTUM
    running_var += BN_MOMENTUM * var_unbiased.astype(running_var.dtype)


def bn_grad_sums(dy, xhat):
    """Per-channel (sum dy, sum dy*xhat) over a region, float64: the two
    sums that batch-norm backward all-reduces (also d beta and d gamma)."""
    dy64 = dy.astype(np.float64, copy=False)
    return dy64.sum(axis=(0, 2, 3)), np.einsum("bchw,bchw->c", dy64, xhat.astype(np.float64, copy=False))


def bn_backward(dy, xhat, gamma, inv_std, mean_dy, mean_dy_xhat, owned=None, inplace=False):
    """dx = gamma/sigma * (dy - mean(dy) - xhat*mean(dy*xhat)).

    The mean terms are applied only on ``owned`` (a (row-slice, col-slice)
    pair of the region, or None for all of it): summing partial gradients
    across devices then applies them exactly once per position.
    ``inplace``: into ``dy`` itself (the same numbers).
    """
    dt = dy.dtype
    scale = (gamma * inv_std)[None, :, None, None]
    m1 = mean_dy.astype(dt)[None, :, None, None]
    m2 = mean_dy_xhat.astype(dt)[None, :, None, None]
    # one order of operations for whole maps and tiles alike, so that one
    # tile covering the map gives bit-identical numbers
    rs, cs = owned if owned is not None else (slice(None), slice(None))
    dx = dy if inplace else dy.copy()
    dx[:, :, rs, cs] -= m1 + xhat[:, :, rs, cs] * m2
    dx *= scale
    return dx


# -- the layers after the spatial prefix -----------------------------------

def avgpool_forward(x):
    return x.mean(axis=(2, 3), keepdims=True)


def avgpool_backward(x_shape, dy):
    h, w = x_shape[2], x_shape[3]
    return np.broadcast_to(dy / dy.dtype.type(h * w), x_shape).copy()


def _avg_divisor(h, w, size, stride, pads, count_pad, dtype):
    """Per output position, the number of cells a window averages: ``size²``
    with ``count_pad`` (every window lies inside the padded map), else the
    cells inside the map (ONNX's count_include_pad=0, AlexeyAB darknet's
    local_avgpool): the window sums of the padded map of ones."""
    if count_pad:
        return dtype.type(size * size)
    pt, pb, pl, pr = pads
    ho, wo = out_size(h, size, stride, pt, pb), out_size(w, size, stride, pl, pr)
    inside = np.pad(np.ones((1, 1, h, w), dtype), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    return _windows(inside, size, stride, ho, wo).sum(axis=(4, 5))[0, 0]


def local_avgpool_forward(x, size, stride, pads, count_pad):
    """Average pooling over ``size`` x ``size`` windows with zero padding
    ``pads`` (top, bottom, left, right); see :func:`_avg_divisor`."""
    pt, pb, pl, pr = pads
    h, w = x.shape[2], x.shape[3]
    ho, wo = out_size(h, size, stride, pt, pb), out_size(w, size, stride, pl, pr)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))) if any(pads) else x
    return _windows(xp, size, stride, ho, wo).sum(axis=(4, 5)) / _avg_divisor(h, w, size, stride, pads, count_pad,
                                                                                x.dtype)


def local_avgpool_backward(x_shape, size, stride, pads, count_pad, dy):
    pt, pb, pl, pr = pads
    b, c, h, w = x_shape
    g = dy / _avg_divisor(h, w, size, stride, pads, count_pad, dy.dtype)
    dxp = np.zeros((b, c, h + pt + pb, w + pl + pr), dtype=dy.dtype)
    span_h, span_w = (dy.shape[2] - 1) * stride + 1, (dy.shape[3] - 1) * stride + 1
    for i in range(size):
        for j in range(size):
            dxp[:, :, i:i + span_h:stride, j:j + span_w:stride] += g
    return dxp[:, :, pt:pt + h, pl:pl + w]


def connected_forward(x, w, b):
    return x.reshape(x.shape[0], -1) @ w.T + b


def connected_backward(x, w, dy):
    """Returns (dx shaped like x, dw, db) for ``dy`` of shape (B, out)."""
    x2 = x.reshape(x.shape[0], -1)
    return (dy @ w).reshape(x.shape), dy.T @ x2, dy.sum(axis=0)


def log_softmax(logits):
    """Log-probabilities over each image's values (darknet's [softmax], groups=1)."""
    z = logits.reshape(logits.shape[0], -1)
    z = z - z.max(axis=1, keepdims=True)
    return (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).reshape(logits.shape)


def softmax_xent(logits, labels):
    """Mean cross-entropy of (B, K) logits against integer labels; (loss, dlogits)."""
    b = logits.shape[0]
    logp = log_softmax(logits.reshape(b, -1))
    loss = -logp[np.arange(b), labels].mean()
    grad = np.exp(logp)
    grad[np.arange(b), labels] -= 1
    return float(loss), (grad / b).reshape(logits.shape).astype(logits.dtype, copy=False)


def sse(y, t):
    """L = (1/B) * sum 0.5 (y - t)^2; (loss, dy)."""
    b = y.shape[0]
    d = y - t
    return float(0.5 * np.sum(d.astype(np.float64) ** 2) / b), d / y.dtype.type(b)


# Every reorg order is one transpose of a 6-d view; each axis tuple maps the
# input view's axes to the output's, and backward applies its inverse.
_REORG_AXES = {"space_to_depth": (0, 1, 3, 5, 2, 4), "onnx": (0, 3, 5, 1, 2, 4), "darknet": (0, 3, 5, 1, 2, 4)}


def _reorg_view(shape, s, order):
    """The 6-d view of a reorg input (B, C, H, W) that the transpose permutes."""
    b, c, h, w = shape
    if order in ("space_to_depth", "onnx"):
        return (b, c, h // s, s, w // s, s)
    if order == "darknet":
        # darknet indexes its (C, H, W) input as if it were (C/s², H*s, W*s)
        return (b, c // (s * s), h, s, w, s)
    raise ValueError(f"reorg: unknown order {order!r}")


def _permute(x, s, order, shape, inverse):
    """Reorg's permutation of the data of an input of ``shape`` (B, C, H, W),
    or its inverse, applied to ``x`` (flat per image; the caller reshapes)."""
    axes = _REORG_AXES[order]
    view = _reorg_view(shape, s, order)
    if not inverse:
        return x.reshape(view).transpose(axes)
    return x.reshape(tuple(view[a] for a in axes)).transpose(np.argsort(axes))


def reorg_shape(shape, s, reverse=False):
    """The output shape of a reorg of ``shape`` (B, C, H, W)."""
    b, c, h, w = shape
    return (b, c // (s * s), h * s, w * s) if reverse else (b, c * s * s, h // s, w // s)


def reorg_forward(x, s, order, reverse=False):
    """Reorg with stride ``s``: (B, C, H, W) -> (B, C*s*s, H/s, W/s), or with
    ``reverse`` -> (B, C/s², H*s, W*s).

    ``order="space_to_depth"``: output channel ``(c*s + dy)*s + dx`` at
    (i, j) is input (c, i*s + dy, j*s + dx): torch's pixel_unshuffle (the
    inverse of ONNX DepthToSpace in CRD mode).

    ``order="onnx"``: ONNX SpaceToDepth, blocks first: output channel
    ``(dy*s + dx)*C + c`` at (i, j) is input (c, i*s + dy, j*s + dx) (the
    inverse of DepthToSpace in DCR mode). It equals ``space_to_depth`` only
    for C = 1.

    ``order="darknet"``: darknet's ``reorg_cpu`` (forward, not reversed),
    which YOLOv2's weights were trained with. Per image it is a permutation
    of the flat (C, H, W) data: output flat index ``i + W*(j + H*k)`` (k < C,
    j < H, i < W: input extents) takes input flat index
    ``w2 + W*s*(h2 + H*s*c2)`` with ``c2 = k mod C/s²``, ``o = k div C/s²``,
    ``w2 = i*s + o mod s``, ``h2 = j*s + o div s``; the result is then read
    as (C*s*s, H/s, W/s). Not a space-to-depth: it needs ``C`` divisible by
    ``s*s``.

    ``reverse`` (``space_to_depth`` and ``onnx``): depth-to-space, the
    inverse of the reorg whose output has this input's shape: torch's
    pixel_shuffle and ONNX DepthToSpace CRD, and ONNX DepthToSpace DCR,
    which is also darknet's ``[reorg] reverse=1`` (``reorg_cpu`` with
    forward=1 on the layer's own C, H, W gives exactly DCR's order).
    """
    out = reorg_shape(x.shape, s, reverse)
    return _permute(x, s, order, out if reverse else x.shape, reverse).reshape(out)


def reorg_backward(dy, s, order, reverse=False):
    """The gradient of :func:`reorg_forward`: the inverse permutation."""
    in_shape = reorg_shape(dy.shape, s, not reverse)
    return _permute(dy, s, order, dy.shape if reverse else in_shape, not reverse).reshape(in_shape)
