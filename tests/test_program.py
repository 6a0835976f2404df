"""The runtime refuses malformed programs before running anything (a plan
may come from a file or a peer)."""
import copy
import re

import pytest

from programs import ProgramBuilder
from tilec.errors import IRError
from tilec_runtime.errors import ProgramError
from tilec_runtime.program import validate


def good():
    b = ProgramBuilder(2, 12, 12)
    b.conv(4, 3, 1, "same", bn=True, act="leaky")
    b.maxpool(2, 2)
    b.reorg(2, src=0)
    b.avgpool(src=1)
    b.connected(3, act="relu")
    b.softmax()
    return b.build()


@pytest.mark.parametrize("layer, key, value, match", [
    (4, "act", "swish", "activation"),
    (0, "stride", 0, "stride"),
    (0, "bn", "no", "bn"),
    (1, "padding", -1, "padding"),
    (1, "in_shape", [4, 12, 11], "in_shape"),
    (0, "out_shape", [4, 12, 13], "out_shape"),
    (2, "out_shape", [16, 6, 5], "out_shape"),
    (4, "output", 0, "output"),
    (2, "order", "pixel_unshuffle", "layer 2 \\(reorg\\): order must be one of darknet, space_to_depth, onnx"),
    (2, "reverse", 1, "layer 2 \\(reorg\\): reverse must be true or false"),
])
def test_bad_fields_are_refused(layer, key, value, match):
    program = copy.deepcopy(good())
    program[layer][key] = value
    with pytest.raises(ProgramError, match=match):
        validate(program)


def test_cost_types_and_route_shapes_are_checked():
    b = ProgramBuilder(1, 8, 8)
    b.conv(2, 3, 1, "same")
    b.maxpool(2, 2)
    b.conv(1, 1, 1, 0)
    b.cost()
    program = b.build()
    bad = copy.deepcopy(program)
    bad[-1]["type"] = "l1"
    with pytest.raises(ProgramError, match="sse"):
        validate(bad)
    bad = copy.deepcopy(program)
    bad.insert(3, {"index": 3, "kind": "route", "inputs": [2, 0], "in_shape": [1, 4, 4], "out_shape": [3, 4, 4]})
    bad[4].update(index=4, inputs=[3], in_shape=[3, 4, 4])
    with pytest.raises(ProgramError, match="route"):
        validate(bad)
    assert validate(program) is program


def test_reorg_order_is_required_and_darknet_needs_whole_channel_groups():
    program = copy.deepcopy(good())
    del program[2]["order"]  # a plan written before the field existed meant space_to_depth: no silent default
    with pytest.raises(ProgramError, match="layer 2 \\(reorg\\): missing field 'order'"):
        validate(program)
    b = ProgramBuilder(2, 12, 12)
    b.conv(6, 3, 1, "same")
    b.reorg(2, order="space_to_depth")
    b.cost()
    program = b.build()
    program[1]["order"] = "darknet"
    with pytest.raises(ProgramError, match="layer 1 \\(reorg\\): input 6x12x12: darknet's reorg needs channels "
                                           "divisible by stride² = 4"):
        validate(program)


def test_depth_to_space_and_local_avgpool_shapes_are_checked():
    b = ProgramBuilder(8, 6, 5)
    b.reorg(2, order="onnx", reverse=True)                  # 0: 2x12x10
    b.local_avgpool(3, 2, padding=2)                        # 1: 2x6x5
    b.cost()
    program = b.build()
    assert program[0]["out_shape"] == [2, 12, 10] and program[1]["out_shape"] == [2, 6, 5]
    cases = [(0, "order", "darknet", "a reversed darknet reorg is order onnx"),
             (1, "count_pad", 0, "count_pad must be true or false"),
             (1, "padding", 6, "padding 6 on input 2x12x10: a 3x3 window at stride 2 would average padding alone")]
    for layer, key, value, match in cases:
        bad = copy.deepcopy(program)
        bad[layer][key] = value
        with pytest.raises(ProgramError, match=re.escape(match)):
            validate(bad)
    bad = copy.deepcopy(program)
    bad[0]["in_shape"] = [6, 6, 5]  # the network input
    with pytest.raises(ProgramError, match="depth-to-space needs channels divisible by stride² = 4"):
        validate(bad)


@pytest.mark.parametrize("layer, key, value, reason", [
    (0, "size", 15, "kernel 15x15 is larger than the padded input 14x14 (input 2x12x12, pad 1)"),
    (1, "size", 20, "window 20x20 is larger than the padded input"),
    (2, "stride", 5, "input 4x12x12 is not divisible by stride 5"),
])
def test_an_impossible_shape_gives_the_irs_reason(layer, key, value, reason):
    """Shapes are inferred once (``program.out_shape``): a plan off the
    network is refused for the same reason the planner's IR gives."""
    from tilec.ir import Graph
    program = copy.deepcopy(good())
    program[layer][key] = value
    with pytest.raises(ProgramError, match=f"layer {layer} .*" + re.escape(reason)):
        validate(program)
    g = Graph(program[0]["in_shape"])
    for l in program:
        g.add_layer(l["kind"], l["inputs"], **{k: v for k, v in l.items()
                                               if k not in ("index", "kind", "inputs", "in_shape", "out_shape")})
    with pytest.raises(IRError, match=f"node {layer} .*" + re.escape(reason)):
        g.infer_shapes()
