"""Parameters: deterministic initialisation and the ``.npz`` interchange format.

Keys are those of a PyTorch state dict of modules named by layer index
(``"3.conv.weight"``, ``"3.bn.running_var"``, ``"9.fc.bias"``), so weights
move both ways between tilec and PyTorch.
"""

import numpy as np

from tilec_runtime.errors import WeightsError
from tilec_runtime.files import atomic_savez
from tilec_runtime.npzfile import load_npz
from tilec_runtime.program import buffer_shapes, param_shapes


def init_params(program, seed, dtype="float32"):
    """(params, buffers) initialised from ``seed`` alone.

    Conv and connected weights are He-normal (fan-in), biases and beta zero,
    gamma one, running mean 0 and running variance 1. Each layer draws from
    its own stream, so adding a layer does not change the others.
    """
    dtype = np.dtype(dtype)
    params, buffers = {}, {}
    for layer in program:
        rng = np.random.default_rng([seed, layer["index"]])
        for key, shape in param_shapes(layer).items():
            if key.endswith(".weight") and (".conv." in key or ".fc." in key):
                fan_in = int(np.prod(shape[1:]))
                params[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
            elif key.endswith(".bn.weight"):
                params[key] = np.ones(shape, dtype)
            else:
                params[key] = np.zeros(shape, dtype)
        for key, shape in buffer_shapes(layer).items():
            buffers[key] = (np.zeros if key.endswith("running_mean") else np.ones)(shape, dtype)
    return params, buffers


def load_weights(path, program, dtype="float32"):
    """(params, buffers) from an .npz file, checked against the program."""
    return from_arrays(load_npz(path, WeightsError, "weights"), program, dtype, path)


def from_arrays(arrays, program, dtype, path):
    """(params, buffers) from ``{key: array}``, checked against the program:
    every key present with its shape, no key the model lacks (``path``
    names the source in errors)."""
    dtype = np.dtype(dtype)
    params, buffers = {}, {}
    for layer in program:
        for out, shapes in ((params, param_shapes(layer)), (buffers, buffer_shapes(layer))):
            for key, shape in shapes.items():
                if key not in arrays:
                    raise WeightsError(f"{path}: missing parameter {key!r} (shape {tuple(shape)})")
                if arrays[key].shape != tuple(shape):
                    raise WeightsError(f"{path}: parameter {key!r} has shape {arrays[key].shape}, "
                                       f"the model needs {tuple(shape)}")
                out[key] = arrays[key].astype(dtype)
    expected = {k for layer in program for k in (*param_shapes(layer), *buffer_shapes(layer))}
    # torch's BatchNorm2d state dict also counts batches; tilec has no use for it
    extra = sorted(k for k in set(arrays) - expected if not k.endswith(".bn.num_batches_tracked"))
    if extra:
        raise WeightsError(f"{path}: unexpected parameter {extra[0]!r} (not in the model)")
    return params, buffers


def save_weights(path, params, buffers):
    atomic_savez(path, {**params, **buffers})
