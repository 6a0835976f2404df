"""The pipeline flows one way: each stage imports only the stages before it.

Checked on the source (every import statement, including those inside
functions), so a lazy import cannot hide a backwards dependency.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# stage -> the tilec stages it may import (tilec.errors is always allowed)
STAGES = {
    "ir": set(),
    "frontend": {"ir"},
    "analysis": {"ir"},  # FLOPs as tilec.ir.stats counts them
    "profiles": set(),
    "cost": {"analysis", "ir", "profiles"},
    "plan": {"analysis"},
    "solve": {"analysis", "cost", "plan", "profiles"},
    "codegen": {"analysis", "plan"},
    "inspect": {"ir", "analysis", "cost", "plan", "profiles"},
    "export": set(),
    # beside the pipeline: datasets in (images and labels, for the runtime's
    # loss), detection quality out (a model and its weights, from frontend)
    "data": set(),
    "eval": {"data", "frontend"},
    # the training loop's helpers: the runtime's backends, the progress line
    "backends": set(),
    "progress": set(),
}
# modules that compose the stages may import any of them (demo: the
# detection demo, plan + train + eval on a synthetic dataset)
COMPOSITION = {"cli", "commands", "compile", "train", "cluster", "profile_measure", "profile_calibrate", "demo", "__init__",
               "errors"}
# leaf modules every stage may import
SHARED = {"errors", "debug"}
# third-party packages that only one stage may import
EXCLUSIVE = {"networkx": {"ir"}, "ortools": {"solve"}, "jinja2": {"codegen"}, "Cython": {"codegen"},
             "matplotlib": {"inspect", "commands"}, "onnx": {"frontend", "export"}, "PIL": {"data", "eval"},
             "tqdm": {"progress"}}
RUNTIME_ALLOWED_THIRD_PARTY = {"numpy"}
FORBIDDEN_EVERYWHERE = {"pickle", "cPickle", "dill", "marshal", "shelve"}


def imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def stage_of(path):
    rel = path.relative_to(ROOT / "tilec").parts
    return rel[0] if len(rel) > 1 else rel[0][:-3]


def planner_files():
    return sorted((ROOT / "tilec").rglob("*.py"))


@pytest.mark.parametrize("path", planner_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_planner_stage_imports_only_earlier_stages(path):
    stage = stage_of(path)
    for name in imports(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN_EVERYWHERE, f"{path.name} imports {name}"
        if top in EXCLUSIVE:
            assert stage in EXCLUSIVE[top] or stage in COMPOSITION - {"__init__", "errors"}, \
                f"{path.relative_to(ROOT)} imports {name}, reserved for {EXCLUSIVE[top]}"
        if top == "tilec" and stage in STAGES:
            parts = name.split(".")
            if len(parts) > 1 and parts[1] not in SHARED and parts[1] != stage:
                assert parts[1] in STAGES[stage], f"stage {stage} ({path.name}) imports {name}"


def test_every_planner_module_has_a_rule():
    """A new module or package is a stage (with the stages it may import),
    a composition module or a shared leaf; none goes unchecked."""
    unruled = sorted({stage_of(p) for p in planner_files()} - set(STAGES) - COMPOSITION - SHARED)
    assert unruled == []


@pytest.mark.parametrize("path", sorted((ROOT / "runtime").rglob("*.py")), ids=lambda p: p.name)
def test_runtime_needs_only_numpy_and_the_standard_library(path):
    stdlib = set(sys.stdlib_module_names)
    for name in imports(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN_EVERYWHERE, f"runtime/{path.name} imports {name}"
        assert top in stdlib or top in RUNTIME_ALLOWED_THIRD_PARTY or top == "tilec_runtime", \
            f"runtime/{path.name} imports {name}"


def _loaded_after(statement):
    code = f"import sys; {statement}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_tilec_is_light():
    loaded = _loaded_after("import tilec, tilec.cli")
    for heavy in ("networkx", "ortools", "jinja2", "Cython", "matplotlib", "torch", "yaml", "onnx", "onnxruntime"):
        assert heavy not in loaded, heavy


def test_runtime_imports_without_the_planner():
    loaded = _loaded_after("import tilec_runtime.executor, tilec_runtime.inprocess, tilec_runtime.planfile, "
                           "tilec_runtime.worker")
    assert "tilec" not in loaded and "networkx" not in loaded
