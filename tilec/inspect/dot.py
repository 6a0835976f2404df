"""The plan as a Graphviz graph: one cluster per layer group, one node per
tile coloured by its device, edges labelled with the bytes each device sends
forward per step (the backward gradients travel the same edges in reverse).

``plan_dot`` returns DOT text (no Graphviz needed); ``render`` turns it into
SVG or PNG with Graphviz's ``dot`` program when it is installed.
"""
import shutil
import subprocess

from tilec.errors import TilecError
from tilec_runtime import shards
from tilec_runtime.program import members_of

# colour-blind-friendly pastel palette, cycled by device rank
PALETTE = ("#a6cee3", "#b2df8a", "#fb9a99", "#fdbf6f", "#cab2d6", "#ffff99",
           "#8dd3c7", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69")
FORMATS = ("dot", "svg", "png")


def human_bytes(n):
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _shape(shape):
    return "x".join(str(v) for v in shape)


def _quote(text):
    """A DOT string; ``\\n`` sequences in ``text`` stay line breaks."""
    return '"' + str(text).replace('"', '\\"') + '"'


def plan_dot(plan):
    """DOT text of ``plan``."""
    program, names = plan["program"], [d["name"] for d in plan["devices"]]
    title = f"plan {plan['hash'][:12]}: {plan['model']}, batch {plan['batch']}, {plan['dtype']}"
    lines = ["digraph plan {", "  rankdir=TB;", "  compound=true;",
             '  node [shape=box, style="filled,rounded", fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=9];',
             f"  label={_quote(title)};",
             '  input [shape=oval, fillcolor="#eeeeee", label=' +
             _quote(f"input {_shape(program[0]['in_shape'])}\\non {names[0]}") + "];"]
    node_of = {}  # (group index, device) -> node id
    layer_group = {}
    for g, group in enumerate(plan["groups"]):
        first, last = group["layers"]
        for i in range(first, last + 1):
            layer_group[i] = g
        if group["kind"] == "tiled":
            grid = f"{len(group['row_splits']) - 1}x{len(group['col_splits']) - 1}"
            title = f"group {g}: layers {first}-{last}, grid {grid}{', recompute' if group.get('recompute') else ''}"
        elif group["mode"] == "channels":
            title = f"tail group {g}: layers {first}-{last}, split by channels over {len(group['tiles'])}"
        else:
            title = f"tail group {g}: layers {first}-{last}"
        lines.append(f"  subgraph cluster_{g} {{")
        lines.append(f"    label={_quote(title)}; style=rounded; color=\"#888888\";")
        if group["kind"] != "tiled" and group["mode"] == "channels":
            members = members_of(group)
            held = shards.layouts(program, first, last, len(members))
        for t, tile in enumerate(group["tiles"]):
            d = tile["device"]
            node = f"g{g}t{t}"
            node_of[(g, d)] = node
            out = program[last]["out_shape"]
            if group["kind"] == "tiled":
                label = f"{names[d]}\\nrows {tile['rows'][0]}-{tile['rows'][1]}\\ncols {tile['cols'][0]}-{tile['cols'][1]}"
            elif group["mode"] == "channels":  # each member's shard of every weight-bearing layer's channels
                m = members.index(d)
                label = names[d] + "".join(
                    f"\\n{i}: {'all' if held[i] is None else f'ch {held[i][m]}-{held[i][m + 1] - 1}'}"
                    for i in range(first, last + 1) if program[i]["kind"] in shards.WEIGHTED)
            else:
                label = f"{names[d]}\\n{_shape(out)}"
            lines.append(f"    {node} [label={_quote(label)}, fillcolor={_quote(PALETTE[d % len(PALETTE)])}];")
        lines.append("  }")
    edges = {}
    for m in plan["messages"]:
        if m["phase"] != "forward" or m["sender"] == m["receiver"]:
            continue
        if m.get("relay"):  # a member passing on its slice of the group's input: an edge inside the group
            src = node_of[(m["group"], m["sender"])]
        else:
            src = "input" if m["tensor"] < 0 else node_of[(layer_group[m["tensor"]], m["sender"])]
        dst = node_of[(m["group"], m["receiver"])]
        edges[(src, dst)] = edges.get((src, dst), 0) + m["bytes"]
    for (src, dst), nbytes in sorted(edges.items()):
        lines.append(f"  {src} -> {dst} [label={_quote(human_bytes(nbytes))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_text, fmt, path):
    """Write ``dot_text`` to ``path`` as ``fmt`` (dot, svg or png)."""
    if fmt not in FORMATS:
        raise TilecError(f"unknown format {fmt!r} (use {', '.join(FORMATS)})")
    if fmt == "dot":
        with open(path, "w") as f:
            f.write(dot_text)
        return path
    exe = shutil.which("dot")
    if exe is None:
        raise TilecError(f"drawing {fmt} needs Graphviz's `dot` program, which is not installed "
                         f"(Debian/Ubuntu: apt-get install graphviz); --format dot writes the graph text instead")
    res = subprocess.run([exe, f"-T{fmt}", "-o", str(path)], input=dot_text.encode(), capture_output=True)
    if res.returncode != 0:
        raise TilecError(f"Graphviz failed to draw {path}: {res.stderr.decode(errors='replace').strip()}")
    return path
