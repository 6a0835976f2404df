"""`tilec eval MODEL --weights W --data DIR`: mAP@0.5 (PASCAL VOC method) per class and overall."""


def add_parser(sub, common):
    p = sub.add_parser("eval", help="mAP@0.5 of a detector (VOC method) on a dataset split, per class and overall")
    common.model(p)
    p.add_argument("--weights", required=True, metavar="FILE", help=".npz (tilec) or .weights (darknet)")
    p.add_argument("--data", required=True, metavar="DIR", help="a dataset in the YOLO layout (`tilec data`)")
    p.add_argument("--split", default="val", help="split name or list file (default val)")
    p.add_argument("--thresh", type=float, default=None, help="lowest score kept (default 0.005, darknet's)")
    p.add_argument("--nms", type=float, default=None, help="non-maximum suppression IoU (default 0.45)")
    p.add_argument("--iou", type=float, default=0.5, help="IoU of a true positive (default 0.5)")
    p.add_argument("--eleven-point", action="store_true", help="VOC2007's 11-point AP (default: every point)")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="a bad image or label file: report and skip it (default), or stop")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")


def run(args):
    import json

    from tilec.data.yolo import load_split
    from tilec.errors import TilecError
    from tilec.eval.detect import EVAL_THRESH, NMS_IOU, detect_dataset, load_detector
    from tilec.eval.map import evaluate, format_table

    program, layer, params, buffers = load_detector(args.model, args.weights, args.loss)
    dataset = load_split(args.data, args.split, on_error=args.on_error)
    if len(dataset.classes) != layer["classes"]:
        raise TilecError(f"{args.data} has {len(dataset.classes)} classes, the model {layer['classes']}")
    thresh = EVAL_THRESH if args.thresh is None else args.thresh
    nms = NMS_IOU if args.nms is None else args.nms
    dets, truths = detect_dataset(program, params, buffers, dataset, thresh, nms)
    mean_ap, per_class = evaluate(dets, truths, dataset.classes, args.iou, args.eleven_point)
    print(f"{args.data} [{args.split}]: {len(dataset.items)} images")
    print(format_table(mean_ap, per_class))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"map50": mean_ap, "images": len(dataset.items),
                       "classes": {r.name: r.ap for r in per_class}}, f, indent=1)
    return 0
