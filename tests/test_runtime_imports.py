"""The runtime never unpickles and never needs the planner.

numpy itself imports ``pickle`` (for ``np.save``'s object arrays), so "not
imported" is checked on the runtime's own source, and "never used" by
training over sockets in processes where every unpickling entry point
raises.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parent.parent / "runtime"
MODULES = sorted(p.stem for p in RUNTIME.glob("*.py") if p.stem != "__init__")
# modules that unpickle (multiprocessing pickles everything it sends)
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "copyreg",
              "multiprocessing", "jsonpickle"}
PLANNER = {"tilec", "networkx", "ortools", "jinja2", "Cython", "yaml", "torch", "scipy", "onnx", "onnxruntime"}


def calls(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == name:
                yield node


@pytest.mark.parametrize("path", sorted(RUNTIME.glob("*.py")), ids=lambda p: p.name)
def test_runtime_source_imports_no_unpickler(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            names = [getattr(node.args[0], "value", "")] if node.args else []
        for name in names:
            assert name.split(".")[0] not in UNPICKLERS, f"runtime/{path.name}:{node.lineno} imports {name}"
    for call in calls(tree, "load"):
        if getattr(call.func.value, "id", None) in ("np", "numpy"):
            flags = {k.arg: getattr(k.value, "value", None) for k in call.keywords}
            assert flags.get("allow_pickle") is False, f"runtime/{path.name}:{call.lineno}: np.load without " \
                                                       "allow_pickle=False"


def test_runtime_modules_import_without_the_planner():
    code = ("import sys\n" + "".join(f"import tilec_runtime.{m}\n" for m in MODULES)
            + "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert not PLANNER & set(out.split())


POISON = """
import pickle, _pickle
def _refuse(*args, **kwargs):
    raise AssertionError("the runtime tried to unpickle")
for _m in (pickle, _pickle):
    _m.load = _m.loads = _refuse
    _m.Unpickler = _refuse
"""


def test_training_over_sockets_never_unpickles(tmp_path):
    """Launcher and workers with every unpickling entry point booby-trapped."""
    worker = POISON + "import runpy\nrunpy.run_module('tilec_runtime.worker', run_name='__main__', alter_sys=True)\n"
    launcher = POISON + f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from built import kernel_source
from test_transport import make_plan, small_program
from tilec_runtime import launch, weights
from tilec_runtime.data import generated_batches
program = small_program()
params, buffers = weights.init_params(program, 0, "float64")
batches = generated_batches(program, 2, 0, "float64")
key = "x" * 32
with launch.LocalWorkers(3, key, command=[sys.executable, "-c", {worker!r}]) as w:
    losses, *_ = launch.run_job(make_plan(program, 3, ring_min_bytes=0), w.addresses, key.encode(), params, buffers,
                                batches, steps=2, timeout=30, state_every=1, kernel_source=kernel_source("float64"))
    codes = w.stop()
print(len(losses), codes)
"""
    got = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert got.returncode == 0, got.stderr
    assert got.stdout.split("\n")[0] == "2 [0, 0, 0]"
    # the trap works: it would have caught an unpickle
    trapped = subprocess.run([sys.executable, "-c", POISON + "import pickle; pickle.loads(pickle.dumps(1))"],
                             capture_output=True, text=True)
    assert "tried to unpickle" in trapped.stderr
