"""The .cfg frontend: bundled models, every error path, darknet's shape rules."""
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilec.errors import ConfigError, TilecError
from tilec.frontend.cfg import NET_IGNORED, parse_cfg
from tilec.frontend.models import bundled_names, load_model
from tilec.ir.stats import layer_stats, totals
from tilec_runtime import program as rt_program

NET = "[net]\nheight=8\nwidth=8\nchannels=3\n"  # lines 1-4
CONV = "[convolutional]\nfilters=2\nsize=3\n"


def conv_params(c, f, k, bn):
    """Weights c*f*k*k, plus gamma and beta (bn) or a bias (no bn)."""
    return c * f * k * k + (2 * f if bn else f)


# -- bundled models ----------------------------------------------------------

def test_bundled_names():
    assert bundled_names() == ["detector-small", "small-cnn", "tiny", "tiny416", "yolov2", "yolov2-tiny"]


@pytest.mark.parametrize("name", ["tiny", "tiny416", "yolov2-tiny", "yolov2", "detector-small"])
def test_every_bundled_model_parses_to_a_valid_program(name):
    g = load_model(name)
    assert g.name == name
    program = g.to_program()
    assert rt_program.validate(program) is program
    assert program[-1]["kind"] in rt_program.LOSSES


def test_tiny():
    g = load_model("tiny")
    assert g.input_shape == [3, 32, 32]
    kinds = [layer["kind"] for layer in g.layers()]
    assert kinds == ["conv", "maxpool"] * 3 + ["conv", "avgpool", "connected", "softmax"]
    # 32 -> 16 -> 8 -> 4 through the maxpools; 128 channels averaged to 1x1.
    assert g.layer(6)["out_shape"] == [128, 4, 4]
    assert g.layer(8)["out_shape"] == [10, 1, 1]
    assert totals(layer_stats(g)).params == (conv_params(3, 16, 3, True) + conv_params(16, 32, 3, True)
                                             + conv_params(32, 64, 3, True) + conv_params(64, 128, 3, True)
                                             + 128 * 10 + 10)


def test_yolov2_tiny_shapes_params_flops():
    g = load_model("yolov2-tiny")
    layers = g.layers()
    assert g.input_shape == [3, 416, 416]
    assert [layer["kind"] for layer in layers] == ["conv", "maxpool"] * 6 + ["conv"] * 3 + ["region"]
    # Maxpools 2/2 (padding 1): 416 -> 208 -> 104 -> 52 -> 26 -> 13; the
    # sixth is 2/1 with padding 1: (13 + 1 - 2)//1 + 1 = 13.
    assert [layers[i]["out_shape"][1] for i in (1, 3, 5, 7, 9, 11)] == [208, 104, 52, 26, 13, 13]
    assert layers[14]["out_shape"] == [125, 13, 13]
    assert layers[14]["act"] == "linear" and not layers[14]["bn"] and layers[14]["pad"] == 0
    # darknet's [region] of yolov2-tiny-voc.cfg: 5 anchors x (4 + 1 + 20) = 125 channels
    region = layers[15]
    assert region["in_shape"] == region["out_shape"] == [125, 13, 13]
    assert region["anchors"] == [1.08, 1.19, 3.42, 4.41, 6.63, 11.38, 9.42, 5.11, 16.62, 10.52]
    assert (region["num"], region["classes"], region["coords"]) == (5, 20, 4)
    assert region["softmax"] and region["rescore"] and region["bias_match"]
    assert (region["object_scale"], region["noobject_scale"], region["class_scale"], region["coord_scale"],
            region["thresh"], region["jitter"], region["max_boxes"]) == (5, 1, 1, 1, 0.6, 0.2, 30)
    # Parameters, by hand (3x3 convs with bn, then the 1x1 with bias):
    #   3*16*9 + 32       =       464
    #   16*32*9 + 64      =     4,672
    #   32*64*9 + 128     =    18,560
    #   64*128*9 + 256    =    73,984
    #   128*256*9 + 512   =   295,424
    #   256*512*9 + 1024  = 1,180,672
    #   512*1024*9 + 2048 = 4,720,640
    #   1024*1024*9 + 2048= 9,439,232
    #   1024*125 + 125    =   128,125
    #   total             = 15,861,773
    assert totals(layer_stats(g)).params == 15_861_773
    # Convolution FLOPs (2 per multiply-add): 2*C*k*k*F*Ho*Wo
    #   conv0: 2*3*9*16*416^2 = 149,520,384
    #   conv2..conv10: each 2*C*9*2C*(416/2^j)^2 = 398,721,024, five of them
    #   conv12: 2*512*9*1024*13^2 = 1,594,884,096
    #   conv13: 2*1024*9*1024*13^2 = 3,189,768,192
    #   conv14: 2*1024*125*13^2 = 43,264,000
    #   total 6,971,041,792 (darknet prints 6.97 BFLOPs for yolov2-tiny-voc)
    conv_flops = sum(2 * layer["in_shape"][0] * layer["size"] ** 2 * layer["filters"]
                     * layer["out_shape"][1] * layer["out_shape"][2]
                     for layer in layers if layer["kind"] == "conv")
    assert conv_flops == 6_971_041_792
    assert totals(layer_stats(g)).fwd_flops > conv_flops  # plus bn, leaky, pooling


def test_yolov2_passthrough():
    g = load_model("yolov2")
    layers = g.layers()
    assert g.input_shape == [3, 608, 608]
    assert len(layers) == 32
    # Five 2/2 maxpools: 608 / 32 = 19; the passthrough taps layer 16 at 38x38.
    assert layers[16]["out_shape"] == [512, 38, 38]
    assert layers[25]["kind"] == "route" and layers[25]["inputs"] == [16]       # layers=-9: 25 - 9
    assert layers[26]["out_shape"] == [64, 38, 38]
    assert layers[27]["kind"] == "reorg" and layers[27]["out_shape"] == [256, 19, 19]  # 64*2*2
    assert layers[27]["order"] == "darknet"  # the permutation its published weights expect
    assert layers[28]["inputs"] == [27, 24]                                     # layers=-1,-4
    assert layers[28]["out_shape"] == [256 + 1024, 19, 19]
    assert layers[30]["out_shape"] == [425, 19, 19]
    assert layers[31]["kind"] == "region" and (layers[31]["classes"], layers[31]["num"]) == (80, 5)
    assert layers[31]["jitter"] == 0.3 and layers[31]["anchors"][:2] == [0.57273, 0.677385]
    # Parameters: the Darknet-19 part (layers 0-22, bn everywhere)
    #   3x3: 3*32, 32*64, 64*128, 64*128, 128*256, 128*256, 256*512 x3, 512*1024 x3 (x9 each)
    #   1x1: 128*64, 256*128, 512*256 x2, 1024*512 x2
    # then 1024*1024*9 x2, 512*64 (1x1), 1280*1024*9, and 1024*425 + 425 bias.
    k3 = [(3, 32), (32, 64), (64, 128), (64, 128), (128, 256), (128, 256), (256, 512), (256, 512),
          (256, 512), (512, 1024), (512, 1024), (512, 1024), (1024, 1024), (1024, 1024), (1280, 1024)]
    k1 = [(128, 64), (256, 128), (512, 256), (512, 256), (1024, 512), (1024, 512), (512, 64)]
    expected = (sum(conv_params(c, f, 3, True) for c, f in k3)
                + sum(conv_params(c, f, 1, True) for c, f in k1) + conv_params(1024, 425, 1, False))
    assert expected == 50_962_889
    assert totals(layer_stats(g)).params == expected


def test_load_model_paths_and_unknown_names(tmp_path):
    path = tmp_path / "mine.cfg"
    path.write_text(NET + "[avgpool]\n[softmax]\n")
    assert load_model(str(path)).name == "mine"
    assert load_model(path).name == "mine"
    with pytest.raises(TilecError, match="unknown model .yolov3.*tiny, tiny416, yolov2, yolov2-tiny"):
        load_model("yolov3")
    with pytest.raises(ConfigError, match="missing.cfg: cannot read"):
        load_model(tmp_path / "missing.cfg")


# -- syntax and defaults -----------------------------------------------------

def test_comments_whitespace_aliases_and_ignored_keys():
    text = ("# a comment\n"
            "; another\n"
            "[network]\n"
            "height = 8   # trailing comment\n"
            "width=8\nchannels=3\nsubdivisions=4\n"
            + "".join(f"{key}=1\n" for key in NET_IGNORED if key != "subdivisions")
            + "\n[conv]\nfilters=2\nsize=3\npad=1\n\n[MAX]\n[soft]\n")
    g = parse_cfg(text)
    assert g.net == {"batch": 1, "height": 8, "width": 8, "channels": 3,
                     "learning_rate": 0.001, "momentum": 0.9, "decay": 0.0001}
    # Defaults: stride 1, no bn, linear; maxpool stride 1, size = stride, padding = size - 1.
    assert {k: g.layer(0)[k] for k in ("stride", "bn", "act", "pad")} == \
        {"stride": 1, "bn": False, "act": "linear", "pad": 1}
    assert {k: g.layer(1)[k] for k in ("size", "stride", "padding")} == {"size": 1, "stride": 1, "padding": 0}


def test_net_settings():
    g = parse_cfg("[net]\nbatch=4\nheight=6\nwidth=10\nchannels=2\nlearning_rate=0.01\n"
                  "momentum=0.5\ndecay=5e-4\n[avgpool]\n[cost]\n", path="x/mine.cfg")
    assert g.name == "mine"
    assert g.net == {"batch": 4, "height": 6, "width": 10, "channels": 2,
                     "learning_rate": 0.01, "momentum": 0.5, "decay": 0.0005}
    assert g.input_shape == [2, 6, 10]
    assert g.layer(1)["type"] == "sse"


@pytest.mark.parametrize("keys, pad", [
    ("", 0),                    # darknet's default: no padding
    ("pad=1\n", 2),             # size//2 for size 5
    ("pad=0\n", 0),
    ("padding=3\n", 3),         # explicit count
    ("pad=0\npadding=1\n", 1),
    ("pad=1\npadding=2\n", 2),  # agrees with pad=1
])
def test_conv_padding(keys, pad):
    g = parse_cfg(NET + "[convolutional]\nfilters=1\nsize=5\n" + keys + "[cost]\n")
    assert g.layer(0)["pad"] == pad
    assert g.layer(0)["out_shape"] == [1, 8 + 2 * pad - 4, 8 + 2 * pad - 4]


def test_route_absolute_and_relative():
    same = CONV + "pad=1\n"  # keeps 8x8
    g = parse_cfg(NET + same + same + "[route]\nlayers=0, -1\n[cost]\n")
    assert g.layer(2)["inputs"] == [0, 1]  # absolute 0; -1 relative to the route (2)
    assert g.layer(2)["out_shape"] == [4, 8, 8]


def test_local_avgpool_and_reverse_reorg():
    """AlexeyAB's [local_avgpool] (maxpool's keys and defaults, padding not
    counted) and darknet's [reorg] reverse=1 (DepthToSpace DCR)."""
    g = parse_cfg(NET + "[local_avgpool]\nsize=3\nstride=2\n[convolutional]\nfilters=8\nsize=1\n"
                  "[reorg]\nstride=2\nreverse=1\n[cost]\n")
    pool, reorg = g.layer(0), g.layer(2)
    assert (pool["size"], pool["stride"], pool["padding"], pool["count_pad"], pool["out_shape"]) == \
        (3, 2, 2, False, [3, 4, 4])
    assert (reorg["order"], reorg["reverse"], reorg["out_shape"]) == ("onnx", True, [2, 8, 8])


# -- every error -------------------------------------------------------------

ERRORS = [
    # (name, text, line, section or None, fragment)
    ("key before section", "height=3\n" + NET, 1, None, "comes before any [section]"),
    ("no [net]", CONV, 1, "convolutional", "the first section must be [net]"),
    ("empty", "", None, None, "the first section must be [net]"),
    ("only comments", "# nothing\n", None, None, "the first section must be [net]"),
    ("malformed header", NET + "[conv\n", 5, None, "malformed section header '[conv'"),
    ("empty header", NET + "[]\n", 5, None, "malformed section header"),
    ("not key=value", NET + "hello\n", 5, "net", "expected key=value or [section], got 'hello'"),
    ("empty value", NET + "batch=\n", 5, "net", "expected key=value"),
    ("duplicate key", NET + CONV + "size=3\n", 8, "convolutional",
     "duplicate key 'size' (first set at line 7)"),
    ("unknown section", NET + "[foo]\n[cost]\n", 5, "foo", "unknown section"),
    ("yolo", NET + "[yolo]\nclasses=20\n", 5, "yolo", "[yolo] is not supported yet"),
    ("region channels", NET + "[convolutional]\nfilters=12\nsize=1\n[region]\nclasses=2\nnum=2\n", 8, "region",
     "layer 1: input has 12 channels, but num=2 x (4 coords + 1 + 2 classes) = 14"),
    ("region anchors", NET + "[region]\nnum=2\nanchors=1,1,2\n", 7, "region",
     "anchors: 3 values for num=2 (need 4: a width and a height each)"),
    ("region anchor value", NET + "[region]\nanchors=1,x\n", 6, "region",
     "anchors=1,x: expected comma-separated numbers"),
    ("region zero anchor", NET + "[region]\nanchors=1,0\n", 6, "region", "every value must be a positive number"),
    ("region coords", NET + "[region]\ncoords=5\n", 6, "region", "coords=5: must be 4"),
    ("region softmax flag", NET + "[region]\nsoftmax=2\n", 6, "region", "softmax=2: must be 0 or 1"),
    ("region thresh", NET + "[region]\nthresh=1.5\n", 6, "region", "thresh=1.5: must be in [0, 1)"),
    ("region unknown key", NET + "[region]\nmask=0,1\n", 6, "region", "unknown key 'mask'"),
    ("region random typo", NET + "[region]\nrandom=yes\n", 6, "region", "random=yes: expected an integer"),
    ("shortcut", NET + "[shortcut]\n", 5, "shortcut", "not supported yet"),
    ("second [net]", NET + "[net]\n", 5, "net", "[net] may appear only once"),
    ("unknown net key", NET + "max_crop=3\n", 5, "net", "unknown key 'max_crop'"),
    ("unknown key", NET + CONV + "groups=2\n[cost]\n", 8, "convolutional", "unknown key 'groups'"),
    ("missing height", "[net]\nwidth=8\nchannels=3\n[cost]\n", 1, "net", "missing required key 'height'"),
    ("non-integer", NET + "[convolutional]\nfilters=2.5\nsize=3\n[cost]\n", 6, "convolutional",
     "filters=2.5: expected an integer"),
    ("negative size", NET + "[convolutional]\nfilters=2\nsize=-3\n[cost]\n", 7, "convolutional",
     "size=-3: must be positive"),
    ("zero stride", NET + CONV + "stride=0\n[cost]\n", 8, "convolutional", "stride=0: must be positive"),
    ("negative padding", NET + CONV + "padding=-1\n[cost]\n", 8, "convolutional", "must be >= 0"),
    ("pad flag", NET + CONV + "pad=2\n[cost]\n", 8, "convolutional", "pad=2: must be 0 or 1"),
    ("pad conflict", NET + CONV + "pad=1\npadding=0\n[cost]\n", 9, "convolutional",
     "pad=1 (padding 1) conflicts with padding=0"),
    ("batch_normalize", NET + CONV + "batch_normalize=yes\n[cost]\n", 8, "convolutional",
     "expected an integer"),
    ("unknown activation", NET + CONV + "activation=logistic\n[cost]\n", 8, "convolutional",
     "activation=logistic: unknown activation (supported: linear, leaky, relu)"),
    ("missing filters", NET + "[convolutional]\nsize=3\n[cost]\n", 5, "convolutional",
     "missing required key 'filters'"),
    ("bad float", NET + "learning_rate=fast\n[cost]\n", 5, "net", "learning_rate=fast: expected a number"),
    ("momentum", NET + "momentum=1.5\n[cost]\n", 5, "net", "momentum=1.5: must be in [0, 1)"),
    ("nan decay", NET + "decay=nan\n[cost]\n", 5, "net", "decay=nan: must be a finite number >= 0"),
    ("bad subdivisions", NET + "subdivisions=0\n[cost]\n", 5, "net", "subdivisions=0: must be positive"),
    ("connected output", NET + "[connected]\nactivation=relu\n[cost]\n", 5, "connected",
     "missing required key 'output'"),
    ("softmax groups", NET + "[softmax]\ngroups=2\n", 6, "softmax", "groups=2: must be 1"),
    ("cost type", NET + "[cost]\ntype=smooth\n", 6, "cost", "type=smooth: unknown type (supported: sse)"),
    ("reorg stride", NET + "[reorg]\nstride=4\n[cost]\n", 6, "reorg", "stride=4: must be 2"),
    ("reorg no stride", NET + "[reorg]\n[cost]\n", 5, "reorg", "missing required key 'stride'"),
    ("reorg reverse", NET + "[reorg]\nstride=2\nreverse=2\n[cost]\n", 7, "reorg", "reverse=2: must be 0 or 1"),
    ("reverse channels", NET + "[reorg]\nstride=2\nreverse=1\n[cost]\n", 5, "reorg",
     "layer 0: input 3x8x8: depth-to-space needs channels divisible by stride² = 4"),
    ("local_avgpool key", NET + "[local_avgpool]\nsize=2\ncount_pad=1\n[cost]\n", 7, "local_avgpool",
     "unknown key 'count_pad'"),
    ("local_avgpool padding alone", NET + "[local_avgpool]\nsize=2\nstride=1\npadding=4\n[cost]\n", 5,
     "local_avgpool", "would average padding alone"),
    ("route to later layer", NET + CONV + "[route]\nlayers=3\n[cost]\n", 9, "route",
     "layers=3: 3 is layer 3, but route 1 can read only layers 0..0"),
    ("route to itself", NET + CONV + "[route]\nlayers=1\n[cost]\n", 9, "route", "1 is layer 1"),
    ("route before the first", NET + CONV + "[route]\nlayers=-2\n[cost]\n", 9, "route",
     "-2 is layer -1, but route 1"),
    ("route first", NET + "[route]\nlayers=-1\n[cost]\n", 6, "route",
     "can read only no layer (it is layer 0)"),
    ("route not integers", NET + CONV + "[route]\nlayers=-1,a\n[cost]\n", 9, "route",
     "expected comma-separated integers"),
    ("conv kernel too large", NET + "[convolutional]\nfilters=2\nsize=11\n[cost]\n", 5, "convolutional",
     "layer 0: kernel 11x11 is larger than the padded input 8x8"),
    ("maxpool window too large", NET + CONV + "[maxpool]\nsize=9\nstride=1\npadding=0\n[cost]\n",
     8, "maxpool", "layer 1: window 9x9 is larger than the padded input 6x6"),
    ("reorg not divisible", NET + "[convolutional]\nfilters=2\nsize=4\n[reorg]\nstride=2\n[cost]\n",
     8, "reorg", "layer 1: input 2x5x5 is not divisible by stride 2"),
    ("reorg channels", NET + "[convolutional]\nfilters=2\nsize=1\n[reorg]\nstride=2\n[cost]\n",
     8, "reorg", "layer 1: input 2x8x8: darknet's reorg needs channels divisible by stride² = 4"),
    ("route size mismatch", NET + CONV + "[maxpool]\nsize=2\nstride=2\n[route]\nlayers=-1,-2\n[cost]\n",
     11, "route", "layer 2: inputs have different sizes: layer 1 is 2x3x3, layer 0 is 2x6x6"),
    ("loss not last", NET + "[softmax]\n[avgpool]\n[cost]\n", 6, "avgpool",
     "a loss must be the last layer, but [softmax] at line 5 comes before this section"),
    ("no loss", NET + CONV, 5, "convolutional", "the last section must be a loss"),
    ("no layers", NET, 1, "net", "no layers after [net]"),
]


@pytest.mark.parametrize("name, text, line, section, fragment", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(name, text, line, section, fragment):
    with pytest.raises(ConfigError) as info:
        parse_cfg(text, path="m.cfg")
    err = info.value
    assert (err.path, err.line, err.section) == ("m.cfg", line, section)
    prefix = "m.cfg" + (f":{line}" if line else "") + ": " + (f"[{section}]: " if section else "")
    assert str(err).startswith(prefix), str(err)
    assert fragment in str(err), str(err)


def test_error_names_the_file(tmp_path):
    path = tmp_path / "bad.cfg"
    path.write_text(NET + "[yolo]\n")
    with pytest.raises(ConfigError, match=r"bad\.cfg:5: \[yolo\]: \[yolo\] is not supported yet"):
        parse_cfg(path)
    with pytest.raises(ConfigError, match=r"^<cfg>:5: "):
        parse_cfg(NET + "[yolo]\n")


def test_first_error_in_file_order_wins():
    # A shape error at line 5 is reported before an unknown key further down.
    text = NET + "[convolutional]\nfilters=2\nsize=11\n[avgpool]\nbogus=1\n[cost]\n"
    with pytest.raises(ConfigError, match="m.cfg:5: .*kernel 11x11"):
        parse_cfg(text, path="m.cfg")


# -- darknet's shape formula on random stacks --------------------------------

def _conv_case():
    return st.fixed_dictionaries({
        "kind": st.just("conv"), "filters": st.integers(1, 8), "size": st.integers(1, 7),
        "stride": st.integers(1, 3),
        "padmode": st.sampled_from(["none", "pad", "padding"]), "padding": st.integers(0, 3)})


def _maxpool_case():
    return st.fixed_dictionaries({
        "kind": st.just("maxpool"), "size": st.none() | st.integers(1, 4),
        "stride": st.none() | st.integers(1, 3), "padding": st.none() | st.integers(0, 4)})


def _render(case):
    """The .cfg section of a generated layer, and its darknet (C, size, stride, pad) params."""
    if case["kind"] == "conv":
        text = f"[convolutional]\nfilters={case['filters']}\nsize={case['size']}\nstride={case['stride']}\n"
        if case["padmode"] == "pad":
            text += "pad=1\n"
        elif case["padmode"] == "padding":
            text += f"padding={case['padding']}\n"
        return text
    text = "[maxpool]\n"
    for key in ("size", "stride", "padding"):
        if case[key] is not None:
            text += f"{key}={case[key]}\n"
    return text


def _darknet_shape(case, shape):
    """darknet's parse_convolutional / parse_maxpool arithmetic; None if impossible."""
    c, h, w = shape
    if case["kind"] == "conv":
        k, s = case["size"], case["stride"]
        p = {"none": 0, "pad": k // 2, "padding": case["padding"]}[case["padmode"]]
        if h + 2 * p < k or w + 2 * p < k:
            return None
        return [case["filters"], (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1]
    s = case["stride"] if case["stride"] is not None else 1
    k = case["size"] if case["size"] is not None else s
    p = case["padding"] if case["padding"] is not None else k - 1
    if h + p < k or w + p < k:
        return None
    return [c, (h + p - k) // s + 1, (w + p - k) // s + 1]


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), c=st.integers(1, 4),
       cases=st.lists(st.one_of(_conv_case(), _maxpool_case()), min_size=1, max_size=6))
def test_random_stacks_follow_darknet(h, w, c, cases):
    text = f"[net]\nheight={h}\nwidth={w}\nchannels={c}\n"
    headers, expected, shape = [], [], [c, h, w]
    for case in cases:
        headers.append(text.count("\n") + 1)
        text += _render(case)
        shape = shape and _darknet_shape(case, shape)
        expected.append(shape)
    text += "[cost]\n"
    if None in expected:
        bad = expected.index(None)
        with pytest.raises(ConfigError) as info:
            parse_cfg(text, path="r.cfg")
        assert info.value.line == headers[bad]
        assert f"layer {bad}: " in str(info.value)
        return
    g = parse_cfg(text, path="r.cfg")
    assert [layer["out_shape"] for layer in g.layers()] == expected + [expected[-1]]
    rt_program.validate(g.to_program())


def test_bundled_files_are_package_data():
    # setup.py ships tilec/models/*.cfg; the loader must look exactly there.
    from tilec.frontend import models
    assert models.MODELS_DIR == Path(__import__("tilec").__file__).resolve().parent / "models"
