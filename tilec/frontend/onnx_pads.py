"""ONNX padding onto tilec's: exactly, or not at all.

tilec's conv pads every border by one ``pad``; its maxpool pads a total of
``padding`` per axis, ``padding // 2`` at the top/left and the rest at the
bottom/right (darknet's), the same on both axes. ONNX gives four pads
(``[top, left, bottom, right]``), or ``auto_pad``, and for pooling
``ceil_mode``. A tilec layer computes exactly what the ONNX node does when
both start their windows at the same offset (the top/left pad) and produce
the same output size: padding at the bottom/right that no window reaches
changes nothing, so tilec may pad more or less there than ONNX does.

Examples
--------
>>> conv_pad((8, 8), 3, 1, [1, 1, 1, 1])
1
>>> conv_pad((8, 8), 3, 2, [0, 0, 1, 1]) is None   # TF-style "same", stride 2
True
>>> maxpool_padding((8, 8), 2, 1, [0, 0, 1, 1], ceil_mode=False)  # darknet's size=2 stride=1
1
>>> maxpool_padding((7, 7), 2, 2, [0, 0, 0, 0], ceil_mode=True)
1
"""


def auto_pads(auto_pad, size, kernel, stride):
    """(begin, end) padding of one axis under ONNX ``auto_pad``, or None for
    ``NOTSET`` (the ``pads`` attribute applies).

    ``SAME_UPPER`` puts the odd pixel at the end, ``SAME_LOWER`` at the
    beginning; both make the output ``ceil(size / stride)``.
    """
    if auto_pad == "NOTSET":
        return None
    if auto_pad == "VALID":
        return (0, 0)
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    small, big = total // 2, total - total // 2
    return (small, big) if auto_pad == "SAME_UPPER" else (big, small)


def onnx_out_size(size, kernel, stride, begin, end, ceil_mode=False):
    """Output size of an ONNX Conv or pooling window on one axis.

    With ``ceil_mode`` a last, partial window is kept unless it would start
    in the end padding (ONNX's rule since opset 19, torch's and
    onnxruntime's always).
    """
    span = size + begin + end - kernel
    if span < 0:
        return 0
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + begin:
        out -= 1
    return out


def conv_pad(sizes, kernel, stride, pads):
    """The tilec conv ``pad`` that computes what ONNX ``pads`` do on a map
    of ``sizes`` (H, W), or None when no single pad does."""
    top, left, bottom, right = pads
    if top != left:
        return None
    for size, end in zip(sizes, (bottom, right)):
        if size + 2 * top < kernel:
            return None
        if (size + 2 * top - kernel) // stride + 1 != onnx_out_size(size, kernel, stride, top, end):
            return None
    return top


def maxpool_padding(sizes, kernel, stride, pads, ceil_mode):
    """The tilec maxpool ``padding`` (total; ``padding // 2`` at the
    top/left) that computes what ONNX MaxPool does with ``pads`` and
    ``ceil_mode`` on a map of ``sizes`` (H, W), or None when none does.

    Padding is -inf for both, so only the window positions matter: the
    same top/left offset, the same output size, and no window entirely in
    the padding.
    """
    top, left, bottom, right = pads
    if top != left:
        return None
    # ONNX's own total first, when darknet's split gives the same top pad:
    # a model tilec exported comes back unchanged
    exact = [top + bottom] if bottom == right and (top + bottom) // 2 == top else []
    for total in exact + [2 * top, 2 * top + 1]:
        fits = True
        for size, end in zip(sizes, (bottom, right)):
            out = onnx_out_size(size, kernel, stride, top, end, ceil_mode)
            if size + total < kernel or out < 1 or (size + total - kernel) // stride + 1 != out \
                    or (out - 1) * stride - top > size - 1:
                fits = False
        if fits:
            return total
    return None
