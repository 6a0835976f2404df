"""`tilec forward MODEL --weights W --input IN.npy -o OUT.npz`: inference, every layer's output.

Batch norm uses its running statistics (eval mode). OUT.npz holds one array
per layer, keyed by its index ("0", "1", ...), shaped (N, C, H, W); the last
layer holds what darknet's layer outputs at inference (softmax probabilities,
[region] with the logistic on x, y and objectness and the class
probabilities), so a darknet dump of the same model compares layer by layer.
"""


def add_parser(sub, common):
    p = sub.add_parser("forward", help="run inference on an input batch and write every layer's output")
    common.model(p)
    p.add_argument("--weights", metavar="FILE", help=".npz (tilec), .weights (darknet) or .onnx (its "
                   "initializers); required unless MODEL is an .onnx file, whose own weights are the default")
    p.add_argument("--input", required=True, metavar="IN.npy", help="images, an (N, C, H, W) array")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")


def read_input(path, program, dtype):
    """The (N, C, H, W) batch in ``path``, checked against ``program``'s input; raises TilecError."""
    from tilec.errors import TilecError
    from tilec_runtime.npzfile import load_npy

    images = load_npy(path, TilecError, "input")
    need = tuple(program[0]["in_shape"])
    if images.ndim != 4 or images.shape[1:] != need or images.shape[0] < 1:
        raise TilecError(f"{path}: input has shape {images.shape}, the model needs (N, C, H, W) = "
                         f"(N, {', '.join(map(str, need))})")
    if images.dtype.kind not in "fiu":
        raise TilecError(f"{path}: input has dtype {images.dtype}, not a number")
    return images.astype(dtype)


def model_weights(model, weights):
    """The weights file for ``model``: ``weights``, or an .onnx model's own file."""
    from tilec.errors import TilecError
    from tilec.frontend.models import is_onnx, model_path

    if weights:
        return weights
    if is_onnx(model):
        return str(model_path(model))
    raise TilecError(f"{model}: --weights is required (only an .onnx model carries its own)")


def forward(model, weights, images_path, dtype="float32", graph=None):
    """{index: output} of every layer of ``model`` (a name, .cfg or .onnx;
    ``graph`` if already loaded) with ``weights`` (None: an .onnx model's
    own) on the batch in ``images_path`` (the command without its file output)."""
    from tilec.frontend.darknet_weights import load_any
    from tilec.frontend.models import load_model
    from tilec_runtime import reference

    program = (graph or load_model(model, default_loss="sse")).to_program()
    images = read_input(images_path, program, dtype)
    params, buffers = load_any(model_weights(model, weights), program, dtype)
    return reference.infer(program, params, buffers, images)


def run(args):
    from tilec.commands import load_model_arg
    from tilec.errors import TilecError
    from tilec_runtime.files import atomic_savez

    graph = load_model_arg(args, default_loss="sse")
    outputs = forward(args.model, args.weights, args.input, args.dtype, graph)
    try:
        atomic_savez(args.output, {str(i): y for i, y in outputs.items()})
    except OSError as exc:
        raise TilecError(f"{args.output}: cannot write: {exc.strerror or exc}") from None
    batch = len(next(iter(outputs.values())))
    print(f"{len(outputs)} layers, {batch} images; wrote {args.output}")
    return 0
