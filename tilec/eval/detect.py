"""From a trained region model to boxes: inference, scores, non-maximum suppression.

A detection is a (box, class, score) with ``score = objectness * P(class)``
(darknet's ``get_region_boxes``), kept when above ``thresh``; then per
class, greedy non-maximum suppression drops a box that overlaps a higher-
scoring one by more than ``nms`` IoU (darknet's ``do_nms_sort``, 0.45).
Boxes are clipped to the image (as darknet does before it writes or draws
them), and a box left with no area is dropped. Inference uses the
batch-norm running statistics.
"""
import numpy as np

from tilec.data.augment import letterbox, unletterbox
from tilec.errors import TilecError
from tilec.data.yolo import open_image
from tilec.eval.map import iou_matrix
from tilec_runtime import reference, region

EVAL_THRESH = 0.005  # darknet's `detector valid` threshold: keep nearly everything for AP
DRAW_THRESH = 0.25   # darknet's `detector test` default
NMS_IOU = 0.45


def region_layer(program):
    last = program[-1]
    if last["kind"] != "region":
        raise TilecError(f"the model ends in [{last['kind']}], not [region]: it is not a detector")
    return last


def load_detector(model, weights, loss=None):
    """(program, its region layer, params, buffers) of a model name, .cfg or
    .onnx (``loss``: its ``--loss``) and an .npz, darknet .weights or .onnx file."""
    from tilec.frontend.darknet_weights import load_any
    from tilec.frontend.models import load_model
    program = load_model(model, loss).to_program()
    layer = region_layer(program)
    return (program, layer, *load_any(weights, program))


def region_input(program, params, buffers, images):
    """The input of the region layer for ``images`` (B, C, H, W), inference mode."""
    acts = {-1: images}
    reference.forward_layers(program[:-1], params, buffers, acts, None, train=False)
    return acts[program[-1]["inputs"][0]]


def nms(boxes, scores, iou):
    """Indices kept by greedy non-maximum suppression, highest score first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    overlaps = iou_matrix(boxes, boxes)
    suppressed = np.zeros(len(order), bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= overlaps[i] > iou
    return keep


def detections(x, layer, thresh=EVAL_THRESH, nms_iou=NMS_IOU):
    """Per image of the region input ``x``: (boxes (K, 4), scores (K,), labels (K,))
    in the network's (letterboxed) frame."""
    out = []
    for boxes, obj, probs in region.decode(x, layer):
        scores = obj[:, None] * probs                       # (anchors*cells, classes)
        kept_boxes, kept_scores, kept_labels = [], [], []
        for c in range(probs.shape[1]):
            idx = np.nonzero(scores[:, c] > thresh)[0]
            if not len(idx):
                continue
            keep = idx[nms(boxes[idx], scores[idx, c], nms_iou)]
            kept_boxes.append(boxes[keep])
            kept_scores.append(scores[keep, c])
            kept_labels.append(np.full(len(keep), c))
        if kept_boxes:
            out.append((np.concatenate(kept_boxes), np.concatenate(kept_scores), np.concatenate(kept_labels)))
        else:
            out.append((np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)))
    return out


def clip_boxes(boxes, scores, labels):
    """Boxes ``cx cy w h`` clipped to the unit square; those left with no area dropped."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0 = np.clip(boxes[:, 0] - boxes[:, 2] / 2, 0, 1)
    x1 = np.clip(boxes[:, 0] + boxes[:, 2] / 2, 0, 1)
    y0 = np.clip(boxes[:, 1] - boxes[:, 3] / 2, 0, 1)
    y1 = np.clip(boxes[:, 1] + boxes[:, 3] / 2, 0, 1)
    keep = (x1 > x0) & (y1 > y0)
    out = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=1)
    return out[keep], np.asarray(scores)[keep], np.asarray(labels)[keep]


def detect_images(program, params, buffers, pil_images, thresh=EVAL_THRESH, nms_iou=NMS_IOU, batch=8):
    """Detections of PIL images, boxes normalised to (and clipped to) each image's own frame."""
    layer = region_layer(program)
    _, h, w = program[0]["in_shape"]
    dtype = next(iter(params.values())).dtype
    out = []
    for start in range(0, len(pil_images), batch):
        chunk = pil_images[start:start + batch]
        images = np.stack([letterbox(img, (w, h))[0] for img in chunk]).astype(dtype)
        x = region_input(program, params, buffers, images)
        for img, (boxes, scores, labels) in zip(chunk, detections(x, layer, thresh, nms_iou)):
            out.append(clip_boxes(unletterbox(boxes, img.size, (w, h)), scores, labels))
    return out


def detect_dataset(program, params, buffers, dataset, thresh=EVAL_THRESH, nms_iou=NMS_IOU, batch=8,
                   on_image=None):
    """(detections, truths) over every item of a :class:`~tilec.data.yolo.Dataset`,
    in the images' normalised frames, ready for :func:`tilec.eval.map.evaluate`."""
    dets, truths = [], []
    items = dataset.items
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        dets += detect_images(program, params, buffers, [open_image(item.image) for item in chunk], thresh,
                              nms_iou, batch)
        truths += [(item.boxes[:, 1:], item.boxes[:, 0].astype(int)) for item in chunk]
        if on_image:
            on_image(min(start + batch, len(items)), len(items))
    return dets, truths
