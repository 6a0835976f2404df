"""`tilec detect MODEL --weights W IMAGE -o OUT.png`: run a detector on an image and draw the boxes."""


def add_parser(sub, common):
    p = sub.add_parser("detect", help="detect objects in an image and draw the boxes")
    common.model(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--weights", required=True, metavar="FILE", help=".npz (tilec) or .weights (darknet)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png")
    p.add_argument("--names", metavar="FILE", help="class names, one a line (a dataset's classes.txt); "
                   "default: class numbers")
    p.add_argument("--thresh", type=float, default=None, help="lowest score drawn (default 0.25, darknet's)")
    p.add_argument("--nms", type=float, default=None, help="non-maximum suppression IoU (default 0.45)")


def run(args):
    from tilec.data.yolo import open_image
    from tilec.errors import TilecError
    from tilec.eval.detect import DRAW_THRESH, NMS_IOU, detect_images, load_detector
    from tilec.eval.draw import draw_detections

    program, layer, params, buffers = load_detector(args.model, args.weights, args.loss)
    names = [str(c) for c in range(layer["classes"])]
    if args.names:
        try:
            with open(args.names, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        except OSError as exc:
            raise TilecError(f"{args.names}: {exc.strerror}") from None
        if len(names) != layer["classes"]:
            raise TilecError(f"{args.names} names {len(names)} classes, the model has {layer['classes']}")
    img = open_image(args.image)
    thresh = DRAW_THRESH if args.thresh is None else args.thresh
    nms = NMS_IOU if args.nms is None else args.nms
    boxes, scores, labels = detect_images(program, params, buffers, [img], thresh, nms)[0]
    draw_detections(img, boxes, scores, labels, names).save(args.output)
    w, h = img.size
    for k in sorted(range(len(scores)), key=lambda k: -scores[k]):
        cx, cy, bw, bh = boxes[k]
        print(f"{names[int(labels[k])]:>12} {scores[k]:.3f}  x {(cx - bw / 2) * w:7.1f} y {(cy - bh / 2) * h:7.1f} "
              f"w {bw * w:7.1f} h {bh * h:7.1f}")
    print(f"{len(scores)} objects; wrote {args.output}")
    return 0
