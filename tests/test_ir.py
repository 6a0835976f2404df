"""The graph IR: checked construction, shapes, verification, program, stats, table."""
import json
import subprocess
import sys

import networkx as nx
import pytest

from tilec.errors import IRError
from tilec.inspect.table import layer_table
from tilec.ir import stats
from tilec.ir.graph import FIELDS, Graph
from tilec_runtime import program as rt_program


def conv(g, filters, size=3, stride=1, pad=1, bn=False, act="linear", inputs=None):
    return g.add_layer("conv", inputs, filters=filters, size=size, stride=stride, pad=pad,
                       bn=bn, act=act)


def small_graph():
    """conv 3x3 -> maxpool 2/2 -> conv 1x1 -> route of both -> avgpool -> fc -> softmax."""
    g = Graph([3, 8, 6], name="small", batch=2)
    conv(g, 4, bn=True, act="leaky")                            # 0: 4x8x6
    g.add_layer("maxpool", size=2, stride=2, padding=0)         # 1: 4x4x3
    conv(g, 5, size=1, pad=0)                                   # 2: 5x4x3
    g.add_layer("route", [2, 1])                                # 3: 9x4x3
    g.add_layer("avgpool")                                      # 4: 9x1x1
    g.add_layer("connected", output=3, act="relu")              # 5: 3x1x1
    g.add_layer("softmax")                                      # 6
    return g


# -- construction ------------------------------------------------------------

def test_fields_are_the_runtime_contract():
    # The IR's field table must name exactly the fields the runtime requires.
    assert set(FIELDS) == set(rt_program.KINDS)
    for kind, spec in FIELDS.items():
        assert set(spec) == set(rt_program._REQUIRED[kind]), kind


def test_accessors():
    g = small_graph()
    assert len(g) == 7 and g.name == "small"
    assert g.input_shape == [3, 8, 6]
    assert g.net == {"batch": 2, "height": 8, "width": 6, "channels": 3,
                     "learning_rate": 0.001, "momentum": 0.9, "decay": 0.0001}
    assert g.predecessors(3) == [2, 1]
    assert g.predecessors(0) == [-1]
    assert g.consumers(-1) == [0]
    assert g.consumers(1) == [2, 3]
    assert g.consumers(6) == []
    layer = g.layer(0)
    assert layer == {"index": 0, "kind": "conv", "inputs": [-1], "filters": 4, "size": 3,
                     "stride": 1, "pad": 1, "bn": True, "act": "leaky"}
    with pytest.raises(IRError, match="no layer 7"):
        g.layer(7)


def test_layer_and_networkx_are_copies():
    g = small_graph()
    g.layer(3)["inputs"].append(0)
    g.net["batch"] = 99
    nxg = g.to_networkx()
    nxg.add_edge(6, 0)
    nxg.nodes[0]["filters"] = 1
    assert g.predecessors(3) == [2, 1]
    assert g.net["batch"] == 2
    assert g.layer(0)["filters"] == 4
    g.verify()
    assert isinstance(nxg, nx.DiGraph) and set(nxg.nodes) == set(range(-1, 7))


def test_copy_is_independent():
    g = small_graph()
    h = g.copy()
    h.add_layer("avgpool")
    assert len(g) == 7 and len(h) == 8


@pytest.mark.parametrize("kind, inputs, fields, fragment", [
    ("pool", None, {}, "node 0: unknown kind 'pool'"),
    ("conv", None, {"filters": 2, "size": 3, "stride": 1, "pad": 0, "bn": False},
     "node 0 (conv): missing field(s) act"),
    ("conv", None, {"filters": 2, "size": 3, "stride": 1, "pad": 0, "bn": False, "act": "relu",
                    "groups": 2}, "node 0 (conv): unknown field(s) groups"),
    ("conv", None, {"filters": 0, "size": 3, "stride": 1, "pad": 0, "bn": False, "act": "relu"},
     "node 0 (conv): filters must be a positive integer, got 0"),
    ("conv", None, {"filters": True, "size": 3, "stride": 1, "pad": 0, "bn": False, "act": "relu"},
     "filters must be a positive integer, got True"),
    ("conv", None, {"filters": 2, "size": 3, "stride": 1, "pad": -1, "bn": False, "act": "relu"},
     "pad must be a non-negative integer"),
    ("conv", None, {"filters": 2, "size": 3, "stride": 1, "pad": 0, "bn": 1, "act": "relu"},
     "bn must be True or False"),
    ("conv", None, {"filters": 2, "size": 3, "stride": 1, "pad": 0, "bn": False, "act": "tanh"},
     "act must be one of linear, leaky, relu"),
    ("cost", None, {"type": "l2"}, "node 0 (cost): type must be 'sse'"),
    ("avgpool", [0], {}, "node 0 (avgpool): input 0 is not an earlier node"),
    ("avgpool", [-2], {}, "input -2 is not an earlier node"),
    ("avgpool", [-1, -1], {}, "must have exactly one input"),
    ("route", [], {}, "node 0 (route): has no inputs"),
])
def test_add_layer_rejects(kind, inputs, fields, fragment):
    g = Graph([1, 4, 4])
    with pytest.raises(IRError) as info:
        g.add_layer(kind, inputs, **fields)
    assert fragment in str(info.value)
    assert len(g) == 0  # nothing half-added


@pytest.mark.parametrize("kwargs, fragment", [
    ({"input_shape": [3, 0, 4]}, "input shape"),
    ({"input_shape": [3, 4]}, "input shape"),
    ({"input_shape": [3, 4, 4], "batch": 0}, "batch"),
    ({"input_shape": [3, 4, 4], "momentum": 1.0}, "momentum"),
    ({"input_shape": [3, 4, 4], "learning_rate": float("nan")}, "learning_rate"),
    ({"input_shape": [3, 4, 4], "decay": -1e-4}, "decay"),
])
def test_graph_rejects_bad_net(kwargs, fragment):
    with pytest.raises(IRError, match=fragment):
        Graph(**kwargs)


# -- shapes ------------------------------------------------------------------

def test_infer_shapes_each_kind():
    g = small_graph().infer_shapes()
    got = [(layer["in_shape"], layer["out_shape"]) for layer in g.layers()]
    assert got == [
        ([3, 8, 6], [4, 8, 6]),    # (8 + 2 - 3)//1 + 1 = 8, (6 + 2 - 3) + 1 = 6
        ([4, 8, 6], [4, 4, 3]),    # (8 + 0 - 2)//2 + 1 = 4, (6 - 2)//2 + 1 = 3
        ([4, 4, 3], [5, 4, 3]),
        ([5, 4, 3], [9, 4, 3]),    # route: 5 + 4 channels; in_shape is its first input's
        ([9, 4, 3], [9, 1, 1]),
        ([9, 1, 1], [3, 1, 1]),
        ([3, 1, 1], [3, 1, 1]),
    ]


def test_shape_rules_strided_and_reorg():
    g = Graph([2, 13, 12])
    conv(g, 3, size=3, stride=2, pad=0)                      # (13 - 3)//2 + 1 = 6, (12 - 3)//2 + 1 = 5
    g.add_layer("maxpool", size=3, stride=2, padding=2)      # (6 + 2 - 3)//2 + 1 = 3, (5 - 1)//2 + 1 = 3
    g.add_layer("maxpool", size=2, stride=1, padding=1)      # size 2 stride 1 keeps 3x3
    g.infer_shapes()
    assert [layer["out_shape"] for layer in g.layers()] == [[3, 6, 5], [3, 3, 3], [3, 3, 3]]
    h = Graph([4, 6, 10])
    h.add_layer("reorg", stride=2, order="darknet", reverse=False)
    assert h.infer_shapes().layer(0)["out_shape"] == [16, 3, 5]


def test_reorg_orders_and_darknet_channels():
    g = Graph([2, 6, 10])
    g.add_layer("reorg", stride=2, order="space_to_depth", reverse=False)  # any channel count
    assert g.infer_shapes().layer(0)["out_shape"] == [8, 3, 5]
    g = Graph([2, 6, 10])
    g.add_layer("reorg", stride=2, order="darknet", reverse=False)
    with pytest.raises(IRError, match=r"node 0 \(reorg\): input 2x6x10: darknet's reorg needs channels divisible by"):
        g.infer_shapes()
    with pytest.raises(IRError, match="node 1 \\(reorg\\): order must be one of darknet, space_to_depth, onnx, got 'x'"):
        g.add_layer("reorg", stride=2, order="x", reverse=False)


@pytest.mark.parametrize("build, fragment", [
    (lambda g: conv(g, 2, size=9, pad=1), "node 0 (conv): kernel 9x9 is larger than the padded input 6x7"),
    (lambda g: g.add_layer("maxpool", size=6, stride=1, padding=0), "node 0 (maxpool): window 6x6"),
    (lambda g: g.add_layer("reorg", stride=2, order="darknet", reverse=False), "node 0 (reorg): input 1x4x5 is not divisible by stride 2"),
])
def test_impossible_shapes_name_the_node(build, fragment):
    g = Graph([1, 4, 5])
    build(g)
    with pytest.raises(IRError) as info:
        g.infer_shapes()
    assert fragment in str(info.value)
    assert info.value.node == 0


def test_infer_shapes_is_incremental():
    # Shapes already inferred are kept; later layers are added and inferred.
    g = Graph([1, 4, 4])
    conv(g, 2)
    g.infer_shapes()
    g.add_layer("avgpool")
    assert "out_shape" not in g.layer(1)
    assert g.infer_shapes().layer(1)["out_shape"] == [2, 1, 1]


# -- verify ------------------------------------------------------------------

def test_verify_accepts_a_good_graph():
    g = small_graph()
    assert g.verify() is g


def test_verify_route_sizes_name_the_node():
    g = Graph([1, 8, 8])
    conv(g, 2)
    g.add_layer("maxpool", size=2, stride=2, padding=0)
    conv(g, 2)
    conv(g, 2)
    conv(g, 2)
    g.add_layer("route", [4, 0])  # 2x4x4 with 2x8x8
    g.add_layer("cost", type="sse")
    with pytest.raises(IRError, match=r"^node 5 \(route\): inputs have different sizes: "
                                      r"layer 4 is 2x4x4, layer 0 is 2x8x8"):
        g.verify()


def test_verify_loss_must_be_last():
    g = Graph([1, 4, 4])
    g.add_layer("softmax")
    g.add_layer("avgpool")
    with pytest.raises(IRError, match=r"^node 0 \(softmax\): a loss must be the last layer"):
        g.verify()


def test_verify_last_must_be_loss():
    g = Graph([1, 4, 4])
    g.add_layer("avgpool")
    with pytest.raises(IRError, match=r"^node 0 \(avgpool\): the last layer must be a loss"):
        g.verify()


def test_verify_empty():
    with pytest.raises(IRError, match="no layers"):
        Graph([1, 4, 4]).verify()


def test_verify_catches_corruption():
    # add_layer cannot make a cycle or a dangling edge; verify still checks,
    # so corrupt the private graph to exercise those checks.
    g = small_graph()
    g._g.add_edge(5, 2)
    with pytest.raises(IRError, match=r"^node 2 \(conv\): reads later node 5, a cycle: "
                                      r"2 -> 3 -> 4 -> 5 -> 2"):
        g.verify()
    g = small_graph()
    g._g.add_edge(0, 4)
    with pytest.raises(IRError, match=r"^node 4 \(avgpool\): edges \[0, 3\] do not match inputs \[3\]"):
        g.verify()
    g = small_graph().infer_shapes()
    g._g.nodes[4]["out_shape"] = [9, 2, 2]
    with pytest.raises(IRError, match=r"^node 4 \(avgpool\): stored out_shape"):
        g.verify()


# -- program -----------------------------------------------------------------

def test_to_program_is_the_runtime_format():
    g = small_graph()
    program = g.to_program()
    assert rt_program.validate(program) is program
    assert json.loads(json.dumps(program)) == program  # plain JSON data
    assert program[3] == {"index": 3, "kind": "route", "inputs": [2, 1],
                          "in_shape": [5, 4, 3], "out_shape": [9, 4, 3]}
    assert program[1] == {"index": 1, "kind": "maxpool", "inputs": [0], "in_shape": [4, 8, 6],
                          "out_shape": [4, 4, 3], "size": 2, "stride": 2, "padding": 0}
    # The program is a copy: changing it leaves the graph alone.
    program[0]["filters"] = 99
    assert g.layer(0)["filters"] == 4


def test_to_program_verifies():
    g = Graph([1, 4, 4])
    g.add_layer("avgpool")
    with pytest.raises(IRError, match="the last layer must be a loss"):
        g.to_program()


# -- stats -------------------------------------------------------------------

def test_param_count_matches_runtime_shapes():
    g = small_graph().infer_shapes()
    counts = [stats.param_count(layer) for layer in g.layers()]
    # conv0: 3*4*3*3 weights + 4 gamma + 4 beta (bn: no conv bias, running stats are buffers)
    # conv2: 4*5*1*1 weights + 5 bias; connected: 9*3 weights + 3 bias
    assert counts == [108 + 8, 0, 20 + 5, 0, 0, 27 + 3, 0]


def test_forward_and_backward_flops():
    g = Graph([3, 8, 8])
    g.add_layer("maxpool", size=2, stride=2, padding=0)    # 0: 3x4x4, on the raw image
    conv(g, 4, bn=True, act="leaky")                       # 1: 4x4x4
    conv(g, 2, size=1, pad=0, act="relu")                  # 2: 2x4x4
    g.add_layer("connected", output=5, act="linear")       # 3
    g.add_layer("cost", type="sse")                        # 4
    g.infer_shapes()
    s = stats.layer_stats(g, batch=3)
    # maxpool: 3 comparisons per output element (2x2 window), no backward:
    # nothing before it trains.
    assert s[0].fwd_flops == 3 * (3 * 4 * 4) * 3 and s[0].bwd_flops == 0
    # conv1: 2*C*k*k per output element = 2*3*9 = 54, + bn 7 + leaky 2, over 4*4*4 outputs.
    # Its input is (via a parameter-free maxpool) the network input: no input
    # gradient, so backward = weight gradient (54) + bn 7 + leaky 2.
    n1 = 4 * 4 * 4
    assert s[1].fwd_flops == (54 + 7 + 2) * n1 * 3
    assert s[1].bwd_flops == (54 + 7 + 2) * n1 * 3
    # conv2: 1x1, 2*4 = 8 per output + bias 1 + relu 1; backward 2x the product.
    n2 = 2 * 4 * 4
    assert s[2].fwd_flops == (8 + 1 + 1) * n2 * 3
    assert s[2].bwd_flops == (2 * 8 + 1 + 1) * n2 * 3
    # connected 32 -> 5: 2*32*5 + 5 bias; backward 2x product + bias.
    assert s[3].fwd_flops == (320 + 5) * 3 and s[3].bwd_flops == (640 + 5) * 3
    assert s[4].fwd_flops == 3 * 5 * 3 and s[4].bwd_flops == 1 * 5 * 3
    assert s[1].act_bytes == n1 * 4 * 3  # float32, batch 3


def test_a_tile_counts_the_flops_ir_stats_counts():
    """FLOPs are counted once (``ir.stats``): a tile's regions cost the
    per-position forward FLOPs times their area, so one tile over the whole
    map costs what ``layer_stats`` says, and a split costs more (the halo)."""
    from tilec.analysis.regions import even_splits
    from tilec.analysis.tiles import group_flops, group_tiles, tile_flops
    g = Graph([3, 12, 12])
    conv(g, 4, bn=True, act="leaky")                       # 0
    g.add_layer("maxpool", size=2, stride=2, padding=0)    # 1
    conv(g, 2, act="relu")                                 # 2
    g.add_layer("cost", type="sse")
    program = g.to_program()
    whole = sum(s.fwd_flops for s in stats.layer_stats(g)[:3])
    assert group_flops(program, 0, 2) == whole
    tile, = group_tiles(program, 0, 2, [0, 6], [0, 6])
    assert tile_flops(program, tile) == whole
    halves = group_tiles(program, 0, 2, even_splits(6, 2), [0, 6])
    assert sum(tile_flops(program, t) for t in halves) > whole
    assert stats.forward_flops_per_position(program[0]) == (2 * 3 * 9 + 7 + 2) * 4


def test_needs_input_grad():
    g = small_graph()
    assert stats.needs_input_grad(g) == {0: False, 1: True, 2: True, 3: True, 4: True,
                                         5: True, 6: True}


def test_activation_bytes_dtypes():
    layer = {"out_shape": [2, 3, 5]}
    assert stats.activation_bytes(layer, batch=4, dtype="float64") == 30 * 8 * 4
    assert stats.activation_bytes(layer, batch=1, dtype=2) == 60
    np = pytest.importorskip("numpy")
    assert stats.dtype_bytes(np.dtype("float32")) == 4
    with pytest.raises(ValueError, match="unknown dtype"):
        stats.dtype_bytes("complex")


def test_totals():
    s = stats.layer_stats(small_graph(), batch=2)
    t = stats.totals(s)
    assert t.params == 116 + 25 + 30
    assert t.fwd_flops == sum(x.fwd_flops for x in s)
    assert t.act_bytes == sum(x.act_bytes for x in s)


# -- table -------------------------------------------------------------------

def test_layer_table_rows_align():
    g = small_graph()
    text = layer_table(g, batch=2)
    lines = text.splitlines()
    assert lines[0] == "small: input 3x8x6, batch 2, float32"
    header, rows, total = lines[1], lines[2:-1], lines[-1]
    assert len(rows) == len(g)
    assert rows[3].split()[:2] == ["3", "route"] and "layers 2,1" in rows[3]
    assert "3x8x6 -> 4x8x6" in rows[0] and "4 3x3/1 pad 1 bn leaky" in rows[0]
    for column in ("params", "fwd MFLOPs", "bwd MFLOPs", "act MB"):
        end = header.index(column) + len(column)  # numbers are right-aligned under it
        for row in rows:
            assert row[end - 1].isdigit() and (len(row) == end or row[end] == " "), (column, row)
    assert total.startswith("total: 171 parameters, ")


def test_import_tilec_is_light():
    code = ("import sys, tilec, tilec.frontend, tilec.frontend.models\n"
            "tilec.frontend.models.bundled_names()\n"
            "assert 'networkx' not in sys.modules, 'networkx imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
