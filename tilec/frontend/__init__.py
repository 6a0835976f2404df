"""Frontends: model descriptions (.cfg files, the Python builder, ONNX) to the IR.

The names below load lazily, so that ``import tilec.frontend`` (say, to list
the bundled models) does not import networkx.
"""
import importlib

_EXPORTS = {"parse_cfg": "tilec.frontend.cfg", "Model": "tilec.frontend.builder",
            "load_model": "tilec.frontend.models", "bundled_names": "tilec.frontend.models",
            "import_onnx": "tilec.frontend.onnx_import"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
