"""ONNX in and out: a PyTorch CNN exported to ONNX trains in tilec on two
devices exactly as in PyTorch; tilec's export runs in onnxruntime as tilec's
forward pass does; export then import gives back the same program and
weights; what tilec cannot express is refused in one line naming the node.
"""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tilec.cli import main
from tilec.errors import ConfigError
from tilec.export.onnx_export import ExportError, export_onnx, write_onnx
from tilec.frontend import Model
from tilec.frontend.onnx_import import import_onnx, onnx_weights
from tilec.frontend.onnx_pads import conv_pad, maxpool_padding
from tilec_runtime import ops, reference
from tilec_runtime.program import pads_of
from tilec_runtime.weights import init_params

LR, MOMENTUM, DECAY, BATCH, STEPS = 0.05, 0.9, 1e-3, 4, 3


def export_torch(module, x, path, opset=13):
    """The classic (TorchScript) exporter, which needs no onnxscript. In eval
    mode and without constant folding: folding would merge batch norm into
    the conv, and train mode would update the running statistics."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), opset_version=opset, dynamo=False,
                          do_constant_folding=False, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}})
    return path


def small_cnn():
    """conv+BN+LeakyReLU(0.1), max-pool, conv with a bias before its BN
    (folded into the running mean), ReLU, flatten, linear: float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
                         nn.MaxPool2d(2, 2),
                         nn.Conv2d(8, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(96, 5)).double()


def torch_as_tilec(sd):
    """A torch state dict of ``small_cnn`` in tilec's keys (written out by
    hand, independently of the importer)."""
    sd = {k: v.detach().numpy().copy() for k, v in sd.items()}
    return {"0.conv.weight": sd["0.weight"], "0.bn.weight": sd["1.weight"], "0.bn.bias": sd["1.bias"],
            "0.bn.running_mean": sd["1.running_mean"], "0.bn.running_var": sd["1.running_var"],
            "2.conv.weight": sd["4.weight"], "2.bn.weight": sd["5.weight"], "2.bn.bias": sd["5.bias"],
            "2.bn.running_mean": sd["5.running_mean"] - sd["4.bias"], "2.bn.running_var": sd["5.running_var"],
            "3.fc.weight": sd["8.weight"], "3.fc.bias": sd["8.bias"]}


def train_torch(module, images, labels):
    decayed = [module[0].weight, module[4].weight, module[8].weight]
    rest = [p for p in module.parameters() if all(p is not q for q in decayed)]
    opt = torch.optim.SGD([{"params": decayed, "weight_decay": DECAY}, {"params": rest, "weight_decay": 0.0}],
                          lr=LR, momentum=MOMENTUM)
    module.train()
    losses = []
    for step in range(STEPS):
        x = torch.tensor(images[step * BATCH:(step + 1) * BATCH])
        y = torch.tensor(labels[step * BATCH:(step + 1) * BATCH])
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The small CNN exported from torch, trained 3 steps by tilec on 2
    devices (float64, from the CLI) and by torch.optim.SGD."""
    d = tmp_path_factory.mktemp("onnx")
    module = small_cnn()
    model = export_torch(module, torch.zeros(BATCH, 3, 8, 8, dtype=torch.float64), d / "small.onnx")
    rng = np.random.default_rng(0)
    images, labels = rng.standard_normal((BATCH * STEPS, 3, 8, 8)), rng.integers(0, 5, BATCH * STEPS)
    np.savez(d / "batch.npz", images=images, labels=labels)
    start = torch_as_tilec(module.state_dict())
    bias = module[4].bias.detach().clone()
    rc = main(["train", str(model), "--loss", "softmax", "--devices", "2", "--grid", "2x1", "--dtype", "float64",
               "--steps", str(STEPS), "--batch", str(BATCH), "--lr", str(LR), "--momentum", str(MOMENTUM),
               "--decay", str(DECAY), "--data", str(d / "batch.npz"), "--save-weights", str(d / "out.npz")])
    assert rc == 0
    losses = train_torch(module, images, labels)
    with np.load(d / "out.npz") as z:
        ours = {k: z[k] for k in z.files}
    return {"dir": d, "model": model, "ours": ours, "theirs": torch_as_tilec(module.state_dict()),
            "start": start, "losses": losses, "bias_moved": float((module[4].bias.detach() - bias).abs().max())}


def test_torch_cnn_trains_on_two_devices_as_in_torch(trained):
    ours, theirs = trained["ours"], trained["theirs"]
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].dtype == np.float64 for k in ours)
    diff = max(float(np.abs(ours[k] - theirs[k]).max()) for k in theirs)
    moved = max(float(np.abs(theirs[k] - trained["start"][k]).max()) for k in theirs)
    print(f"max |tilec - torch| over all weights after {STEPS} steps on 2 devices: {diff:.3g} (moved {moved:.3g})")
    assert diff <= 1e-8 and moved > 1e-3
    # why folding a conv bias before batch norm is exact in training: torch never moves it
    assert trained["bias_moved"] < 1e-12


def test_initializers_are_the_default_initial_weights(trained):
    """The importer's weights are the torch model's, bias folded."""
    weights = onnx_weights(trained["model"])
    assert sorted(weights) == sorted(trained["start"])
    for key, value in trained["start"].items():
        np.testing.assert_allclose(weights[key], value, rtol=0, atol=1e-15, err_msg=key)


def test_export_runs_in_onnxruntime_as_tilec_forward(trained, capsys):
    d = trained["dir"]
    assert main(["export", str(trained["model"]), "--loss", "softmax", "--weights", str(d / "out.npz"),
                 "-o", str(d / "export.onnx")]) == 0
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.save(d / "x.npy", x)
    assert main(["forward", str(trained["model"]), "--loss", "softmax", "--weights", str(d / "out.npz"),
                 "--input", str(d / "x.npy"), "-o", str(d / "f.npz")]) == 0
    with np.load(d / "f.npz") as z:
        ours = z[str(len(z.files) - 1)].reshape(5, -1)
    (theirs,) = ort.InferenceSession(str(d / "export.onnx")).run(None, {"images": x})
    assert theirs.shape == (5, 5) and ours.dtype == np.float32
    diff = float(np.abs(ours - theirs).max())
    assert "probabilities" in capsys.readouterr().out
    with capsys.disabled():
        print(f"\nmax |onnxruntime - tilec forward| (float32 probabilities): {diff:.3g}")
    assert diff <= 1e-5


def test_train_without_a_loss_is_one_line(trained, capsys):
    assert main(["train", str(trained["model"]), "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "carries no loss" in err and "--loss" in err


def test_info_without_a_loss_keeps_the_raw_output_and_says_so(trained, capsys):
    assert main(["info", str(trained["model"])]) == 0
    captured = capsys.readouterr()
    assert "names no loss; using --loss sse" in captured.err and "cost" in captured.out


# -- a model with every layer kind: onnxruntime and the round trip ------------------

def every_kind(loss="softmax"):
    m = Model(height=12, width=12, channels=3, batch=2, learning_rate=0.02, momentum=0.8, decay=5e-4)
    m.conv(8, 3, bn=True, act="leaky").maxpool(2, 2)                 # 0, 1: 8x6x6
    m.reorg(2, order="darknet").route(1).reorg(2, order="space_to_depth").route(1).reorg(2, order="onnx")
    m.route(2, 4, 6)                                                 # 7: 96x3x3
    m.maxpool(3, 1, padding=2).maxpool(2, 1)                         # 8, 9: 96x3x3
    m.local_avgpool(3, 1, padding=2, count_pad=True)                 # 10: 96x3x3
    m.local_avgpool(2, 1, padding=1)                                 # 11: 96x3x3
    m.reorg(2, order="onnx", reverse=True).route(11)                 # 12, 13: 24x6x6, 96x3x3
    m.reorg(2, order="space_to_depth", reverse=True).route(12, 14)   # 14, 15: 24x6x6, 48x6x6
    m.conv(16, 3, stride=2, pad=1, bn=False, act="relu")             # 16: 16x3x3
    if loss == "softmax":
        m.connected(10, act="leaky").connected(7).softmax()
    elif loss == "sse":
        m.conv(4, 1, act="linear").sse()
    else:
        m.conv(2 * (5 + 3), 1).region([1.0, 1.5, 2.0, 1.0], classes=3)
    return m.build()


def random_weights(program, seed=0):
    params, buffers = init_params(program, seed, "float32")
    rng = np.random.default_rng(seed)
    for key in params:
        if not key.endswith(".weight") or ".bn." in key:
            params[key] = rng.uniform(-0.5, 0.5, params[key].shape).astype(np.float32) + (".bn.weight" in key)
    for key in buffers:
        buffers[key] = (rng.uniform(0.5, 2.0, buffers[key].shape) if key.endswith("var")
                        else rng.uniform(-0.3, 0.3, buffers[key].shape)).astype(np.float32)
    return params, buffers


@pytest.mark.parametrize("loss", ["softmax", "sse", "region"])
def test_every_kind_exports_to_onnxruntime_and_imports_back(tmp_path, loss):
    graph = every_kind(loss)
    program = graph.to_program()
    params, buffers = random_weights(program)
    path = tmp_path / "m.onnx"
    write_onnx(path, export_onnx(program, params, buffers, name="m", net=graph.net))
    x = np.random.default_rng(2).standard_normal((3, 3, 12, 12)).astype(np.float32)
    (theirs,) = ort.InferenceSession(str(path)).run(None, {"images": x})
    outputs = reference.infer(program, params, buffers, x)
    # softmax: the probabilities; sse and region: the raw input of the loss
    ours = outputs[len(program) - 1] if loss == "softmax" else outputs[program[-1]["inputs"][0]]
    assert theirs.shape == (3, *program[-1]["in_shape"]) or theirs.shape == (3, ours[0].size)
    scale = max(1.0, float(np.abs(ours).max()))
    assert float(np.abs(ours.reshape(theirs.shape) - theirs).max()) <= 1e-5 * scale
    # the round trip: the same program (the loss from the metadata), settings and weights
    back = import_onnx(path)
    assert back.graph.to_program() == program and back.graph.net == graph.net
    assert sorted(back.weights) == sorted({**params, **buffers})
    for key, value in {**params, **buffers}.items():
        assert np.array_equal(back.weights[key], value), key


def test_maxpool_padding_larger_than_onnx_allows_is_refused():
    m = Model(height=8, width=8, channels=1).maxpool(2, 2, padding=4).avgpool().sse()
    program = m.build().to_program()
    with pytest.raises(ExportError, match=r"layer 0 \(maxpool\): padding 4"):
        export_onnx(program, *init_params(program, 0))


# -- padding and reorg: exactly onnxruntime's --------------------------------------

def run_node(node, x, inits=(), opset=13):
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(a, n) for n, a in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]


def test_maxpool_pads_map_exactly_or_are_refused():
    rng = np.random.default_rng(3)
    mapped = refused = 0
    for h in (5, 6, 7, 8):
        for k in (2, 3):
            for s in (1, 2, 3):
                for top in range(k):
                    for bottom in range(k):
                        for ceil in (0, 1):
                            pads = [top, top, bottom, bottom]
                            total = maxpool_padding((h, h), k, s, pads, bool(ceil))
                            if total is None:
                                refused += 1
                                continue
                            mapped += 1
                            x = rng.standard_normal((1, 2, h, h)).astype(np.float32)
                            node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[s, s],
                                                    pads=pads, ceil_mode=ceil)
                            layer = {"kind": "maxpool", "padding": total}
                            ours, _ = ops.maxpool_forward(x, k, s, pads_of(layer))
                            assert np.array_equal(ours, run_node(node, x)), (h, k, s, pads, ceil)
    assert mapped > 100 and refused > 20
    assert maxpool_padding((8, 8), 2, 2, [1, 1, 0, 0], False) is None  # top > bottom: refused


def test_averagepool_pads_map_exactly_or_are_refused():
    """Windows and divisors: with count_include_pad=1 every window of an
    exact mapping lies inside both padded maps (k*k), with 0 both count the
    cells of the map."""
    rng = np.random.default_rng(5)
    mapped = 0
    for h in (5, 6, 7):
        for k, s in ((2, 1), (2, 2), (3, 1), (3, 2)):
            for top in range(k):
                for bottom in range(k):
                    pads = [top, top, bottom, bottom]
                    total = maxpool_padding((h, h), k, s, pads, False)
                    if total is None:
                        continue
                    for count in (0, 1):
                        mapped += 1
                        x = rng.standard_normal((1, 2, h, h)).astype(np.float32)
                        node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[k, k], strides=[s, s],
                                                pads=pads, count_include_pad=count)
                        layer = {"kind": "local_avgpool", "padding": total}
                        ours = ops.local_avgpool_forward(x, k, s, pads_of(layer), bool(count))
                        np.testing.assert_allclose(ours, run_node(node, x), rtol=1e-6, atol=1e-6,
                                                   err_msg=str((h, k, s, pads, count)))
    assert mapped > 60


def pooled_cnn():
    """conv+BN+leaky, max-pool, a 1x1 conv, PixelShuffle (DepthToSpace CRD),
    AvgPool2d with padding (counted, torch's default) and without, a conv
    and a linear head: float64."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
                         nn.MaxPool2d(2, 2), nn.Conv2d(8, 16, 1), nn.PixelShuffle(2),
                         nn.AvgPool2d(3, 1, padding=1), nn.Conv2d(4, 6, 3, padding=1),
                         nn.AvgPool2d(2, 2, padding=1, count_include_pad=False), nn.Flatten(),
                         nn.Linear(6 * 5 * 5, 5)).double()


def test_torch_pixel_shuffle_and_avgpool_cnn_trains_on_two_devices_as_in_torch(tmp_path):
    """tilec's weights after 3 steps on 2 devices equal torch's (float64);
    torch's final weights are read through the importer (whose key mapping
    the small CNN's test checks by hand)."""
    module = pooled_cnn()
    x0 = torch.zeros(BATCH, 3, 8, 8, dtype=torch.float64)
    model = export_torch(module, x0, tmp_path / "pooled.onnx")
    kinds = [layer["kind"] for layer in import_onnx(model, "softmax").graph.layers()]
    assert kinds == ["conv", "maxpool", "conv", "reorg", "local_avgpool", "conv", "local_avgpool", "connected",
                     "softmax"]
    rng = np.random.default_rng(3)
    images, labels = rng.standard_normal((BATCH * STEPS, 3, 8, 8)), rng.integers(0, 5, BATCH * STEPS)
    np.savez(tmp_path / "batch.npz", images=images, labels=labels)
    assert main(["train", str(model), "--loss", "softmax", "--devices", "2", "--dtype", "float64",
                 "--steps", str(STEPS), "--batch", str(BATCH), "--lr", str(LR), "--momentum", str(MOMENTUM),
                 "--decay", "0", "--data", str(tmp_path / "batch.npz"),
                 "--save-weights", str(tmp_path / "out.npz")]) == 0
    start = onnx_weights(model)
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM)
    for step in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(module(torch.tensor(images[step * BATCH:(step + 1) * BATCH])),
                        torch.tensor(labels[step * BATCH:(step + 1) * BATCH])).backward()
        opt.step()
    theirs = onnx_weights(export_torch(module, x0, tmp_path / "trained.onnx"))
    with np.load(tmp_path / "out.npz") as z:
        ours = {k: z[k] for k in z.files}
    assert sorted(ours) == sorted(theirs)
    diff = max(float(np.abs(ours[k] - theirs[k]).max()) for k in theirs)
    moved = max(float(np.abs(theirs[k] - start[k]).max()) for k in theirs)
    print(f"PixelShuffle/AvgPool2d CNN, max |tilec - torch| after {STEPS} steps on 2 devices: {diff:.3g} "
          f"(moved {moved:.3g})")
    assert diff <= 1e-8 and moved > 1e-3, (diff, moved)


def test_conv_pads_map_exactly_or_are_refused():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    mapped = 0
    for h in (5, 6, 7):
        for s in (1, 2):
            for pads in ([1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 2, 2]):
                p = conv_pad((h, h), 3, s, pads)
                if p is None:
                    continue
                mapped += 1
                x = rng.standard_normal((1, 2, h, h)).astype(np.float32)
                node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], strides=[s, s], pads=pads)
                theirs = run_node(node, x, [("w", w)])
                np.testing.assert_allclose(ops.conv2d_forward(x, w, s, (p,) * 4), theirs, atol=1e-5)
    assert mapped >= 12
    assert conv_pad((8, 8), 3, 2, [0, 0, 1, 1]) is None  # TF's "same" at stride 2 on an even map


@pytest.mark.parametrize("c,s", [(3, 2), (2, 3), (1, 2)])
def test_onnx_reorg_order_is_onnxruntime_space_to_depth(c, s):
    x = np.random.default_rng(c).standard_normal((2, c, 2 * s, 3 * s)).astype(np.float32)
    theirs = run_node(helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=s), x)
    assert np.array_equal(ops.reorg_forward(x, s, "onnx"), theirs)


@pytest.mark.parametrize("mode, order", [("DCR", "onnx"), ("CRD", "space_to_depth")])
@pytest.mark.parametrize("c,s", [(8, 2), (18, 3), (4, 2)])
def test_reversed_reorg_is_onnxruntime_depth_to_space(mode, order, c, s):
    x = np.random.default_rng(c).standard_normal((2, c, 3, 2)).astype(np.float32)
    theirs = run_node(helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=s, mode=mode), x)
    assert np.array_equal(ops.reorg_forward(x, s, order, reverse=True), theirs)
    assert np.array_equal(ops.reorg_backward(theirs, s, order, reverse=True), x)


@pytest.mark.parametrize("opset", [9, 13])
def test_torch_pixel_shuffle_imports_as_reversed_space_to_depth(tmp_path, opset):
    """Exported as Reshape -> Transpose -> Reshape (opset 9) or DepthToSpace CRD (11 and up)."""
    module = nn.Sequential(nn.Conv2d(3, 8, 1), nn.PixelShuffle(2), nn.Conv2d(2, 2, 1))
    imported = import_onnx(export_torch(module, torch.zeros(1, 3, 4, 4), tmp_path / "p.onnx", opset), "sse")
    reorg = imported.graph.layer(1)
    assert (reorg["kind"], reorg["order"], reorg["reverse"], reorg["out_shape"]) == \
        ("reorg", "space_to_depth", True, [2, 8, 8])


def test_torch_pixel_unshuffle_imports_as_space_to_depth(tmp_path):
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.PixelUnshuffle(2), nn.Conv2d(16, 2, 1))
    imported = import_onnx(export_torch(module, torch.zeros(1, 3, 8, 8), tmp_path / "p.onnx"), "sse")
    reorg = imported.graph.layer(1)
    assert reorg["kind"] == "reorg" and reorg["order"] == "space_to_depth" and reorg["out_shape"] == [16, 4, 4]


def test_view_flatten_and_global_pool_heads_import(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.fc = nn.Linear(4 * 4 * 4, 3)

        def forward(self, x):
            y = F.relu(self.conv(x))
            return self.fc(y.view(y.size(0), -1))

    g = import_onnx(export_torch(Net(), torch.zeros(2, 3, 8, 8), tmp_path / "v.onnx"), "sse").graph
    assert [layer["kind"] for layer in g.layers()] == ["conv", "connected", "cost"]
    gap = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3), nn.Softmax(1))
    imported = import_onnx(export_torch(gap, torch.zeros(2, 3, 8, 8), tmp_path / "g.onnx"))
    assert [layer["kind"] for layer in imported.graph.layers()] == ["conv", "avgpool", "connected", "softmax"]
    assert "Softmax" in imported.loss_from


def test_region_loss_from_a_cfg_file(tmp_path):
    module = nn.Sequential(nn.Conv2d(3, 2 * (5 + 2), 1))
    path = export_torch(module, torch.zeros(1, 3, 4, 4), tmp_path / "r.onnx")
    cfg = tmp_path / "region.cfg"
    cfg.write_text("[region]\nanchors=1,1,2,2\nnum=2\nclasses=2\nsoftmax=1\n")
    region = import_onnx(path, f"region:{cfg}").graph.layer(1)
    assert region["kind"] == "region" and region["anchors"] == [1.0, 1.0, 2.0, 2.0] and region["softmax"]
    cfg.write_text("[region]\nanchors=1,1\nnum=1\nclasses=3\n")
    with pytest.raises(ConfigError, match=r"loss \(--loss region:.*input has 14 channels"):
        import_onnx(path, f"region:{cfg}")


# -- refusals: one line naming the node, its op and the attribute -----------------

def tiny_model(nodes, inits, out_shape=None, opset=13):
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, out_shape)],
                              initializer=[numpy_helper.from_array(np.ones(shape, np.float32), name)
                                           for name, shape in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


W = [("w", (4, 2, 3, 3))]
N = helper.make_node
REFUSED = [
    ([N("Conv", ["x", "w"], ["y"], name="c", dilations=[2, 2])], W, r"node 'c' \(Conv\): attribute dilations"),
    ([N("Conv", ["x", "w"], ["y"], name="c", group=2)], [("w", (4, 1, 3, 3))], r"'c' \(Conv\): attribute group=2"),
    ([N("Conv", ["x", "w"], ["y"], name="c", pads=[0, 0, 1, 1], strides=[2, 2])], W,
     r"'c' \(Conv\): attribute pads=\[0, 0, 1, 1\]"),
    ([N("Conv", ["x", "w"], ["z"], name="c"), N("LeakyRelu", ["z"], ["y"], name="l", alpha=0.2)], W,
     r"node 'l' \(LeakyRelu\): attribute alpha=0.2"),
    ([N("MaxPool", ["x"], ["y"], name="p", kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 0, 0])], [],
     r"'p' \(MaxPool\): attribute pads=\[1, 1, 0, 0\]"),
    ([N("MaxPool", ["x"], ["y"], name="p", kernel_shape=[2, 3])], [], r"'p' \(MaxPool\): attribute kernel_shape"),
    ([N("Sigmoid", ["x"], ["y"], name="s")], [], r"node 's' \(Sigmoid\): op Sigmoid is not supported"),
    ([N("DepthToSpace", ["x"], ["y"], name="d", blocksize=2, mode="RCD")], [],
     r"'d' \(DepthToSpace\): attribute mode=RCD"),
    ([N("Relu", ["x"], ["y"])], [], r"node #0 \(output 'y'\) \(Relu\): .*folded into the Conv"),
    ([N("AveragePool", ["x"], ["y"], name="a", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)], [],
     r"'a' \(AveragePool\): attribute pads=\[0, 0, 0, 0\] .*, ceil_mode=1"),
    ([N("Conv", ["x", "w"], ["z"], name="c"),
      N("BatchNormalization", ["z", "s", "b", "m", "v"], ["y"], name="bn", epsilon=1e-3)],
     W + [(n, (4,)) for n in "sbmv"], r"node 'bn' \(BatchNormalization\): attribute epsilon=0.001"),
    ([N("Conv", ["x", "w"], ["y"], name="c", foo=1)], W, r"'c' \(Conv\): attribute foo is not supported"),
]


@pytest.mark.parametrize("nodes, inits, match", REFUSED, ids=[m.split("): ")[-1][:24] for *_, m in REFUSED])
def test_unsupported_is_one_line_naming_node_op_and_attribute(tmp_path, nodes, inits, match):
    path = tmp_path / "bad.onnx"
    onnx.save(tiny_model(nodes, inits), str(path))
    with pytest.raises(ConfigError, match=match) as info:
        import_onnx(path, "sse")
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_cli_error_is_one_line_and_status_1(tmp_path, capsys):
    path = tmp_path / "bad.onnx"
    onnx.save(tiny_model([helper.make_node("Sigmoid", ["x"], ["y"], name="s")], []), str(path))
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "node 's' (Sigmoid)" in err
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert main(["info", str(tmp_path / "junk.onnx")]) == 1
    assert "cannot read as an ONNX model" in capsys.readouterr().err
    assert main(["info", "tiny", "--loss", "sse"]) == 1
    assert "--loss applies to .onnx models" in capsys.readouterr().err


def test_bundled_onnx_model_trains_from_the_command_line_on_two_devices(capsys):
    assert main(["train", "small-cnn.onnx", "--loss", "softmax", "--devices", "2", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out


def test_bundled_onnx_model_is_small_and_imports():
    from tilec.frontend.models import bundled_names, bundled_path
    assert "small-cnn" in bundled_names()
    path = bundled_path("small-cnn")
    assert path.suffix == ".onnx" and path.stat().st_size < 200_000
    graph = import_onnx(path, "softmax").graph
    assert graph.net["batch"] == 8 and graph.layer(0)["bn"]



def test_docstring_examples():
    import doctest

    from tilec.frontend import onnx_import, onnx_pads
    for module in (onnx_pads, onnx_import):
        assert doctest.testmod(module).failed == 0, module.__name__
