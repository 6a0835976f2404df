"""Mean average precision at IoU 0.5, the PASCAL VOC way.

Per class: detections of every image sorted by score (highest first); each
is a true positive when its best-overlapping ground-truth box of that class
in its image has IoU >= ``iou_thresh`` and was not matched by a higher-
scoring detection, otherwise a false positive (a duplicate is a false
positive). A detection matched to a *difficult* box counts as neither.
Average precision is the area under the precision-recall curve with
precision made monotone (VOC 2010 onwards: every recall point), or the mean
of the best precision at recall >= 0, 0.1, ..., 1 (VOC 2007, ``eleven_point``).
mAP is the mean over the classes that have at least one (non-difficult)
ground-truth box.

Boxes are ``cx cy w h`` in any consistent frame (IoU does not change when
an axis is scaled, so normalised coordinates give the pixel answer, except
for VOC's +1 pixel convention, which is not used).
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class ClassAP:
    name: str
    ap: float          # nan when the class has no ground truth
    positives: int     # non-difficult ground-truth boxes
    detections: int
    true_positives: int


def iou_matrix(a, b):
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), ``cx cy w h``."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    ax0, ax1 = a[:, 0] - a[:, 2] / 2, a[:, 0] + a[:, 2] / 2
    ay0, ay1 = a[:, 1] - a[:, 3] / 2, a[:, 1] + a[:, 3] / 2
    bx0, bx1 = b[:, 0] - b[:, 2] / 2, b[:, 0] + b[:, 2] / 2
    by0, by1 = b[:, 1] - b[:, 3] / 2, b[:, 1] + b[:, 3] / 2
    iw = np.clip(np.minimum(ax1[:, None], bx1[None]) - np.maximum(ax0[:, None], bx0[None]), 0, None)
    ih = np.clip(np.minimum(ay1[:, None], by1[None]) - np.maximum(ay0[:, None], by0[None]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def average_precision(recall, precision, eleven_point=False):
    """AP from the recall/precision after each detection (in score order)."""
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if eleven_point:
        return float(np.mean([precision[recall >= t].max() if np.any(recall >= t) else 0.0
                              for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the precision envelope
    step = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def evaluate(detections, truths, classes, iou_thresh=0.5, eleven_point=False):
    """Per-class AP and the mAP.

    Parameters
    ----------
    detections : list, one per image, of (boxes (K, 4), scores (K,), labels (K,))
    truths : list, one per image, of (boxes (M, 4), labels (M,)) or
        (boxes, labels, difficult (M,) bool)
    classes : list of str
        Class names (their number fixes the label range).

    Returns
    -------
    (mAP, [ClassAP per class])
        mAP is nan when no class has ground truth.
    """
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} detection lists for {len(truths)} images")
    results = []
    for c, name in enumerate(classes):
        gt = []          # per image: (boxes, difficult, matched)
        positives = 0
        for truth in truths:
            boxes, labels = np.asarray(truth[0], np.float64).reshape(-1, 4), np.asarray(truth[1])
            difficult = np.asarray(truth[2], bool) if len(truth) > 2 else np.zeros(len(labels), bool)
            mine = labels == c
            gt.append((boxes[mine], difficult[mine], np.zeros(int(mine.sum()), bool)))
            positives += int((~difficult[mine]).sum())
        scored = []      # (score, image, box)
        for k, (boxes, scores, labels) in enumerate(detections):
            boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
            for box, score in zip(boxes[np.asarray(labels) == c], np.asarray(scores)[np.asarray(labels) == c]):
                scored.append((float(score), k, box))
        scored.sort(key=lambda d: -d[0])  # stable: ties keep image order
        tp, fp = [], []
        for _, k, box in scored:
            boxes, difficult, matched = gt[k]
            hit, ignore = False, False
            if len(boxes):
                overlaps = iou_matrix(box[None], boxes)[0]
                j = int(np.argmax(overlaps))
                if overlaps[j] >= iou_thresh:
                    if difficult[j]:
                        ignore = True
                    elif not matched[j]:
                        matched[j] = hit = True
            if not ignore:
                tp.append(hit)
                fp.append(not hit)
        tps, fps = np.cumsum(tp), np.cumsum(fp)
        if positives == 0:
            ap = float("nan")
        elif not len(tps):
            ap = 0.0
        else:
            recall = tps / positives
            precision = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)
            ap = average_precision(recall, precision, eleven_point)
        results.append(ClassAP(name, ap, positives, len(tp), int(tps[-1]) if len(tps) else 0))
    valid = [r.ap for r in results if not np.isnan(r.ap)]
    return (float(np.mean(valid)) if valid else float("nan")), results


def format_table(mean_ap, results):
    """The per-class table and the mAP as text."""
    width = max([len("class")] + [len(r.name) for r in results])
    lines = [f"{'class':<{width}}  {'AP@0.5':>7}  {'truth':>6}  {'dets':>6}  {'TP':>6}"]
    for r in results:
        ap = "   n/a" if np.isnan(r.ap) else f"{r.ap:7.4f}"
        lines.append(f"{r.name:<{width}}  {ap:>7}  {r.positives:>6}  {r.detections:>6}  {r.true_positives:>6}")
    lines.append(f"{'mAP@0.5':<{width}}  {mean_ap:7.4f}")
    return "\n".join(lines)
