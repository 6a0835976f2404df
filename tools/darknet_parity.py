#!/usr/bin/env python3
"""How close tilec is to darknet, layer by layer, on the fixtures darknet's
own C code made (``../shared/darknet-parity``; its README says how).

    python tools/darknet_parity.py [--dir DIR] [--json OUT.json]

For each fixture it prints every layer's relative error (max|tilec - darknet|
/ max|darknet|) twice: as `tilec forward` computes it (float32, tilec's
batch-norm epsilon: darknet divides by ``sqrt(var) + 1e-6``, tilec by
``sqrt(var + 1e-5)``), and in float64 with darknet's epsilon folded into the
running variance, which leaves darknet's float32 rounding alone. Then the
``[region]`` gradient against darknet's delta, and whether a ``.weights``
file read and written again is byte-identical. ``tests/test_darknet_parity.py``
holds the same comparisons to their tolerances, with these helpers.
"""
import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

MODELS = ("passthrough", "pools", "region-train")
BATCH = 2  # every fixture's
FILES = [f"{m}{ext}" for m in MODELS for ext in (".cfg", ".weights", ".input.bin", ".layers.txt", ".layers.bin")]
FILES += ["region-train.region.bin", "truths.bin"]


def default_dir():
    """$TILEC_PARITY_DIR, else ``shared/darknet-parity`` beside the repository."""
    env = os.environ.get("TILEC_PARITY_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "darknet-parity"


def missing_files(where):
    return [f for f in FILES if not (Path(where) / f).is_file()]


def rel_err(got, want):
    """max|a - b| / max|b|, the measure the fixtures are judged by."""
    return float(np.abs(got - want).max() / np.abs(want).max())


def program_of(parity, name):
    """The fixture's program (parsed once; shared, so read it, do not change it)."""
    return _program(str(Path(parity) / f"{name}.cfg"))


@functools.lru_cache(maxsize=None)
def _program(cfg):
    from tilec.frontend.models import load_model
    return load_model(cfg).to_program()


def darknet_layers(parity, name):
    """[(index, darknet type, output (BATCH, outputs per image))] of a fixture."""
    parity = Path(parity)
    flat = np.fromfile(parity / f"{name}.layers.bin", dtype="<f4")
    layers, start = [], 0
    for line in (parity / f"{name}.layers.txt").read_text().splitlines():
        index, kind, outputs = line.split()
        n = BATCH * int(outputs)
        layers.append((int(index), kind, flat[start:start + n].reshape(BATCH, -1)))
        start += n
    assert start == flat.size, f"{name}.layers.bin has {flat.size} values, layers.txt accounts for {start}"
    return layers


def write_input(parity, name, path):
    c, h, w = program_of(parity, name)[0]["in_shape"]
    np.save(path, np.fromfile(Path(parity) / f"{name}.input.bin", dtype="<f4").reshape(BATCH, c, h, w))
    return path


def matched_epsilon_weights(parity, name, path):
    """The fixture's weights as float64 .npz, each running variance v' set so
    that sqrt(v' + tilec's eps) = sqrt(v) + darknet's 1e-6."""
    from tilec.frontend.darknet_weights import read_darknet
    from tilec_runtime import ops
    from tilec_runtime.weights import save_weights

    params, buffers, _, _ = read_darknet(Path(parity) / f"{name}.weights", program_of(parity, name), "float64")
    for key in buffers:
        if key.endswith(".bn.running_var"):
            buffers[key] = (np.sqrt(buffers[key]) + 1e-6) ** 2 - ops.BN_EPS
    save_weights(path, params, buffers)
    return path


def darknet_truths(parity):
    """truths.bin (x y w h class, a zero row ends an image's list) as tilec's
    (class cx cy w h) rows padded with ``region.PAD``."""
    from tilec_runtime import region

    rows = np.fromfile(Path(parity) / "truths.bin", dtype="<f4").reshape(BATCH, -1, 5).astype(np.float64)
    truth = np.full(rows.shape, region.PAD)
    for b in range(BATCH):
        for t, (x, y, w, h, cls) in enumerate(rows[b]):
            if x == 0:
                break
            truth[b, t] = (cls, x, y, w, h)
    return truth


def expected_region_grad(x, delta, layer):
    """tilec's region gradient from darknet's CPU delta: -delta / batch, with
    the logistic derivative (which darknet's CPU code leaves out) applied to
    x, y and objectness."""
    from tilec_runtime import region

    shape = (BATCH, layer["num"], region.entries(layer), *x.shape[2:])
    s = 1.0 / (1.0 + np.exp(-x.reshape(shape)))
    g = (-delta / BATCH).reshape(shape).copy()
    g[:, :, [0, 1, 4]] *= s[:, :, [0, 1, 4]] * (1 - s[:, :, [0, 1, 4]])
    return g.reshape(x.shape)


def region_grad_error(parity, region_input):
    """Relative error of tilec's [region] gradient on ``region_input`` (the
    region layer's input of region-train, (BATCH, -1)) against darknet's delta."""
    from tilec_runtime import region

    layer = program_of(parity, "region-train")[-1]
    x = region_input.reshape(BATCH, *layer["in_shape"]).astype(np.float64)
    delta = np.fromfile(Path(parity) / "region-train.region.bin", dtype="<f4").reshape(x.shape).astype(np.float64)
    _, grad = region.forward(x, darknet_truths(parity), layer)
    return rel_err(grad, expected_region_grad(x, delta, layer))


def weights_round_trip(parity, name, path):
    """True when reading the fixture's .weights and writing it again gives the same bytes."""
    from tilec.frontend.darknet_weights import read_darknet, write_darknet

    program = program_of(parity, name)
    params, buffers, header, _ = read_darknet(Path(parity) / f"{name}.weights", program)
    write_darknet(path, program, params, buffers, seen=header["seen"])
    return Path(path).read_bytes() == (Path(parity) / f"{name}.weights").read_bytes()


def tilec_layers(parity, name, weights, dtype, work):
    """{index: (BATCH, -1)} of what `tilec forward` computes."""
    from tilec.commands.forward import forward

    images = write_input(parity, name, Path(work) / f"{name}.input.npy")
    outs = forward(str(Path(parity) / f"{name}.cfg"), str(weights), str(images), dtype)
    return {i: y.reshape(BATCH, -1) for i, y in outs.items()}


def measure(parity):
    """Everything the table shows, as a JSON-able dict."""
    result = {"dir": str(parity), "models": {}}
    with tempfile.TemporaryDirectory(prefix="tilec-parity-") as work:
        for name in MODELS:
            as_is = tilec_layers(parity, name, Path(parity) / f"{name}.weights", "float32", work)
            matched = tilec_layers(parity, name, matched_epsilon_weights(parity, name, Path(work) / "m.npz"),
                                   "float64", work)
            rows = [{"index": i, "type": kind, "float32": rel_err(as_is[i], want),
                     "float64_darknet_eps": rel_err(matched[i], want)}
                    for i, kind, want in darknet_layers(parity, name)]
            entry = {"layers": rows, "weights_round_trip": weights_round_trip(parity, name, Path(work) / "w")}
            if name == "region-train":
                j = program_of(parity, name)[-1]["inputs"][0]
                dk = {i: out for i, _, out in darknet_layers(parity, name)}[j]
                entry["region_grad"] = {"on_darknet_input": region_grad_error(parity, dk),
                                        "on_tilec_input": region_grad_error(parity, as_is[j])}
            result["models"][name] = entry
    return result


def print_table(result):
    for name, entry in result["models"].items():
        print(f"\n{name}\n")
        print("| layer | darknet type | float32, tilec's eps | float64, darknet's eps |")
        print("|---:|---|---:|---:|")
        for r in entry["layers"]:
            print(f"| {r['index']} | {r['type']} | {r['float32']:.2e} | {r['float64_darknet_eps']:.2e} |")
        print(f"\n.weights round trip byte-identical: {entry['weights_round_trip']}")
        if "region_grad" in entry:
            g = entry["region_grad"]
            print(f"[region] gradient vs darknet's delta: {g['on_darknet_input']:.2e} on darknet's region input, "
                  f"{g['on_tilec_input']:.2e} on tilec's")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=default_dir(), help="the fixtures (default: %(default)s)")
    ap.add_argument("--json", type=Path, metavar="OUT.json", help="also write the figures here")
    args = ap.parse_args(argv)
    missing = missing_files(args.dir)
    if missing:
        print(f"darknet_parity: fixtures missing in {args.dir} (first: {missing[0]})", file=sys.stderr)
        return 1
    result = measure(args.dir)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
