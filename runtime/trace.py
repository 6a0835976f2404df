"""Traces of training steps in the Chrome trace-event format.

``tilec train --trace FILE`` writes every rank's measured ops of every step
(compute, send, recv and the waits in them, batch-norm all-reduces, the
gradient buckets on the communication thread), and ``tilec simulate
--trace`` the predicted ones, in the same format: a JSON object with
``traceEvents``, which Perfetto (ui.perfetto.dev) and chrome://tracing open.
One process per device, thread 0 its schedule, thread 1 its gradient
all-reduces.
"""
import json

CATEGORY = {"send": "comm", "recv": "comm", "input": "comm", "bn_stats": "collective", "bn_grad": "collective",
            "grad_start": "comm", "grad_wait": "wait", "tail_fwd": "compute", "tail_bwd": "compute",
            "chan_reduce": "collective", "chan_wait": "wait"}


def op_name(op, messages=None):
    """A short label of a schedule op."""
    kind = op["op"]
    if kind in ("send", "recv"):
        m = messages[op["msg"]] if messages else None
        if m is None:
            return f"{kind} m{op['msg']}"
        peer = m["receiver"] if kind == "send" else m["sender"]
        arrow = "->" if kind == "send" else "<-"
        return f"{kind} {m['phase'][0]} L{m['tensor']} {arrow} {peer}"
    if kind == "input":
        return f"input m{op['msg']}"
    parts = [kind]
    if "group" in op:
        parts.append(f"g{op['group']}")
    if "unit" in op:
        parts.append(f"u{op['unit']}")
    if "layer" in op:
        parts.append(f"L{op['layer']}")
    if "bucket" in op:
        parts.append(f"b{op['bucket']}")
    if "rows" in op:
        parts.append(f"rows {op['rows'][0]}:{op['rows'][1]}")
    if "part" in op:
        parts.append(op["part"])
    return " ".join(parts)


def category(op):
    return CATEGORY.get(op["op"], "compute")


def step_events(ops_timed, reducer_events, messages, t0):
    """[[name, category, start us, duration us, thread]] of one step, times from ``t0``."""
    out = [[op_name(op, messages), category(op), round((a - t0) * 1e6, 1), round((b - a) * 1e6, 1), 0]
           for op, a, b in ops_timed]
    out += [[name, "collective", round((a - t0) * 1e6, 1), round((b - a) * 1e6, 1), 1]
            for name, a, b in reducer_events]
    return out


def chrome_trace(steps, names):
    """The trace-event JSON object of ``steps``: [(step, rank, step start in
    seconds on a common clock, events of ``step_events``)]."""
    events = []
    for rank, name in enumerate(names):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"{rank}: {name}"}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": "schedule"}})
        events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": 1, "args": {"name": "all-reduce"}})
    for step, rank, start, items in steps:
        for name, cat, ts, dur, tid in items:
            events.append({"name": name, "cat": cat, "ph": "X", "pid": rank, "tid": tid,
                           "ts": round(start * 1e6 + ts, 1), "dur": dur, "args": {"step": step}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(path, steps, names):
    with open(path, "w") as f:
        json.dump(chrome_trace(steps, names), f)
        f.write("\n")
    return path
