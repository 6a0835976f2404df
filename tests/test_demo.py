"""The default demo (`tilec train` with no model) on a tiny configuration:
every output written, Ctrl-C leaves a checkpoint that resumes to the same
weights, and tiling over 2 devices learns what 1 device learns."""
import io
import json
import os
import signal

import numpy as np
import pytest

from tilec import demo
from tilec.cli import main
from tilec.data.synth import VERSION
from tilec.frontend.darknet_weights import read_darknet
from tilec.frontend.models import load_model
from tilec.progress import StepProgress
from tilec.train import TrainingInterrupted

TINY = dict(steps=4, images=16, batch=2, backend="inprocess", checkpoint_every=2)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "cache_dir", lambda: str(tmp_path / "cache"))  # the dataset cache
    monkeypatch.setenv("TILEC_PROFILE", "rpi3b")  # plan with a shipped profile: no measuring


def weights(run_dir):
    with np.load(run_dir / "weights.npz") as z:
        return {k: z[k] for k in z.files}


def test_demo_writes_every_output_and_resumes_after_an_interrupt(tmp_path, monkeypatch, capsys):
    out = io.StringIO()
    full = tmp_path / "full"
    result = demo.run_demo(demo.DemoConfig(**TINY), run_dir=str(full), out=out)
    text = out.getvalue()
    assert "making 16 synthetic images" in text and "images/s" in text and "ETA" in text
    for name in ("plan.json", "plan.dot", "timeline.png", "loss.png", "metrics.jsonl", "weights.npz",
                 "weights.weights", "eval.txt", "summary.txt", "summary.json", "checkpoint.npz"):
        assert (full / name).stat().st_size > 0, name
    steps = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r and "device" not in r] == [0, 1, 2, 3]
    assert steps[-1]["event"] == "eval" and 0 <= steps[-1]["map50"] <= 1
    assert result["map50"] == steps[-1]["map50"] and result["predicted_step_s"] > 0
    assert "validation mAP@0.5" in (full / "summary.txt").read_text()
    program = load_model("detector-small").to_program()
    from_darknet, _, header, _ = read_darknet(full / "weights.weights", program)
    assert header["seen"] == 8
    np.testing.assert_array_equal(from_darknet["0.conv.weight"], weights(full)["0.conv.weight"])
    # `tilec eval` and `tilec detect` on what the demo wrote, with either weights format
    data = tmp_path / "cache" / f"synth-v{VERSION}-n16-seed0"
    capsys.readouterr()
    assert main(["eval", "detector-small", "--weights", str(full / "weights.weights"), "--data", str(data)]) == 0
    assert f"mAP@0.5    {result['map50']:.4f}" in capsys.readouterr().out
    image = sorted((data / "images" / "val").iterdir())[0]
    assert main(["detect", "detector-small", str(image), "--weights", str(full / "weights.npz"), "--thresh", "0",
                 "--names", str(data / "classes.txt"), "-o", str(tmp_path / "boxes.png")]) == 0
    assert "objects; wrote" in capsys.readouterr().out and (tmp_path / "boxes.png").stat().st_size > 0
    assert main(["eval", "tiny", "--weights", "none.npz", "--data", str(data)]) == 1
    assert "ends in [softmax], not [region]: it is not a detector" in capsys.readouterr().err
    # the second run finds the dataset in the cache
    part = tmp_path / "part"
    original = StepProgress.__call__

    def ctrl_c_after_step_2(self, step, loss, seconds):
        original(self, step, loss, seconds)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends: the run ends after the step under way

    monkeypatch.setattr(StepProgress, "__call__", ctrl_c_after_step_2)
    out = io.StringIO()
    with pytest.raises(TrainingInterrupted):
        demo.run_demo(demo.DemoConfig(**TINY), run_dir=str(part), out=out)
    assert "(cached)" in out.getvalue()
    assert f"The checkpoint after step 2 is in {part}; continue with: tilec train --resume {part}" in out.getvalue()
    assert not (part / "weights.npz").exists()
    monkeypatch.setattr(StepProgress, "__call__", original)
    out = io.StringIO()
    demo.run_demo(resume=str(part), out=out)
    assert "resuming after step 2" in out.getvalue()
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_two_devices_learn_what_one_device_learns():
    out = io.StringIO()
    diff = demo.same_weights(steps=3, devices=2, batch=2, backend="inprocess", images=16, out=out)
    assert diff < 1e-9


def test_local_worker_processes_learn_what_one_device_learns():
    diff = demo.same_weights(steps=2, devices=2, batch=2, backend="local", images=16, out=io.StringIO())
    assert diff < 1e-9


def test_train_without_a_model_runs_the_demo(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda cfg=None, run_dir=None, resume=None: calls.append((cfg, run_dir,
                                                                                                    resume)))
    assert main(["train"]) == 0
    assert main(["train", "--backend", "inprocess", "--kernels", "reference", "--checkpoint", "runs/mine"]) == 0
    assert main(["train", "--resume", "runs/old"]) == 0
    assert calls[0] == (demo.DemoConfig(), None, None)
    assert calls[1] == (demo.DemoConfig(backend="inprocess", kernels="reference"), "runs/mine", None)
    assert calls[2] == (None, None, "runs/old")


def test_loss_curve(tmp_path):
    from PIL import Image

    from tilec.eval.curve import _log_ticks, _ticks, loss_curve_png, moving_average
    assert moving_average([1, 2, 3, 4], 2).tolist() == [1, 1.5, 2.5, 3.5]
    assert _ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    assert [round(10 ** t, 9) for t in _log_ticks(np.log10(0.8), np.log10(30))] == [1, 2, 5, 10, 20]
    loss_curve_png([30.0, float("nan"), 5.0, 2.0, 1.0], tmp_path / "a.png", markers=[(4, 0.6)])
    loss_curve_png([float("nan")], tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        with Image.open(tmp_path / name) as img:
            assert img.size == (720, 400)


def test_train_without_a_model_refuses_flags_the_demo_would_ignore(monkeypatch, capsys):
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    assert main(["train", "--batch", "4", "--lr", "0.1"]) == 1
    assert "--batch, --lr need a MODEL" in capsys.readouterr().err


def test_train_with_a_plan_and_no_model_trains_the_plans_model(tmp_path, monkeypatch, capsys):
    import tilec.train
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    assert main(["compile", "tiny", "--devices", "2", "--batch", "2", "-o", str(tmp_path / "p")]) == 0
    seen = []
    monkeypatch.setattr(tilec.train, "train", lambda graph, options: seen.append((graph.name, options.plan)) or
                        ([1.0], None, None))
    assert main(["train", "--plan", str(tmp_path / "p"), "--steps", "1"]) == 0
    assert seen[0][0] == "tiny" and seen[0][1]["batch"] == 2
    assert "train: tiny (the model" in capsys.readouterr().err
    from tilec.frontend.models import bundled_path
    (tmp_path / "mine.cfg").write_text(bundled_path("tiny").read_text())
    assert main(["compile", str(tmp_path / "mine.cfg"), "--devices", "2", "-o", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["train", "--plan", str(tmp_path / "q")]) == 1
    assert "give the model it was compiled for ('mine')" in capsys.readouterr().err
