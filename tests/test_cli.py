"""The command line as a user runs it: outputs, files, and one-line errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tilec.cli import main


def run_cli(*args):
    """Run `tilec` in a subprocess; returns (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "tilec.cli", *args], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_bad_cfg_is_one_line_with_file_and_line(tmp_path):
    cfg = tmp_path / "bad.cfg"
    cfg.write_text("[net]\nheight=8\nwidth=8\nchannels=1\n\n[convolutional]\nfilters=2\nsize=3\nactivation=tanh\n")
    rc, out, err = run_cli("info", str(cfg))
    assert rc == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{cfg}:9" in err and "[convolutional]" in err and "tanh" in err


def test_unknown_model_lists_the_bundled_ones():
    rc, _, err = run_cli("train", "no-such-model")
    assert rc == 1 and "tiny" in err and "yolov2" in err and "Traceback" not in err


def test_train_writes_metrics_and_weights_and_resumes_from_them(tmp_path, capsys):
    def losses(path):
        return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}

    common = ["train", "tiny", "--batch", "2"]  # 4 generated batches: step 4 sees step 0's again
    m, w, ck = tmp_path / "m.jsonl", tmp_path / "w.npz", tmp_path / "ck"
    assert main([*common, "--steps", "4", "--metrics", str(m), "--save-weights", str(w), "--checkpoint", str(ck)]) == 0
    records = [json.loads(line) for line in m.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["step_s"] > 0 for r in records)
    with np.load(w) as z:
        assert "0.conv.weight" in z.files and "0.bn.running_var" in z.files
    # resumed from the checkpoint: steps 4 and 5, as an uninterrupted run has them
    resumed, whole = tmp_path / "resumed.jsonl", tmp_path / "whole.jsonl"
    assert main([*common, "--steps", "6", "--resume", str(ck), "--metrics", str(resumed)]) == 0
    assert "resuming after step 4" in capsys.readouterr().out
    assert main([*common, "--steps", "6", "--metrics", str(whole)]) == 0
    assert losses(resumed) == {4: losses(whole)[4], 5: losses(whole)[5]}
    assert {k: losses(whole)[k] for k in range(4)} == losses(m)
    # from the saved weights: the same weights and the same batch give the
    # same first loss as step 4, which saw the same batch with those weights
    again = tmp_path / "again.jsonl"
    assert main([*common, "--steps", "1", "--metrics", str(again), "--init-weights", str(w)]) == 0
    assert losses(again) == {0: losses(resumed)[4]}
    assert losses(again)[0] != losses(m)[0]  # and not the untrained weights' loss
    assert "loss" in capsys.readouterr().out


def test_weights_with_a_missing_key_name_it(tmp_path):
    w = tmp_path / "w.npz"
    assert main(["train", "tiny", "--steps", "1", "--batch", "2", "--save-weights", str(w)]) == 0
    with np.load(w) as z:
        arrays = {k: z[k] for k in z.files if k != "2.bn.bias"}
    np.savez(w, **arrays)
    rc, _, err = run_cli("train", "tiny", "--steps", "1", "--init-weights", str(w))
    assert rc == 1 and "'2.bn.bias'" in err


def test_data_file_batches_wrap_around(tmp_path):
    d = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(d, images=rng.standard_normal((3, 3, 32, 32)).astype(np.float32), labels=np.array([1, 2, 3]))
    m = tmp_path / "m.jsonl"
    assert main(["train", "tiny", "--data", str(d), "--batch", "3", "--steps", "2", "--lr", "0",
                 "--momentum", "0", "--metrics", str(m)]) == 0
    losses = [json.loads(x)["loss"] for x in m.read_text().splitlines()]
    # lr 0: the weights do not move, and step 1 sees the same three images
    # again; only the batch-norm running statistics changed, which training
    # does not use
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 3, 30, 32), np.float32), labels=np.array([0, 1]))
    rc, _, err = run_cli("train", "tiny", "--data", str(bad))
    assert rc == 1 and "images" in err and "(N, 3, 32, 32)" in err


def test_compile_then_train_with_the_plan_equals_one_device(tmp_path, capsys):
    plan_dir = tmp_path / "plan"
    assert main(["compile", "tiny", "--devices", "3", "--batch", "2", "--dtype", "float64", "-o", str(plan_dir)]) == 0
    assert (plan_dir / "plan.json").exists()
    w1, w3 = tmp_path / "w1.npz", tmp_path / "w3.npz"
    assert main(["train", "tiny", "--plan", str(plan_dir), "--steps", "2", "--save-weights", str(w3)]) == 0
    assert main(["train", "tiny", "--batch", "2", "--dtype", "float64", "--steps", "2", "--save-weights", str(w1)]) == 0
    with np.load(w1) as a, np.load(w3) as b:
        assert set(a.files) == set(b.files)
        for k in a.files:
            assert np.allclose(a[k], b[k], rtol=1e-10, atol=1e-12), k
    assert main(["info", "tiny", "--plan", str(plan_dir)]) == 0
    out = capsys.readouterr().out
    assert "halo overhead" in out and "vs 1 device" in out


def test_plan_for_another_model_is_refused(tmp_path):
    plan_dir = tmp_path / "plan"
    assert main(["compile", "tiny", "--devices", "2", "-o", str(plan_dir)]) == 0
    rc, _, err = run_cli("train", "yolov2-tiny", "--plan", str(plan_dir), "--steps", "1")
    assert rc == 1 and "another model" in err


def test_compile_takes_the_leaner_plan_within_the_time_slack(tmp_path):
    """yolov2-tiny at batch 8 on one Pi 3: by default a plan of less memory
    than the fastest, within 3% of its time, with the fastest's figures in
    the report; ``--time-slack 0`` takes the fastest; a slack that is no
    fraction is one line."""
    (tmp_path / "c.yaml").write_text("devices:\n  - {name: p0, profile: rpi3b}\n")
    plans = {}
    for slack in (None, "0"):
        out = tmp_path / f"plan-{slack}"
        args = ["compile", "yolov2-tiny", "--cluster", str(tmp_path / "c.yaml"), "--batch", "8", "-o", str(out)]
        assert main(args + ([] if slack is None else ["--time-slack", slack])) == 0
        plans[slack] = (json.loads((out / "plan.json").read_text())["predicted"], (out / "report.txt").read_text())
    (lean, lean_report), (fast, fast_report) = plans[None], plans["0"]
    assert "the fastest plan: " in lean_report and "least memory within 3%" in lean_report
    assert "the fastest plan: " not in fast_report
    assert fast["step_s"] < lean["step_s"] <= fast["step_s"] * 1.03 + 1e-6
    assert lean["per_device"][0]["memory_bytes"] < 0.99 * fast["per_device"][0]["memory_bytes"]
    rc, _, err = run_cli("compile", "tiny", "--time-slack", "1.5", "-o", str(tmp_path / "never"))
    assert rc == 1 and err.count("\n") == 1 and "--time-slack must be a fraction" in err


def test_impossible_grid_is_explained():
    rc, _, err = run_cli("compile", "tiny", "--devices", "2", "--grid", "2x2", "-o", "/tmp/never")
    assert rc == 1 and "4 tiles for 2 devices" in err


def test_train_on_a_dataset_directory_from_darknet_weights(tmp_path):
    """`--data DIR` reads a YOLO-layout dataset; `--init-weights` takes darknet
    .weights as well as .npz, and both give the same start."""
    from tilec.frontend.darknet_weights import write_darknet
    from tilec.frontend.models import load_model
    from tilec_runtime import weights
    assert main(["data", "synth", str(tmp_path / "d"), "--n", "24"]) == 0
    program = load_model("detector-small").to_program()
    params, buffers = weights.init_params(program, 5, "float32")
    weights.save_weights(tmp_path / "w.npz", params, buffers)
    write_darknet(tmp_path / "w.weights", program, params, buffers)
    losses = []
    for w in ("w.npz", "w.weights"):
        m = tmp_path / f"{w}.jsonl"
        assert main(["train", "detector-small", "--data", str(tmp_path / "d"), "--batch", "4", "--steps", "1",
                     "--kernels", "reference", "--init-weights", str(tmp_path / w), "--metrics", str(m)]) == 0
        losses.append(json.loads(m.read_text())["loss"])
    assert np.isfinite(losses[0]) and losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_forward_writes_every_layer_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    """`tilec forward`: one array per layer index, batch norm with the running
    statistics, softmax probabilities at the end; a wrong or missing input or
    weights file is one line and exit status 1."""
    from tilec.frontend.models import load_model
    from tilec_runtime import ops, weights
    program = load_model("tiny").to_program()
    params, buffers = weights.init_params(program, 3, "float32")
    buffers["0.bn.running_var"][:] = 4.0  # eval mode reads it
    w = tmp_path / "w.npz"
    weights.save_weights(w, params, buffers)
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32))
    out = tmp_path / "out.npz"
    assert main(["forward", "tiny", "--weights", str(w), "--input", str(x), "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    with np.load(out) as z:
        assert sorted(z.files, key=int) == [str(i) for i in range(len(program))]
        z0 = ops.conv2d_forward(np.load(x), params["0.conv.weight"], 1, (1, 1, 1, 1)) / np.sqrt(4.0 + ops.BN_EPS)
        assert np.allclose(z["0"], ops.act_forward(z0, "leaky"), rtol=1e-5, atol=1e-6)
        assert np.allclose(z[str(len(program) - 1)].sum(axis=(1, 2, 3)), 1.0)
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 30, 32), np.float32))
    for args, fragment in [
        (["--input", str(tmp_path / "bad.npy")], "bad.npy: input has shape (2, 3, 30, 32), the model needs "
                                                 "(N, C, H, W) = (N, 3, 32, 32)"),
        (["--input", str(tmp_path / "none.npy")], "none.npy: cannot read input"),
        (["--input", str(w)], "w.npz: cannot read input: not a .npy array"),
        (["--input", str(x), "--weights", str(tmp_path / "none.weights")], "none.weights: cannot read weights"),
    ]:
        argv = ["forward", "tiny", "--weights", str(w), "-o", str(out), *args]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize("how", [[], ["--kernels", "reference"], ["--devices", "2"]],
                         ids=["inprocess", "reference", "local-workers"])
def test_a_diverging_loss_is_one_line_naming_the_step(how):
    rc, _, err = run_cli("train", "tiny", "--lr", "1e30", "--steps", "5", *how)
    assert rc == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("tilec: error: ") and err.endswith("step 2: the loss diverged (nan): lower --lr\n"), err
    if "--devices" in how:
        assert "device 0 (dev0): step 2:" in err  # rank 0's worker computes the loss


def test_progress_on_a_terminal_without_tqdm_is_plain_lines(monkeypatch):
    """tqdm is optional (not a dependency): a terminal without it gets lines."""
    import io

    from tilec.progress import StepProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    out = Terminal()
    progress = StepProgress(2, batch=4, out=out)
    progress(0, 1.5, 0.1)
    progress(1, 1.25, 0.1)
    progress.close()
    assert out.getvalue().splitlines()[-1].startswith("step    2/2  loss 1.250000")


def test_a_profile_taken_on_a_busy_machine_says_so():
    from tilec.commands.profile import busy_warning
    calm = {"conv.forward": 0.02, "conv.backward": 0.04, "epilogue.backward": 0.18}
    assert busy_warning(calm) is None  # (the convolutions, most of a step, decide)
    busy = dict(calm, **{"conv.backward": 0.134})
    warning = busy_warning(busy)
    assert "conv.backward 13%" in warning and "conv.forward" not in warning and "tilec profile" in warning
