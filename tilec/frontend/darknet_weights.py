"""darknet's ``.weights`` files, read and written in tilec's parameter keys.

Layout (darknet's ``save_weights``/``load_weights``), little-endian:

- header: int32 ``major``, ``minor``, ``revision``, then ``seen`` (images
  trained on): uint64 when ``major*10 + minor >= 2`` (darknet writes 0.2.0),
  int32 for older files;
- then, for every convolutional and connected layer in order, float32:
  conv: ``biases`` (F) [with batch norm: ``scales`` (F), ``rolling_mean``
  (F), ``rolling_variance`` (F)], ``weights`` (F, C, k, k); connected:
  ``biases`` (out), ``weights`` (out, in) (stored transposed when ``major``
  or ``minor`` exceeds 1000).

darknet's batch-norm ``biases`` are tilec's beta (``{i}.bn.bias``), its
``scales`` gamma (``{i}.bn.weight``). A file may stop at a layer boundary
(darknet's ``*.conv.23`` backbones): the layers it covers are loaded and the
rest keep their initial values; stopping inside a layer, or bytes left after
the last layer, is an error naming the layer. darknet normalises with eps
1e-6, tilec with 1e-5: the same weights give slightly different activations
where a channel's variance is tiny.
"""
import os

import numpy as np

from tilec.errors import WeightsError
from tilec_runtime.files import atomic_open
from tilec_runtime.program import buffer_shapes, param_shapes

VERSION = (0, 2, 0)
"""The header written: darknet's own (``seen`` as uint64)."""


def _layer_arrays(layer):
    """[(key, shape)] of a layer in darknet's file order (empty for layers without weights)."""
    i, kind = layer["index"], layer["kind"]
    shapes = {**param_shapes(layer), **buffer_shapes(layer)}
    if kind == "conv":
        keys = ([f"{i}.bn.bias", f"{i}.bn.weight", f"{i}.bn.running_mean", f"{i}.bn.running_var"]
                if layer["bn"] else [f"{i}.conv.bias"]) + [f"{i}.conv.weight"]
    elif kind == "connected":
        keys = [f"{i}.fc.bias", f"{i}.fc.weight"]
    else:
        return []
    return [(k, shapes[k]) for k in keys]


def read_header(f, path):
    head = np.fromfile(f, dtype="<i4", count=3)
    if head.size != 3:
        raise WeightsError(f"{path}: too short for a darknet .weights header")
    major, minor, revision = (int(v) for v in head)
    wide = major * 10 + minor >= 2 and major < 1000 and minor < 1000
    seen = np.fromfile(f, dtype="<u8" if wide else "<i4", count=1)
    if seen.size != 1:
        raise WeightsError(f"{path}: too short for a darknet .weights header")
    return {"major": major, "minor": minor, "revision": revision, "seen": int(seen[0]),
            "transpose": major > 1000 or minor > 1000}


def read_darknet(path, program, dtype="float32", params=None, buffers=None):
    """Load a ``.weights`` file into ``params``/``buffers`` (dicts updated in
    place; new ones when None). Returns (params, buffers, header, layers
    loaded) where header has ``major, minor, revision, seen``."""
    params = {} if params is None else params
    buffers = {} if buffers is None else buffers
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights: {exc.strerror}") from None
    with f:
        header = read_header(f, path)
        size = os.fstat(f.fileno()).st_size
        loaded = 0
        for layer in program:
            arrays = _layer_arrays(layer)
            if not arrays:
                continue
            if f.tell() == size:
                break  # a backbone file: the rest keep their values
            need = sum(int(np.prod(shape)) for _, shape in arrays) * 4
            if size - f.tell() < need:
                raise WeightsError(f"{path}: ends inside layer {layer['index']} ({layer['kind']}): it needs "
                                   f"{need} bytes, {size - f.tell()} are left (is it for this model?)")
            for key, shape in arrays:
                values = np.fromfile(f, dtype="<f4", count=int(np.prod(shape)))
                if layer["kind"] == "connected" and key.endswith(".fc.weight") and header["transpose"]:
                    values = values.reshape(shape[1], shape[0]).T
                target = buffers if ".running_" in key else params
                target[key] = values.reshape(shape).astype(dtype)
            loaded += 1
        left = size - f.tell()
        if left:
            raise WeightsError(f"{path}: {left} bytes left after the model's last layer with weights "
                               "(is it for this model?)")
    return params, buffers, header, loaded


def write_darknet(path, program, params, buffers, seen=0):
    """Write every conv/connected layer of ``program`` to ``path`` (atomically)."""
    with atomic_open(path) as f:
        np.array(VERSION, dtype="<i4").tofile(f)
        np.array([seen], dtype="<u8").tofile(f)
        for layer in program:
            for key, shape in _layer_arrays(layer):
                source = buffers if ".running_" in key else params
                if key not in source:
                    raise WeightsError(f"no {key!r} to write (shape {tuple(shape)})")
                np.ascontiguousarray(source[key], dtype="<f4").reshape(-1).tofile(f)


def load_any(path, program, dtype="float32", seed=0):
    """(params, buffers) from an ``.npz`` (every key required), a darknet
    ``.weights`` file (layers it does not cover start from ``seed``'s init)
    or an ``.onnx`` model's initializers (every key required)."""
    from tilec_runtime import weights as rweights

    if str(path).endswith(".onnx"):
        from tilec.frontend.onnx_import import onnx_weights
        return rweights.from_arrays(onnx_weights(path), program, dtype, path)
    if str(path).endswith(".weights"):
        params, buffers = rweights.init_params(program, seed, dtype)
        read_darknet(path, program, dtype, params, buffers)
        return params, buffers
    return rweights.load_weights(path, program, dtype)
