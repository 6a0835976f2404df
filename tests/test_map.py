"""mAP@0.5, VOC method, on hand-made boxes whose answer is worked out by hand."""
import numpy as np
import pytest

from tilec.eval.detect import clip_boxes, detections, nms
from tilec.eval.map import average_precision, evaluate, format_table, iou_matrix

A = [0.25, 0.25, 0.2, 0.2]      # ground-truth boxes, cx cy w h
B = [0.75, 0.75, 0.2, 0.2]
NEAR_A = [0.26, 0.25, 0.2, 0.2]  # IoU with A: 0.19*0.2 / (0.08 - 0.038) = 0.9048
OFF_A = [0.35, 0.25, 0.2, 0.2]   # IoU with A: 0.1*0.2 / (0.08 - 0.02) = 1/3
NOWHERE = [0.5, 0.9, 0.1, 0.1]


def dets(*rows):
    """(boxes, scores, labels) from rows (box, score, label)."""
    if not rows:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)
    return np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), np.array([r[2] for r in rows])


def truth(*rows, difficult=None):
    boxes, labels = np.array([r[0] for r in rows]).reshape(-1, 4), np.array([r[1] for r in rows], int)
    return (boxes, labels) if difficult is None else (boxes, labels, np.array(difficult, bool))


def test_iou_by_hand():
    np.testing.assert_allclose(iou_matrix([A], [A, NEAR_A, OFF_A, B]), [[1.0, 0.038 / 0.042, 1 / 3, 0.0]])


def test_perfect_detections_score_one():
    m, per = evaluate([dets((A, 0.9, 0), (B, 0.8, 1))], [truth((A, 0), (B, 1))], ["a", "b"])
    assert m == 1.0 and [r.ap for r in per] == [1.0, 1.0]


def test_precision_recall_by_hand():
    # class 0: two truths in two images; detections by score: TP (img 0), FP (img 1, IoU 1/3), TP (img 1)
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # every point: 1/2 * 1 + 1/2 * 2/3 = 5/6; eleven points: (6 * 1 + 5 * 2/3) / 11 = 28/33
    d = [dets((NEAR_A, 0.9, 0)), dets((OFF_A, 0.8, 0), (A, 0.7, 0))]
    t = [truth((A, 0)), truth((A, 0))]
    m, per = evaluate(d, t, ["a"])
    assert m == pytest.approx(5 / 6) and (per[0].detections, per[0].true_positives) == (3, 2)
    assert evaluate(d, t, ["a"], eleven_point=True)[0] == pytest.approx(28 / 33)
    # at IoU 0.3 the 1/3 overlap is a hit, and the exact box, ranked after it, a duplicate
    m, per = evaluate(d, t, ["a"], iou_thresh=0.3)
    assert per[0].true_positives == 2 and m == pytest.approx(1.0)


def test_a_duplicate_is_a_false_positive_and_misses_lower_recall():
    # two detections of A (TP then FP), B never found: precision 1, 1/2 at recall 1/2 -> AP 1/2
    m, per = evaluate([dets((A, 0.9, 0), (NEAR_A, 0.8, 0))], [truth((A, 0), (B, 0))], ["a"])
    assert m == pytest.approx(0.5) and per[0].true_positives == 1


def test_wrong_class_does_not_count():
    m, per = evaluate([dets((A, 0.9, 1))], [truth((A, 0))], ["a", "b"])
    assert per[0].ap == 0.0 and np.isnan(per[1].ap) and m == 0.0


def test_difficult_truths_are_neither_found_nor_missed():
    # the detection of the difficult box is ignored; the other is a TP: AP 1
    d = [dets((A, 0.9, 0), (B, 0.8, 0))]
    m, per = evaluate(d, [truth((A, 0), (B, 0), difficult=[True, False])], ["a"])
    assert m == 1.0 and per[0].positives == 1 and per[0].detections == 1


def test_classes_without_truth_are_left_out_of_the_mean():
    d = [dets((A, 0.9, 0), (NOWHERE, 0.5, 2))]
    m, per = evaluate(d, [truth((A, 0), (B, 1))], ["a", "b", "c"])
    assert [r.ap for r in per][:2] == [1.0, 0.0] and np.isnan(per[2].ap)
    assert m == pytest.approx(0.5)
    assert "n/a" in format_table(m, per) and "0.5000" in format_table(m, per)


def test_order_of_equal_scores_is_stable():
    # with equal scores the earlier image's detection is ranked first (as VOC's sort)
    d = [dets((OFF_A, 0.5, 0)), dets((A, 0.5, 0))]
    t = [truth((A, 0)), truth((A, 0))]
    # FP then TP: precision 0, 1/2 at recall 0, 1/2 -> AP = 1/2 * 1/2
    assert evaluate(d, t, ["a"])[0] == pytest.approx(0.25)


def test_average_precision_envelope():
    # precision rising after a dip: the envelope takes the later maximum
    assert average_precision([0.25, 0.5, 0.75, 1.0], [1.0, 0.5, 0.6, 0.8]) == pytest.approx(0.25 + 0.75 * 0.8)


def test_nms_keeps_the_best_of_each_cluster():
    boxes = np.array([A, NEAR_A, OFF_A, B])
    assert nms(boxes, [0.8, 0.9, 0.7, 0.1], 0.45) == [1, 2, 3]
    assert nms(boxes, [0.8, 0.9, 0.7, 0.1], 0.2) == [1, 3]


def test_detections_from_a_region_output():
    # one anchor on a 2x2 grid, two classes; only cell (row 1, col 0) is confident, class 1
    layer = dict(num=1, classes=2, coords=4, anchors=[1.0, 1.0], softmax=True)
    x = np.full((1, 7, 2, 2), -10.0)
    x[0, 0:4] = 0.0
    x[0, 4, 1, 0] = 10.0
    x[0, 6, 1, 0] = 10.0
    boxes, scores, labels = detections(x, layer, thresh=0.5)[0]
    assert labels.tolist() == [1] and scores[0] == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(boxes[0], [0.25, 0.75, 0.5, 0.5])


def test_boxes_are_clipped_to_the_image():
    boxes, scores, labels = clip_boxes([[0.9, 0.5, 0.4, 0.2], [2.0, 2.0, 0.1, 0.1], [0.5, 0.5, 1e9, 1e9]],
                                       [0.3, 0.2, 0.1], [0, 1, 2])
    np.testing.assert_allclose(boxes, [[0.85, 0.5, 0.3, 0.2], [0.5, 0.5, 1.0, 1.0]])
    assert scores.tolist() == [0.3, 0.1] and labels.tolist() == [0, 2]
