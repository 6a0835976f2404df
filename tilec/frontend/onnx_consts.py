"""Constant folding of the shape arithmetic that ONNX exporters emit.

``x.view(x.size(0), -1)`` exports as ``Shape -> Gather -> Unsqueeze ->
Concat -> Reshape``: the target shape is computed at run time from the
input's (dynamic) batch size. tilec's importer only needs to know that the
result is "batch, then everything else", so the batch size is carried
through these nodes as the marker :data:`BATCH`. Only data-moving ops are
folded (no arithmetic), so the marker can only be moved, never changed;
``Reshape`` reads it as "the batch dimension".
"""
import numpy as np

BATCH = np.int64(-(2 ** 62))
"""Stands for the batch size in folded shape tensors."""

FOLDABLE = ("Constant", "Identity", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast")


def _axes(node, attrs, consts, opset):
    """The ``axes`` of Squeeze/Unsqueeze: an attribute before opset 13, an input since."""
    if opset < 13:
        return attrs.get("axes")
    if len(node.input) > 1 and node.input[1]:
        return [int(a) for a in np.asarray(consts[node.input[1]]).reshape(-1)]
    return None


def fold(node, attrs, consts, opset, shape_of=None):
    """The output of a foldable ``node`` whose inputs are all constants.

    Parameters
    ----------
    node : onnx.NodeProto
    attrs : dict
        Its attributes (name -> value).
    consts : dict
        Known constant tensors by name.
    opset : int
    shape_of : callable, optional
        ``name -> list of int`` for ``Shape`` of a computed tensor (the batch
        dimension as :data:`BATCH`).

    Returns
    -------
    numpy.ndarray

    Raises
    ------
    ValueError
        The node cannot be folded; the text says why.
    """
    from onnx import helper, numpy_helper

    op = node.op_type
    if op == "Constant":
        if "value" in attrs:
            return numpy_helper.to_array(attrs["value"])
        for key in ("value_float", "value_floats", "value_int", "value_ints"):
            if key in attrs:
                return np.asarray(attrs[key], dtype=np.float32 if "float" in key else np.int64)
        raise ValueError(f"only value, value_float(s) and value_int(s) are supported, got {sorted(attrs)}")
    if op == "Shape":
        shape = np.asarray(shape_of(node.input[0]), dtype=np.int64)
        return shape[attrs.get("start", 0):attrs.get("end", len(shape))]
    data = consts[node.input[0]]
    if op == "Identity":
        return data
    if op == "Gather":
        return np.take(data, consts[node.input[1]], axis=attrs.get("axis", 0))
    if op == "Unsqueeze":
        axes = _axes(node, attrs, consts, opset)
        rank = data.ndim + len(axes)
        for axis in sorted(a % rank for a in axes):
            data = np.expand_dims(data, axis)
        return data
    if op == "Squeeze":
        axes = _axes(node, attrs, consts, opset)
        return np.squeeze(data, axis=None if axes is None else tuple(axes))
    if op == "Concat":
        return np.concatenate([np.atleast_1d(consts[name]) for name in node.input], axis=attrs["axis"])
    if op == "Cast":
        to = helper.tensor_dtype_to_np_dtype(attrs["to"])
        if np.any(data == BATCH) and to != np.int64:
            raise ValueError(f"a cast of the batch size to {np.dtype(to).name}")
        return data.astype(to)
    raise ValueError(f"{op} is not foldable")  # unreachable: callers check FOLDABLE
