"""Render the kernel templates into Cython source.

The only user of Jinja2 in tilec. Templates live in ``templates/`` beside
this module, package data of the wheel (``TILEC_TEMPLATES`` overrides the
location), are rendered with ``StrictUndefined`` (a misspelt variable is an
error, not an empty string), and produce one module per dtype set: every
kernel family of ``FAMILIES``, once per dtype row of the table in
``module.pyx.j2``.
"""
import os
from pathlib import Path

import jinja2

from tilec.codegen.errors import CodegenError
from tilec_runtime.build_cache import digest
from tilec_runtime.kernel_set import FILTER_SPLIT_MIN

TEMPLATES_ENV = "TILEC_TEMPLATES"
MODULE_TEMPLATE = "module.pyx.j2"
# (the epilogue first: the conv backward makes gradients again with its helpers)
FAMILIES = ("epilogue.pyx.j2", "conv.pyx.j2", "pool.pyx.j2", "update.pyx.j2")
DTYPES = ("float32", "float64")
MODULE_PREFIX = "tilec_kernels_"


def templates_dir():
    env = os.environ.get(TEMPLATES_ENV)
    return Path(env) if env else Path(__file__).resolve().parent / "templates"


def environment():
    folder = templates_dir()
    if not (folder / MODULE_TEMPLATE).is_file():
        raise CodegenError(f"kernel templates not found in {folder} (set {TEMPLATES_ENV})")
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, autoescape=False)


def template_names():
    """Every template file, the module and its families."""
    return sorted(p.name for p in templates_dir().glob("*.j2"))


def render_module(dtypes=DTYPES, families=FAMILIES):
    """(module name, Cython source) of the kernel module for ``dtypes``.

    The name is derived from the source's hash: two different sources never
    share a name, so both can be loaded in one process.
    """
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        raise CodegenError(f"no kernels for dtype(s) {unknown or dtypes}; supported: {', '.join(DTYPES)}")
    try:
        source = environment().get_template(MODULE_TEMPLATE).render(
            dtypes=list(dtypes), families=list(families), filter_split_min=FILTER_SPLIT_MIN,
            source_note="templates: " + ", ".join((MODULE_TEMPLATE,) + tuple(families)))
    except jinja2.TemplateError as exc:
        where = f"{exc.filename}:{exc.lineno}: " if getattr(exc, "lineno", None) else ""
        raise CodegenError(f"rendering kernel templates: {where}{exc}") from exc
    return MODULE_PREFIX + digest(source)[:16], source
