"""darknet .weights files: the byte layout by hand, round trips, partial files, errors."""
import numpy as np
import pytest

from tilec.errors import WeightsError
from tilec.frontend import load_model
from tilec.frontend.darknet_weights import load_any, read_darknet, write_darknet
from tilec_runtime.weights import init_params, save_weights

CFG = """[net]
height=8
width=8
channels=2
[convolutional]
batch_normalize=1
filters=2
size=3
pad=1
activation=leaky
[maxpool]
size=2
stride=2
[convolutional]
filters=3
size=1
[connected]
output=2
[softmax]
"""


def small():
    from tilec.frontend.cfg import parse_cfg
    return parse_cfg(CFG).to_program()


def random_state(program, seed):
    params, buffers = init_params(program, 0, "float32")
    rng = np.random.default_rng(seed)
    for d in (params, buffers):
        for k in d:
            d[k] = rng.uniform(0.1, 2.0, size=d[k].shape).astype(np.float32)
    return params, buffers


def test_byte_layout_by_hand(tmp_path):
    """The header, then per layer darknet's order: biases, [scales, mean, var], weights."""
    program = small()
    values = np.arange(1, 1000, dtype="<f4")
    # conv0 (bn): 2 biases, 2 scales, 2 means, 2 vars, 2*2*3*3 = 36 weights -> 44 floats
    # conv2 (no bn): 3 biases, 3*2 weights -> 9 floats; fc3: 2 biases, 2*(3*4*4) = 96 weights
    n = 44 + 9 + 2 + 96
    path = tmp_path / "hand.weights"
    with open(path, "wb") as f:
        np.array([0, 2, 5], "<i4").tofile(f)
        np.array([123456789012], "<u8").tofile(f)
        values[:n].tofile(f)
    params, buffers, header, loaded = read_darknet(path, program)
    assert header == {"major": 0, "minor": 2, "revision": 5, "seen": 123456789012, "transpose": False}
    assert loaded == 3
    assert params["0.bn.bias"].tolist() == [1, 2]            # darknet's biases: beta
    assert params["0.bn.weight"].tolist() == [3, 4]          # scales: gamma
    assert buffers["0.bn.running_mean"].tolist() == [5, 6]
    assert buffers["0.bn.running_var"].tolist() == [7, 8]
    np.testing.assert_array_equal(params["0.conv.weight"], values[8:44].reshape(2, 2, 3, 3))
    assert params["2.conv.bias"].tolist() == [45, 46, 47]
    np.testing.assert_array_equal(params["2.conv.weight"], values[47:53].reshape(3, 2, 1, 1))
    assert params["3.fc.bias"].tolist() == [54, 55]
    np.testing.assert_array_equal(params["3.fc.weight"], values[55:151].reshape(2, 48))


def test_old_header_with_a_32_bit_seen_and_transposed_connected(tmp_path):
    program = small()
    path = tmp_path / "old.weights"
    fc = np.arange(96, dtype="<f4")
    with open(path, "wb") as f:
        np.array([0, 1001, 0, 77], "<i4").tofile(f)  # minor > 1000: seen is int32... and fc is transposed
        np.zeros(44 + 9 + 2, "<f4").tofile(f)
        fc.tofile(f)
    params, _, header, _ = read_darknet(path, program)
    assert header["seen"] == 77 and header["transpose"]
    np.testing.assert_array_equal(params["3.fc.weight"], fc.reshape(48, 2).T)


@pytest.mark.parametrize("name", ["detector-small", "yolov2-tiny"])
def test_round_trip_through_npz_keys(tmp_path, name):
    program = load_model(name).to_program()
    params, buffers = random_state(program, 1)
    path = tmp_path / "m.weights"
    write_darknet(path, program, params, buffers, seen=640)
    p2, b2, header, _ = read_darknet(path, program)
    assert header["seen"] == 640 and (header["major"], header["minor"]) == (0, 2)
    assert p2.keys() == params.keys() and b2.keys() == buffers.keys()
    for k in params:
        np.testing.assert_array_equal(p2[k], params[k])
    for k in buffers:
        np.testing.assert_array_equal(b2[k], buffers[k])
    # and the file size is darknet's: header + every float
    floats = sum(v.size for v in params.values()) + sum(v.size for v in buffers.values())
    assert path.stat().st_size == 20 + 4 * floats


def test_a_backbone_file_loads_the_layers_it_has(tmp_path):
    program = load_model("detector-small").to_program()
    params, buffers = random_state(program, 2)
    full = tmp_path / "full.weights"
    write_darknet(full, program, params, buffers)
    # keep the first two conv layers (each bn: 4*F + weights)
    first = sum(4 * program[i]["filters"] + params[f"{i}.conv.weight"].size for i in (0, 2))
    backbone = tmp_path / "backbone.conv.2"
    backbone.write_bytes(full.read_bytes()[:20 + 4 * first])
    init, _ = init_params(program, 0, "float32")
    p2, _, _, loaded = read_darknet(backbone, program, params=dict(init), buffers={})
    assert loaded == 2
    np.testing.assert_array_equal(p2["2.conv.weight"], params["2.conv.weight"])
    np.testing.assert_array_equal(p2["4.conv.weight"], init["4.conv.weight"])


def test_truncated_inside_a_layer_and_trailing_bytes_name_the_problem(tmp_path):
    program = small()
    params, buffers = random_state(program, 3)
    path = tmp_path / "m.weights"
    write_darknet(path, program, params, buffers)
    data = path.read_bytes()
    (tmp_path / "cut.weights").write_bytes(data[:20 + 4 * 50])
    with pytest.raises(WeightsError, match=r"ends inside layer 2 \(conv\)"):
        read_darknet(tmp_path / "cut.weights", program)
    (tmp_path / "long.weights").write_bytes(data + b"\0" * 8)
    with pytest.raises(WeightsError, match="8 bytes left after the model's last layer"):
        read_darknet(tmp_path / "long.weights", program)
    (tmp_path / "tiny.weights").write_bytes(b"\0" * 6)
    with pytest.raises(WeightsError, match="too short for a darknet .weights header"):
        read_darknet(tmp_path / "tiny.weights", program)
    with pytest.raises(WeightsError, match="cannot read weights"):
        read_darknet(tmp_path / "missing.weights", program)


def test_one_weights_error_for_both_formats_and_the_cli_says_it_in_one_line(tmp_path):
    import subprocess
    import sys

    import tilec_runtime.errors
    assert WeightsError is tilec_runtime.errors.WeightsError
    cfg = tmp_path / "m.cfg"
    cfg.write_text(CFG)
    program = small()
    write_darknet(tmp_path / "w.weights", program, *random_state(program, 1))
    (tmp_path / "cut.weights").write_bytes((tmp_path / "w.weights").read_bytes()[:40])
    np.savez(tmp_path / "w.npz", x=np.zeros(1))
    for bad in ("cut.weights", "w.npz"):
        p = subprocess.run([sys.executable, "-m", "tilec.cli", "train", str(cfg), "--steps", "1", "--kernels",
                            "reference", "--init-weights", str(tmp_path / bad)], capture_output=True, text=True)
        assert p.returncode == 1 and p.stderr.startswith("tilec: error: ") and p.stderr.count("\n") == 1, p.stderr
        assert bad in p.stderr


def test_load_any_reads_both_formats(tmp_path):
    program = small()
    params, buffers = random_state(program, 4)
    write_darknet(tmp_path / "m.weights", program, params, buffers)
    save_weights(tmp_path / "m.npz", params, buffers)
    for name in ("m.weights", "m.npz"):
        p2, b2 = load_any(tmp_path / name, program, "float64")
        assert p2["0.bn.weight"].dtype == np.float64
        np.testing.assert_array_equal(p2["3.fc.weight"], params["3.fc.weight"])
        np.testing.assert_array_equal(b2["0.bn.running_var"], buffers["0.bn.running_var"])
