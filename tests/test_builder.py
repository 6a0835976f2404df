"""The Python builder: the same IR as the .cfg frontend, checked at each call."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilec.errors import ConfigError
from tilec.frontend import Model, load_model, parse_cfg
from tilec.ir.graph import Graph
from tilec_runtime import program as rt_program


def tiny():
    m = Model(32, 32, 3, batch=16, learning_rate=0.01, momentum=0.9, decay=0.0005, name="tiny")
    for filters in (16, 32, 64):
        m.conv(filters, bn=True, act="leaky").maxpool(2, 2)
    return m.conv(128, bn=True, act="leaky").avgpool().connected(10).softmax()


def yolov2_tiny():
    m = Model(416, 416, 3, batch=1, learning_rate=0.001, momentum=0.9, decay=0.0005,
              name="yolov2-tiny")
    for filters in (16, 32, 64, 128, 256):
        m.conv(filters, bn=True, act="leaky").maxpool(2, 2)
    m.conv(512, bn=True, act="leaky").maxpool(2, 1)
    m.conv(1024, bn=True, act="leaky").conv(1024, bn=True, act="leaky")
    # darknet's yolov2-tiny-voc [region]
    return m.conv(125, size=1).region([1.08, 1.19, 3.42, 4.41, 6.63, 11.38, 9.42, 5.11, 16.62, 10.52], 20)


def yolov2():
    m = Model(608, 608, 3, batch=1, learning_rate=0.001, momentum=0.9, decay=0.0005, name="yolov2")
    leaky = lambda filters, size=3: m.conv(filters, size=size, bn=True, act="leaky")  # noqa: E731
    leaky(32), m.maxpool(2, 2), leaky(64), m.maxpool(2, 2)
    leaky(128), leaky(64, 1), leaky(128), m.maxpool(2, 2)
    leaky(256), leaky(128, 1), leaky(256), m.maxpool(2, 2)
    leaky(512), leaky(256, 1), leaky(512), leaky(256, 1), leaky(512), m.maxpool(2, 2)
    leaky(1024), leaky(512, 1), leaky(1024), leaky(512, 1), leaky(1024)
    leaky(1024), leaky(1024)
    m.route(-9)
    leaky(64, 1)
    m.reorg(2)
    m.route(-1, -4)
    leaky(1024)
    anchors = [0.57273, 0.677385, 1.87446, 2.06253, 3.33843, 5.47434, 7.88282, 3.52778, 9.77052, 9.16828]
    return m.conv(425, size=1).region(anchors, 80, jitter=0.3)


def detector_small():
    m = Model(96, 96, 3, batch=16, learning_rate=0.01, momentum=0.9, decay=0.0005, name="detector-small")
    for filters in (16, 32, 64, 128):
        m.conv(filters, bn=True, act="leaky").maxpool(2, 2)
    m.conv(128, bn=True, act="leaky")
    return m.conv(3 * (5 + 4), size=1).region([1.0, 1.0, 1.7, 1.7, 2.7, 2.7], 4, rescore=False, max_boxes=8,
                                              jitter=0.1)


@pytest.mark.parametrize("name, build", [("tiny", tiny), ("yolov2-tiny", yolov2_tiny),
                                         ("yolov2", yolov2), ("detector-small", detector_small)])
def test_builder_equals_cfg(name, build):
    built, parsed = build().build(), load_model(name)
    assert built.to_program() == parsed.to_program()
    assert built.net == parsed.net
    assert built.name == parsed.name


def test_build_returns_a_verified_copy():
    m = Model(8, 8, 1).avgpool().softmax()
    g = m.build()
    assert isinstance(g, Graph) and len(g) == 2
    assert g.layer(1)["out_shape"] == [1, 1, 1]  # shapes inferred
    m.avgpool()
    assert len(g) == 2  # later calls do not reach a built graph
    rt_program.validate(g.to_program())


def test_defaults():
    g = Model(9, 7, 2).conv(4, size=5).maxpool(3, 2).sse().build()
    conv, pool = g.layer(0), g.layer(1)
    assert (conv["pad"], conv["stride"], conv["bn"], conv["act"]) == (2, 1, False, "linear")  # "same"
    assert conv["out_shape"] == [4, 9, 7]
    assert pool["padding"] == 2  # size - 1, darknet's default
    assert pool["out_shape"] == [4, (9 + 2 - 3) // 2 + 1, (7 + 2 - 3) // 2 + 1]
    assert g.net == {"batch": 1, "height": 9, "width": 7, "channels": 2,
                     "learning_rate": 0.001, "momentum": 0.9, "decay": 0.0001}


def test_a_failed_call_leaves_the_model_unchanged():
    m = Model(8, 8, 1).conv(2)
    with pytest.raises(ConfigError):
        m.conv(2, size=11, pad=0)
    assert len(m) == 1
    assert m.softmax().build().layer(1)["kind"] == "softmax"


def test_route_absolute_and_relative():
    m = Model(8, 8, 1).conv(2).conv(3).route(0, -1).sse()
    assert m.build().layer(2)["inputs"] == [0, 1]
    assert m.build().layer(2)["out_shape"] == [5, 8, 8]


@pytest.mark.parametrize("call, fragment", [
    (lambda m: m.conv(0), "node 0 (conv): filters must be a positive integer, got 0"),
    (lambda m: m.conv(2, act="tanh"), "node 0 (conv): act must be one of"),
    (lambda m: m.conv(2, size=9, pad=0), "node 0 (conv): kernel 9x9 is larger than the padded input 8x8"),
    (lambda m: m.maxpool(2, 0), "node 0 (maxpool): stride must be a positive integer"),
    (lambda m: m.conv(4).reorg(2).reorg(2).reorg(2).reorg(2), "node 4 (reorg): input 256x1x1 is not divisible"),
    (lambda m: m.reorg(2), "node 0 (reorg): input 1x8x8: darknet's reorg needs channels divisible by stride² = 4"),
    (lambda m: m.reorg(2, order="pixel"), "node 0 (reorg): order must be one of darknet, space_to_depth, onnx"),
    (lambda m: m.route(-1), "node 0 (route): layers [-1] reach before layer 0"),
    (lambda m: m.conv(2).route(1), "node 1 (route): input 1 is not an earlier node"),
    (lambda m: m.conv(2).maxpool(2, 2).route(-1, -2), "node 2 (route): inputs have different sizes"),
])
def test_errors_at_the_call(call, fragment):
    m = Model(8, 8, 1)
    with pytest.raises(ConfigError) as info:
        call(m)
    assert fragment in str(info.value)


@pytest.mark.parametrize("build, fragment", [
    (lambda: Model(8, 8, 1).avgpool(), "node 0 (avgpool): the last layer must be a loss"),
    (lambda: Model(8, 8, 1).softmax().avgpool().sse(), "node 0 (softmax): a loss must be the last"),
    (lambda: Model(8, 8, 1), "graph has no layers"),
])
def test_errors_at_build(build, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        build().build()


def test_bad_net():
    with pytest.raises(ConfigError, match="input shape"):
        Model(0, 8, 1)
    with pytest.raises(ConfigError, match="momentum"):
        Model(8, 8, 1, momentum=2)


# -- random stacks: builder and .cfg agree -----------------------------------

_layer = st.one_of(
    st.tuples(st.just("conv"), st.integers(1, 6), st.integers(1, 5), st.integers(1, 3),
              st.none() | st.integers(0, 2), st.booleans(), st.sampled_from(["linear", "leaky", "relu"])),
    st.tuples(st.just("maxpool"), st.integers(1, 3), st.integers(1, 3), st.none() | st.integers(0, 3)),
)


def _cfg_section(spec):
    if spec[0] == "conv":
        _, filters, size, stride, pad, bn, act = spec
        padding = "pad=1\n" if pad is None else f"padding={pad}\n"
        return (f"[convolutional]\nfilters={filters}\nsize={size}\nstride={stride}\n{padding}"
                f"batch_normalize={int(bn)}\nactivation={act}\n")
    _, size, stride, padding = spec
    return f"[maxpool]\nsize={size}\nstride={stride}\n" + (f"padding={padding}\n" if padding is not None else "")


@settings(max_examples=100, deadline=None)
@given(h=st.integers(4, 32), w=st.integers(4, 32), specs=st.lists(_layer, min_size=1, max_size=5))
def test_random_stacks_builder_equals_cfg(h, w, specs):
    text = f"[net]\nheight={h}\nwidth={w}\nchannels=3\n" + "".join(map(_cfg_section, specs)) + "[cost]\n"
    try:
        parsed = parse_cfg(text).to_program()
    except ConfigError:
        parsed = None
    m = Model(h, w, 3)
    try:
        for spec in specs:
            if spec[0] == "conv":
                _, filters, size, stride, pad, bn, act = spec
                m.conv(filters, size=size, stride=stride, pad=pad, bn=bn, act=act)
            else:
                m.maxpool(*spec[1:])
        built = m.sse().build().to_program()
    except ConfigError:
        built = None
    assert built == parsed  # both fail, or both give the same program
