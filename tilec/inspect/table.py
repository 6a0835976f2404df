"""The layer table of ``tilec info``: shapes, parameters, FLOPs, memory.

Units: MFLOPs / GFLOPs are 10^6 / 10^9 FLOPs and MB 10^6 bytes, per
training step of ``batch`` images (counting rules in :mod:`tilec.ir.stats`).

Examples
--------
>>> from tilec.frontend.builder import Model
>>> g = Model(8, 8, 1).conv(2, size=3).avgpool().softmax().build()
>>> print(layer_table(g, batch=1))
model: input 1x8x8, batch 1, float32
#  layer    detail                input -> output  params  fwd MFLOPs  bwd MFLOPs  act MB
0  conv     2 3x3/1 pad 1 linear  1x8x8 -> 2x8x8       20       0.002       0.002   0.001
1  avgpool                        2x8x8 -> 2x1x1        0       0.000       0.000   0.000
2  softmax                        2x1x1 -> 2x1x1        0       0.000       0.000   0.000
total: 20 parameters, 0.000 GFLOPs per step (0.000 forward + 0.000 backward), activations 0.001 MB
"""
from tilec.ir.stats import dtype_bytes, layer_stats, totals


def _shape(shape):
    return "x".join(str(v) for v in shape)


def layer_detail(layer):
    """A short summary of a layer's own fields, e.g. ``16 3x3/1 pad 1 bn leaky``."""
    kind = layer["kind"]
    if kind == "conv":
        k = layer["size"]
        bn = " bn" if layer["bn"] else ""
        return f"{layer['filters']} {k}x{k}/{layer['stride']} pad {layer['pad']}{bn} {layer['act']}"
    if kind in ("maxpool", "local_avgpool"):
        k = layer["size"]
        counted = " count pad" if layer.get("count_pad") else ""
        return f"{k}x{k}/{layer['stride']} padding {layer['padding']}{counted}"
    if kind == "connected":
        return f"{layer['output']} {layer['act']}"
    if kind == "route":
        return "layers " + ",".join(str(j) for j in layer["inputs"])
    if kind == "reorg":
        return (f"{'x' if layer['reverse'] else '/'}{layer['stride']}"
                + ("" if layer["order"] == "darknet" else f" {layer['order']}"))
    if kind == "cost":
        return layer["type"]
    return ""


def layer_table(graph, batch, dtype="float32"):
    """The per-layer table of ``graph`` as plain text with aligned columns.

    Parameters
    ----------
    graph : tilec.ir.graph.Graph
    batch : int
        Images per step (FLOPs and activation bytes scale with it).
    dtype : str or int
        Element type of the activations (``"float32"``) or its byte size.

    Returns
    -------
    str
        A header line, one row per layer (index, kind, detail,
        input -> output shape as CxHxW, parameters, forward and backward
        MFLOPs, activation MB) and a totals line (GFLOPs).
    """
    stats = layer_stats(graph, batch=batch, dtype=dtype)
    total = totals(stats)
    header = ("#", "layer", "detail", "input -> output", "params", "fwd MFLOPs", "bwd MFLOPs", "act MB")
    rows = [(str(layer["index"]), layer["kind"], layer_detail(layer),
             f"{_shape(layer['in_shape'])} -> {_shape(layer['out_shape'])}", f"{s.params:,}",
             f"{s.fwd_flops / 1e6:,.3f}", f"{s.bwd_flops / 1e6:,.3f}", f"{s.act_bytes / 1e6:,.3f}")
            for layer, s in zip(graph.layers(), stats)]
    widths = [max(len(row[c]) for row in rows + [header]) for c in range(len(header))]
    text_columns = {1, 2, 3}  # left-aligned; numbers align right

    def line(row):
        cells = [cell.ljust(w) if c in text_columns else cell.rjust(w)
                 for c, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    dtype_name = dtype if isinstance(dtype, str) else f"{dtype_bytes(dtype)}-byte"
    fwd, bwd = total.fwd_flops / 1e9, total.bwd_flops / 1e9
    return "\n".join(
        [f"{graph.name}: input {_shape(graph.input_shape)}, batch {batch}, {dtype_name}", line(header)]
        + [line(row) for row in rows]
        + [f"total: {total.params:,} parameters, {fwd + bwd:,.3f} GFLOPs per step "
           f"({fwd:,.3f} forward + {bwd:,.3f} backward), activations {total.act_bytes / 1e6:,.3f} MB"])
