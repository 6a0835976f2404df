"""`tilec data synth|voc|check`: make, convert and check detection datasets (YOLO layout)."""


def add_parser(sub, common):
    p = sub.add_parser("data", help="detection datasets: make a synthetic one, convert Pascal VOC, check one")
    actions = p.add_subparsers(dest="action", required=True)
    s = actions.add_parser("synth", help="write a synthetic dataset (shapes on textured backgrounds, PNG/JPEG "
                                         "files) in the YOLO layout")
    s.add_argument("out", metavar="OUT")
    s.add_argument("--n", type=int, default=1200, help="number of images (default 1200)")
    s.add_argument("--val-fraction", type=float, default=0.15, help="the share that goes to the val split")
    s.add_argument("--seed", type=int, default=0)
    v = actions.add_parser("voc", help="convert a Pascal VOC year directory (Annotations/, JPEGImages/) to the "
                                       "YOLO layout")
    v.add_argument("voc", metavar="VOC_DIR")
    v.add_argument("out", metavar="OUT")
    v.add_argument("--copy", action="store_true", help="copy the images (default: symbolic links)")
    v.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="a bad annotation or a missing image: report and skip it (default), or stop")
    c = actions.add_parser("check", help="read every label and image header of a split; report bad files")
    c.add_argument("root", metavar="DIR")
    c.add_argument("--split", default="train", help="split name or list file (default train)")


def run(args):
    if args.action == "synth":
        return _synth(args)
    if args.action == "voc":
        return _voc(args)
    return _check(args)


def _synth(args):
    from tilec.data.synth import make_dataset
    from tilec.errors import TilecError
    if args.n < 2:
        raise TilecError("--n must be at least 2 (a train and a val image)")
    if not 0 < args.val_fraction < 1:
        raise TilecError("--val-fraction must lie strictly between 0 and 1")
    info = make_dataset(args.out, n=args.n, val_fraction=args.val_fraction, seed=args.seed)
    print(f"wrote {info['images']} images to {args.out} (train {info['splits']['train']}, "
          f"val {info['splits']['val']}; classes {', '.join(info['classes'])})")
    return 0


def _voc(args):
    from tilec.data.voc import convert_voc
    result = convert_voc(args.voc, args.out, copy=args.copy, on_error=args.on_error)
    splits = ", ".join(f"{k} {v}" for k, v in result["images"].items())
    print(f"wrote {sum(result['images'].values())} images to {args.out} ({splits})")
    for reason, n in sorted(result["left_out"].items()):
        print(f"  left out {n} objects: {reason}")
    if result["bad"]:
        print(f"  skipped {len(result['bad'])} bad files (listed above)")
    return 0


def _check(args):
    from tilec.data.yolo import load_split
    dataset = load_split(args.root, args.split, on_error="skip")
    boxes = sum(len(item.boxes) for item in dataset.items)
    print(f"{args.root} [{args.split}]: {len(dataset.items)} images, {boxes} boxes, "
          f"{len(dataset.classes)} classes; {len(dataset.problems)} bad files")
    return 1 if dataset.problems else 0
