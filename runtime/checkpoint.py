"""Checkpoints: the whole training state in one file, replaced atomically.

``DIR/checkpoint.npz`` holds every parameter (``param/KEY``), batch-norm
buffer (``buffer/KEY``) and momentum buffer (``momentum/KEY``), and a
``meta`` entry: UTF-8 JSON (as uint8) with the number of steps done (the
data position: step k reads batch k), the model, dtype, optimiser and a
hash of the program. It is written to a temporary file, fsynced, renamed
over the old one and the directory fsynced, so a crash at any moment
leaves either the old checkpoint or the new one, never half of one.

The state is that of the model, not of a plan: a run may resume on a
different number of devices (re-planned) and end with the same weights.
"""
import hashlib
import json
import os
from typing import NamedTuple

import numpy as np

from tilec_runtime.errors import RuntimeFault
from tilec_runtime.files import atomic_savez
from tilec_runtime.npzfile import load_npz
from tilec_runtime.program import buffer_shapes, param_shapes

FORMAT = "tilec-checkpoint"
VERSION = 1
FILENAME = "checkpoint.npz"
SECTIONS = ("param", "buffer", "momentum")


class CheckpointError(RuntimeFault):
    """A checkpoint is missing, unreadable, or for another model."""


class Checkpoint(NamedTuple):
    step: int  # steps done; training resumes at this step
    params: dict
    buffers: dict
    momentum: dict
    meta: dict


def program_hash(program):
    return hashlib.sha256(json.dumps(program, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def save(directory, step, params, buffers, momentum, **meta):
    """Write ``directory/checkpoint.npz`` atomically; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, FILENAME)
    info = {"format": FORMAT, "version": VERSION, "step": int(step), **meta}
    arrays = {"meta": np.frombuffer(json.dumps(info, sort_keys=True).encode(), np.uint8)}
    for section, values in zip(SECTIONS, (params, buffers, momentum or {})):
        arrays.update({f"{section}/{k}": np.asarray(v) for k, v in values.items()})
    atomic_savez(path, arrays, sync_dir=True)  # the rename itself survives a power cut
    return path


def load(directory, program=None, dtype=None):
    """The checkpoint in ``directory`` (or a checkpoint file). With
    ``program``, every array is checked against the model's shapes and the
    program hash must match; with ``dtype`` arrays are converted."""
    path = os.path.join(directory, FILENAME) if os.path.isdir(directory) else directory
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    arrays = load_npz(path, CheckpointError, "checkpoint")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (KeyError, UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path}: no readable 'meta' entry") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: not a {FORMAT} version {VERSION} file")
    sections = {s: {} for s in SECTIONS}
    for name, array in arrays.items():
        section, _, key = name.partition("/")
        if section not in sections:
            raise CheckpointError(f"{path}: unexpected entry {name!r}")
        sections[section][key] = array if dtype is None else array.astype(dtype)
    if program is not None:
        _check(path, meta, sections, program)
    return Checkpoint(int(meta["step"]), sections["param"], sections["buffer"], sections["momentum"], meta)


def _check(path, meta, sections, program):
    if meta.get("program") != program_hash(program):
        raise CheckpointError(f"{path}: made for another model ({meta.get('model')!r}, program differs)")
    want = {"param": {}, "buffer": {}}
    for layer in program:
        want["param"].update(param_shapes(layer))
        want["buffer"].update(buffer_shapes(layer))
    want["momentum"] = want["param"]
    for section in SECTIONS:
        got = sections[section]
        for key, shape in want[section].items():
            if key not in got:
                if section == "momentum":
                    continue  # no gradient reached it yet
                raise CheckpointError(f"{path}: missing {section} {key!r}")
            if got[key].shape != tuple(shape):
                raise CheckpointError(f"{path}: {section} {key!r} has shape {got[key].shape}, expected {tuple(shape)}")
        extra = sorted(set(got) - set(want[section]))
        if extra:
            raise CheckpointError(f"{path}: unexpected {section} {extra[0]!r}")
