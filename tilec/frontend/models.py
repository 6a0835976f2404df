"""The bundled models and ``load_model``: a bundled name or a .cfg path.

Bundled models live in ``tilec/models/*.cfg`` (package data), found next to
this package so that an installed tilec finds them too.
"""
import os
from pathlib import Path

from tilec.errors import TilecError

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def bundled_names():
    """The names of the bundled models, sorted (``tiny``, ``yolov2``, ...)."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.cfg"))


def bundled_path(name):
    """The path of bundled model ``name``; TilecError listing the names if unknown."""
    if name not in bundled_names():
        raise TilecError(f"unknown model {name!r}: not a .cfg file and not a bundled model "
                         f"({', '.join(bundled_names())})")
    return MODELS_DIR / f"{name}.cfg"


def load_model(name_or_path):
    """A verified :class:`~tilec.ir.graph.Graph` from a bundled model name or
    a path to a .cfg file.

    A name that is an existing file, or ends in ``.cfg``, or contains a path
    separator is read as a file; anything else must be a bundled name.

    Raises
    ------
    ConfigError
        The file cannot be read or is malformed.
    TilecError
        An unknown name (the message lists the bundled ones).
    """
    from tilec.frontend.cfg import parse_cfg

    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".cfg") or os.sep in text or "/" in text \
            or Path(text).is_file():
        return parse_cfg(Path(text))
    return parse_cfg(bundled_path(text))
