"""`tilec export MODEL --weights W -o OUT.onnx`: the trained model as ONNX, for inference.

Batch norm in inference mode (running statistics). A softmax model outputs
the probabilities; an sse ([cost]) or [region] model the input of its loss,
the raw output (see ``tilec.export.onnx_export``).
"""


def add_parser(sub, common):
    p = sub.add_parser("export", help="write a trained model as ONNX (inference: batch norm with running statistics)")
    common.model(p)
    p.add_argument("--weights", metavar="FILE", help=".npz (tilec), .weights (darknet) or .onnx; required unless "
                   "MODEL is an .onnx file, whose own weights are the default")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")


def run(args):
    from tilec.commands import load_model_arg
    from tilec.commands.forward import model_weights
    from tilec.errors import TilecError
    from tilec.export.onnx_export import OUTPUT, export_onnx, write_onnx
    from tilec.frontend.darknet_weights import load_any

    graph = load_model_arg(args, default_loss="sse")
    program = graph.to_program()
    params, buffers = load_any(model_weights(args.model, args.weights), program, "float32")
    model = export_onnx(program, params, buffers, name=graph.name, net=graph.net)
    try:
        write_onnx(args.output, model)
    except OSError as exc:
        raise TilecError(f"{args.output}: cannot write: {exc.strerror or exc}") from None
    last = program[-1]
    what = "probabilities" if last["kind"] == "softmax" else f"the raw input of its [{last['kind']}] loss"
    dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    print(f"wrote {args.output}: {len(model.graph.node)} nodes; output '{OUTPUT}' {tuple(dims)}: {what}")
    return 0
