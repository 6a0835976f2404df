"""Traces of training steps in the Chrome trace-event format.

``tilec train --trace FILE`` writes every rank's measured ops of every step
(compute, send, recv and the waits in them, batch-norm all-reduces, the
gradient buckets on the communication thread), and ``tilec simulate
--trace`` the predicted ones, in the same format: a JSON object with
``traceEvents``, which Perfetto (ui.perfetto.dev) and chrome://tracing open.
One process per device, thread 0 its schedule, thread 1 its gradient
all-reduces. A measured op also carries its thread's CPU time (``tts`` and
``tdur``, the format's thread clock, which Perfetto shows as "Thread
duration"): an op whose CPU time falls short of its length waited, or the
device's other threads took its core meanwhile.
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
    """[[name, category, start us, duration us, thread, thread clock at the
    start us, thread clock duration us]] of one step, times from ``t0``;
    the thread clock is the CPU time of the thread that ran the op (where
    it is shorter than the duration, the thread waited, or the device's
    other threads had its core)."""
    def item(name, cat, a, b, c0, c1, thread):
        return [name, cat, round((a - t0) * 1e6, 1), round((b - a) * 1e6, 1), thread, round(c0 * 1e6, 1),
                round((c1 - c0) * 1e6, 1)]
    out = [item(op_name(op, messages), category(op), a, b, c0, c1, 0) for op, a, b, c0, c1 in ops_timed]
    out += [item(name, "collective", a, b, c0, c1, 1) for name, a, b, c0, c1 in reducer_events]
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
        for name, cat, ts, dur, tid, *clock in items:
            event = {"name": name, "cat": cat, "ph": "X", "pid": rank, "tid": tid,
                     "ts": round(start * 1e6 + ts, 1), "dur": dur, "args": {"step": step}}
            if clock:  # measured (a prediction has none): the thread's CPU time in the op
                event["tts"], event["tdur"] = clock
            events.append(event)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(path, steps, names):
    with open(path, "w") as f:
        json.dump(chrome_trace(steps, names), f)
        f.write("\n")
    return path
