"""The YOLOv2 region loss: hand-computed cases, darknet's assignment rules,
and the gradient against central finite differences of the documented loss."""
import re

import numpy as np
import pytest

from tilec_runtime import reference, region
from tilec_runtime.errors import ProgramError
from tilec_runtime.program import validate
from tilec_runtime.weights import init_params


def layer(num=2, classes=3, h=4, w=4, **kw):
    base = dict(index=0, kind="region", inputs=[-1], in_shape=[num * (5 + classes), h, w],
                out_shape=[num * (5 + classes), h, w], anchors=[1.0, 1.0, 2.5, 1.5, 0.7, 2.0, 3.0, 3.0][:2 * num],
                classes=classes, coords=4, num=num, softmax=True, rescore=False, bias_match=True,
                object_scale=5.0, noobject_scale=1.0, class_scale=1.0, coord_scale=1.0, thresh=0.6,
                max_boxes=4, jitter=0.2)
    base.update(kw)
    return base


def truth_of(rows, max_boxes=4):
    """(1, max_boxes, 5) truth from a list of (class, cx, cy, w, h)."""
    t = np.zeros((1, max_boxes, 5))
    t[..., 0] = region.PAD
    for k, row in enumerate(rows):
        t[0, k] = row
    return t


def sig(z):
    return 1 / (1 + np.exp(-z))


def at(x, lay, n, e, j, i, b=0):
    """Index of entry e of anchor n at cell (j, i) in the region input."""
    return (b, n * (5 + lay["classes"]) + e, j, i)


# -- hand-computed cases ------------------------------------------------------

def test_no_truth_is_the_no_object_term_only():
    lay = layer(num=1, classes=2, h=2, w=2, noobject_scale=0.5)
    x = np.zeros((1, 7, 2, 2))
    x[0, 4] = [[0.0, 1.0], [-1.0, 2.0]]
    loss, g = region.forward(x, truth_of([]), lay)
    s = sig(x[0, 4])
    assert loss == pytest.approx(np.sum(0.5 * 0.5 * s ** 2))
    np.testing.assert_allclose(g[0, 4], 0.5 * s * s * (1 - s))
    assert np.count_nonzero(g[0, :4]) == 0 and np.count_nonzero(g[0, 5:]) == 0


def test_one_truth_by_hand():
    # a 2x2 grid, one anchor (1, 1) cell; truth class 1 at (0.6, 0.3), size 0.25 x 0.5:
    # cell i = floor(0.6*2) = 1, j = floor(0.3*2) = 0
    lay = layer(num=1, classes=2, h=2, w=2, anchors=[1.0, 1.0], thresh=1.0, coord_scale=2.0, class_scale=3.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 7, 2, 2))
    truth = truth_of([(1, 0.6, 0.3, 0.25, 0.5)])
    loss, g = region.forward(x, truth, lay)
    v = x[0, :, 0, 1]
    tx, ty = 0.6 * 2 - 1, 0.3 * 2 - 0
    tw, th = np.log(0.25 * 2 / 1.0), np.log(0.5 * 2 / 1.0)
    scale = 2.0 * (2 - 0.25 * 0.5)
    coord = 0.5 * scale * ((tx - sig(v[0])) ** 2 + (ty - sig(v[1])) ** 2 + (tw - v[2]) ** 2 + (th - v[3]) ** 2)
    obj = 0.5 * 5.0 * (1 - sig(v[4])) ** 2
    logits = v[5:]
    cls = 3.0 * -(logits[1] - np.log(np.exp(logits).sum()))
    others = [(j, i) for j in range(2) for i in range(2) if (j, i) != (0, 1)]
    noobj = sum(0.5 * 1.0 * sig(x[0, 4, j, i]) ** 2 for j, i in others)  # thresh=1: none is excused
    assert loss == pytest.approx(coord + obj + cls + noobj, rel=1e-12)
    assert g[0, 0, 0, 1] == pytest.approx(scale * (sig(v[0]) - tx) * sig(v[0]) * (1 - sig(v[0])))
    assert g[0, 2, 0, 1] == pytest.approx(scale * (v[2] - tw))
    p = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(g[0, 5:, 0, 1], 3.0 * (p - [0, 1]))


def test_mean_over_the_batch():
    lay = layer()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 16, 4, 4))
    t = np.concatenate([truth_of([(0, 0.3, 0.3, 0.2, 0.4)]), truth_of([(2, 0.7, 0.6, 0.5, 0.3)])])
    loss, g = region.forward(x, t, lay)
    l0, g0 = region.forward(x[:1], t[:1], lay)
    l1, g1 = region.forward(x[1:], t[1:], lay)
    assert loss == pytest.approx((l0 + l1) / 2)
    np.testing.assert_allclose(g, np.concatenate([g0, g1]) / 2)


# -- darknet's assignment ---------------------------------------------------------

def test_bias_match_picks_the_anchor_of_best_shape():
    # anchors (1,1) and (2.5,1.5) cells on a 4x4 grid; a truth 0.6 x 0.4 (2.4 x 1.6 cells) -> anchor 1
    lay = layer(num=2, classes=3)
    x = np.zeros((1, 16, 4, 4))
    tg = region.assign(x, truth_of([(2, 0.1, 0.9, 0.6, 0.4)]), lay)
    assert np.argwhere(tg.cls_weight > 0).tolist() == [[0, 1, 3, 0]]
    assert tg.cls_target[0, 1, 3, 0] == 2
    np.testing.assert_allclose(tg.coord_target[0, 1, :, 3, 0],
                               [0.4, 0.6, np.log(2.4 / 2.5), np.log(1.6 / 1.5)])


def test_without_bias_match_the_predicted_shape_decides():
    lay = layer(num=2, classes=3, bias_match=False)
    x = np.zeros((1, 16, 4, 4))
    # make anchor 0's predicted box at cell (1, 1) exactly the truth's shape: 2.4 x 1.6 cells
    x[at(x, lay, 0, 2, 1, 1)] = np.log(2.4)
    x[at(x, lay, 0, 3, 1, 1)] = np.log(1.6)
    tg = region.assign(x, truth_of([(0, 0.3, 0.3, 0.6, 0.4)]), lay)
    assert np.argwhere(tg.cls_weight > 0).tolist() == [[0, 0, 1, 1]]
    tg = region.assign(x, truth_of([(0, 0.3, 0.3, 0.6, 0.4)]), dict(lay, bias_match=True))
    assert np.argwhere(tg.cls_weight > 0).tolist() == [[0, 1, 1, 1]]


def test_no_object_threshold_excuses_good_overlaps():
    lay = layer(num=1, classes=1, h=2, w=2, anchors=[1.0, 1.0], thresh=0.5)
    x = np.zeros((1, 6, 2, 2))
    # every prediction is a 0.5 x 0.5 box at its cell centre; a truth equal to the box of
    # cell (1, 1) makes that cell responsible and has IoU 0 with the box of cell (0, 0)
    tg = region.assign(x, truth_of([(0, 0.75, 0.75, 0.5, 0.5)]), lay)
    assert tg.obj_weight[0, 0, 1, 1] == 5.0      # responsible: the object term
    assert tg.obj_weight[0, 0, 0, 0] == 1.0      # IoU 0 with the truth: no-object term
    tg = region.assign(x, truth_of([(0, 0.5, 0.5, 0.5, 0.5)]), dict(lay, thresh=0.1))
    # truth at the centre touches all four predictions with IoU 1/7 > 0.1: the three
    # that are not responsible are excused, the responsible one (cell 1,1) gets the object term
    assert tg.obj_weight[0, 0].tolist() == [[0.0, 0.0], [0.0, 5.0]]


def test_rescore_target_is_the_iou_of_the_responsible_box():
    lay = layer(num=1, classes=1, h=2, w=2, anchors=[1.0, 1.0], rescore=True)
    x = np.zeros((1, 6, 2, 2))
    tg = region.assign(x, truth_of([(0, 0.25, 0.25, 0.25, 0.5)]), lay)
    # predicted box at cell (0,0): centre (0.25, 0.25), 0.5 x 0.5; truth inside it: IoU = 0.125/0.25
    assert tg.obj_target[0, 0, 0, 0] == pytest.approx(0.5)


def test_the_later_of_two_truths_in_one_slot_wins():
    lay = layer(num=1, classes=3, h=2, w=2, anchors=[1.0, 1.0])
    x = np.zeros((1, 8, 2, 2))
    tg = region.assign(x, truth_of([(0, 0.1, 0.1, 0.3, 0.3), (2, 0.2, 0.2, 0.4, 0.2)]), lay)
    assert np.count_nonzero(tg.cls_weight) == 1 and tg.cls_target[0, 0, 0, 0] == 2
    np.testing.assert_allclose(tg.coord_target[0, 0, :2, 0, 0], [0.4, 0.4])


def test_truth_on_the_far_edge_stays_on_the_map():
    lay = layer(num=1, classes=1, h=2, w=2, anchors=[1.0, 1.0])
    tg = region.assign(np.zeros((1, 6, 2, 2)), truth_of([(0, 1.0, 1.0, 0.2, 0.2)]), lay)
    assert tg.cls_weight[0, 0, 1, 1] > 0 and tg.coord_target[0, 0, 0, 1, 1] == pytest.approx(1.0)


def test_prior_pulls_the_other_boxes_to_their_anchors_early_on():
    lay = layer(num=1, classes=1, h=2, w=2, anchors=[1.0, 1.0])
    x = np.zeros((1, 6, 2, 2))
    t = truth_of([(0, 0.2, 0.2, 0.3, 0.3)])
    early = region.assign(x, t, lay, seen=64)
    late = region.assign(x, t, lay, seen=region.PRIOR_IMAGES)
    assert early.coord_weight[0, 0].tolist() == [[pytest.approx(2 - 0.09), 0.01], [0.01, 0.01]]
    assert early.coord_target[0, 0, :, 1, 1].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert late.coord_weight[0, 0].tolist() == [[pytest.approx(2 - 0.09), 0.0], [0.0, 0.0]]
    assert region.assign(x, t, lay).coord_weight[0, 0, 1, 1] == 0.0   # no count: no prior


# -- gradient against finite differences --------------------------------------------

def _truth(rng, bsz, max_boxes, classes):
    t = np.zeros((bsz, max_boxes, 5))
    t[..., 0] = region.PAD
    for b in range(bsz):
        for k in range(rng.integers(1, max_boxes)):
            w, h = rng.uniform(0.1, 0.7, size=2)
            t[b, k] = [rng.integers(classes), rng.uniform(0.02, 0.98), rng.uniform(0.02, 0.98), w, h]
    return t


def _fd(f, x, eps=1e-5):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        up = f(x)
        x[idx] = old - eps
        down = f(x)
        x[idx] = old
        g[idx] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize("settings", [
    dict(),
    dict(softmax=False),
    dict(bias_match=False, thresh=0.3),
    dict(rescore=True, noobject_scale=0.5, class_scale=2.0, coord_scale=1.5),
], ids=["voc", "logistic-classes", "shape-match", "rescore"])
@pytest.mark.parametrize("seen", [None, 100])
def test_gradient_matches_finite_differences(settings, seen):
    """Through the targets fixed at x (the documented loss): valid everywhere."""
    rng = np.random.default_rng(7)
    lay = layer(num=2, classes=3, h=3, w=4, **settings)
    x = rng.normal(scale=1.5, size=(2, 16, 3, 4))
    truth = _truth(rng, 2, 4, 3)
    targets = region.assign(x, truth, lay, seen)
    assert np.count_nonzero(targets.cls_weight) >= 2
    loss, g = region.loss_and_grad(x, targets, lay)
    loss2, g2 = region.forward(x, truth, lay, seen)
    assert loss2 == loss and np.array_equal(g2, g)
    fd = _fd(lambda z: region.loss_and_grad(z, targets, lay)[0], x.copy())
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-7)


def test_gradient_of_the_whole_forward_where_the_assignment_is_locally_constant():
    """Without rescore the targets do not depend on x except through which
    prediction is responsible or excused; at a generic point a small step
    changes neither, so differentiating forward itself agrees too."""
    rng = np.random.default_rng(3)
    lay = layer(num=2, classes=3, h=3, w=4, bias_match=False, thresh=0.2)
    x = rng.normal(size=(1, 16, 3, 4))
    truth = _truth(rng, 1, 4, 3)
    _, g = region.forward(x, truth, lay)
    fd = _fd(lambda z: region.forward(z, truth, lay)[0], x.copy())
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-7)


def test_float32_gradient_close_to_float64():
    rng = np.random.default_rng(5)
    lay = layer()
    x = rng.normal(size=(2, 16, 4, 4))
    truth = _truth(rng, 2, 4, 3)
    l64, g64 = region.forward(x, truth, lay)
    l32, g32 = region.forward(x.astype(np.float32), truth.astype(np.float32), lay)
    assert g32.dtype == np.float32
    assert l32 == pytest.approx(l64, rel=1e-5)
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-6)


# -- in a program ------------------------------------------------------------------

def _detector():
    conv = dict(index=0, kind="conv", inputs=[-1], in_shape=[3, 8, 8], out_shape=[16, 4, 4], filters=16, size=3,
                stride=2, pad=1, bn=True, act="leaky")
    return validate([conv, dict(layer(), index=1, inputs=[0])])


def test_reference_executor_trains_through_the_region_loss():
    """Conv + bn + region: the parameter gradients of the whole program
    against finite differences of its loss."""
    program = _detector()
    params, buffers = init_params(program, 0, "float64")
    rng = np.random.default_rng(2)
    images = rng.normal(size=(2, 3, 8, 8))
    truth = _truth(rng, 2, 4, 3)
    fresh = lambda: {k: v.copy() for k, v in buffers.items()}  # noqa: E731 - bn updates them in place
    loss, grads = reference.train_step(program, params, fresh(), images, truth)

    def conv_out(w):
        acts = {-1: images}
        reference.forward_layers(program[:1], dict(params, **{"0.conv.weight": w}), fresh(), acts, None)
        return acts[0]

    targets = region.assign(conv_out(params["0.conv.weight"]), truth, program[1])

    def f(w):
        return region.loss_and_grad(conv_out(w), targets, program[1])[0]

    w = params["0.conv.weight"]
    sample = [tuple(rng.integers(s) for s in w.shape) for _ in range(12)]
    fd = _fd(f, w.copy())
    for idx in sample:
        assert grads["0.conv.weight"][idx] == pytest.approx(fd[idx], rel=1e-5, abs=1e-9)
    assert np.isfinite(loss)


@pytest.mark.parametrize("change, fragment", [
    (dict(coords=5), "coords=5: only 4"),
    (dict(anchors=[1.0, 1.0, 2.0]), "anchors must be a list of 2*num = 4 numbers"),
    (dict(anchors=[1.0, -1.0, 2.0, 2.0]), "anchors must be positive"),
    (dict(classes=4), "input has 16 channels, but num=2"),
    (dict(softmax=1), "softmax must be true or false"),
    (dict(thresh=float("nan")), "thresh must be a finite number"),
])
def test_program_validation_names_the_problem(change, fragment):
    program = _detector()
    program[1].update(change)
    with pytest.raises(ProgramError, match=re.escape("layer 1 (region): " + fragment)):
        validate(program)


# -- the batch file of a region model ------------------------------------------------

def test_boxes_batch_files(tmp_path):
    from tilec_runtime.data import generated_batches, load_batches, target_shape
    from tilec_runtime.errors import DataError
    program = _detector()
    assert target_shape(program) == (4, 5)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 3, 8, 8)).astype(np.float32)
    boxes = _truth(rng, 3, 4, 3)
    np.savez(tmp_path / "ok.npz", images=images, boxes=boxes)
    source = load_batches(tmp_path / "ok.npz", program, 2)
    got_images, got_boxes = source.get(1)  # items 2, 0
    np.testing.assert_array_equal(got_boxes, boxes[[2, 0]].astype(np.float32))
    assert reference.train_step(program, *init_params(program, 0), got_images, got_boxes)[0] > 0
    generated = generated_batches(program, 2, 0).get(0)[1]
    assert generated.shape == (2, 4, 5) and np.all(generated[:, 0, 0] >= 0)
    bad_cases = [((0, 0, 0), 3.0, "classes must be integers in [0, 2]"),
                 ((0, 0, 3), 1.5, "centres must lie in [0, 1] and sizes in (0, 1]"),
                 ((0, 3, 0), -2.0, "padding rows must have class -1")]
    for index, value, fragment in bad_cases:
        bad = boxes.copy()
        bad[index] = value
        np.savez(tmp_path / "bad.npz", images=images, boxes=bad)
        with pytest.raises(DataError, match=re.escape(f"'boxes' {fragment}")):
            load_batches(tmp_path / "bad.npz", program, 2)
    np.savez(tmp_path / "short.npz", images=images, boxes=boxes[:, :2])
    with pytest.raises(DataError, match=re.escape("'boxes' has shape (3, 2, 5), the model needs (3, 4, 5)")):
        load_batches(tmp_path / "short.npz", program, 2)
