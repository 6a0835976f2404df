"""The bundled models and ``load_model``: a bundled name, a .cfg or an .onnx path.

Bundled models live in ``tilec/models/`` (package data: ``*.cfg`` and
``*.onnx``), found next to this package so that an installed tilec finds
them too.
"""
import os
from pathlib import Path

from tilec.errors import TilecError

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
SUFFIXES = (".cfg", ".onnx")


def bundled_names():
    """The names of the bundled models, sorted (``tiny``, ``yolov2``, ...)."""
    return sorted(p.stem for p in MODELS_DIR.iterdir() if p.suffix in SUFFIXES)


def bundled_path(name):
    """The path of bundled model ``name`` (``small-cnn`` or ``small-cnn.onnx``);
    TilecError listing the names if unknown."""
    for path in (MODELS_DIR / name, *(MODELS_DIR / f"{name}{suffix}" for suffix in SUFFIXES)):
        if path.suffix in SUFFIXES and path.is_file():
            return path
    raise TilecError(f"unknown model {name!r}: not a .cfg or .onnx file and not a bundled model "
                     f"({', '.join(bundled_names())})")


def model_path(name_or_path):
    """The file a model argument names: an existing file, a path (with a
    separator), or else a bundled model (with or without its suffix)."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or os.sep in text or "/" in text or Path(text).is_file():
        return Path(text)
    if text.endswith(SUFFIXES) and not (MODELS_DIR / text).is_file():
        return Path(text)  # a file that is missing: its reader says so
    return bundled_path(text)


def is_onnx(name_or_path):
    """Whether a model argument names an ONNX file (whose initializers are its weights)."""
    return model_path(name_or_path).suffix == ".onnx"


def load_model(name_or_path, loss=None, default_loss=None, note=None):
    """A verified :class:`~tilec.ir.graph.Graph` from a bundled model name or
    a path to a .cfg or .onnx file.

    Parameters
    ----------
    name_or_path : str or Path
    loss : str, optional
        ``--loss`` (``softmax``, ``sse`` or ``region:FILE``): an ONNX file
        carries no loss. A .cfg has its own; giving one is an error.
    default_loss : str, optional
        For an ONNX file that names no loss (``tilec.frontend.onnx_import``):
        None makes that an error (training), ``"sse"`` keeps the model's
        own output (commands that do not train).
    note : callable, optional
        Called with a line saying so when ``default_loss`` was used.

    Raises
    ------
    ConfigError
        The file cannot be read or is malformed.
    TilecError
        An unknown name (the message lists the bundled ones).
    """
    path = model_path(name_or_path)
    if path.suffix == ".onnx":
        from tilec.frontend.onnx_import import DEFAULT_SOURCE, import_onnx
        imported = import_onnx(path, loss, default_loss)
        if note and imported.loss_from == DEFAULT_SOURCE:
            note(f"{path}: names no loss; using --loss {default_loss} (give --loss to choose)")
        return imported.graph
    if loss is not None:
        raise TilecError(f"{path}: --loss applies to .onnx models; a .cfg's loss is its last section")
    from tilec.frontend.cfg import parse_cfg
    return parse_cfg(path)
