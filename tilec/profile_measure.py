"""``tilec profile``: measure this machine with the kernels tilec runs.

Each kernel kind (conv, maxpool, connected, element-wise) is timed forward
and backward on a set of shapes that span small and large, thin and deep
(the arithmetic intensity varies by two orders of magnitude), calling
``tilec_runtime.ops`` in the same sequence as ``tilec_runtime.tiled`` does
(a conv layer is conv + batch-norm statistics + normalise + activation).
The three coefficients of :class:`tilec.profiles.Kernel` are fitted to the
timings by non-negative least squares on *relative* error, against the
features of :func:`tilec.cost.compute.features`, so that the prediction
for a shape that was not measured follows its FLOPs and bytes.

The link test: latency and bandwidth to a peer over TCP. A peer runs ``tilec profile --serve PORT``: a tiny server that answers two
requests, each a 9-byte header (one op byte, an 8-byte big-endian length)
followed by that many raw bytes:

- ``E`` (echo): the payload comes back unchanged; a small echo gives the
  round-trip time, half of which is the one-way latency;
- ``S`` (sink): the payload is read and discarded, and the 8-byte count
  comes back; a large sink gives the bandwidth, after the round trip.

Only raw bytes travel (nothing is unpickled), and a request may not exceed
``MAX_PAYLOAD``, so a stray client cannot make the server allocate much.
"""
import datetime
import itertools
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from tilec.cost.compute import features, kernel_kind
from tilec.errors import TilecError
from tilec.profiles import FORMAT, VERSION
from tilec_runtime import ops

# (C_in, filters, kernel, output size, batch): thin and deep, big and small
CONV_SHAPES = [(3, 16, 3, 64, 1), (16, 32, 3, 48, 1), (32, 64, 3, 32, 1), (64, 128, 3, 16, 2), (128, 256, 3, 8, 2),
               (128, 64, 1, 24, 1), (256, 128, 1, 12, 2), (16, 16, 3, 12, 1), (64, 64, 3, 40, 1),
               (256, 512, 3, 6, 1), (8, 8, 3, 6, 1), (512, 256, 1, 8, 1)]
CONV_QUICK = [(3, 16, 3, 48, 1), (32, 64, 3, 24, 1), (128, 128, 3, 8, 1), (128, 64, 1, 16, 1), (8, 8, 3, 6, 1)]
POOL_SHAPES = [(16, 2, 64, 1), (64, 2, 32, 1), (256, 2, 12, 2), (8, 2, 8, 1), (32, 3, 20, 1)]
POOL_QUICK = [(16, 2, 48, 1), (128, 2, 12, 1), (8, 2, 6, 1)]
FC_SHAPES = [(1024, 64, 1), (4096, 256, 2), (8192, 512, 1), (256, 10, 4)]
FC_QUICK = [(2048, 128, 1), (256, 10, 1)]
ELT_SHAPES = [(16, 64, 1), (64, 32, 2), (256, 12, 1), (8, 6, 1), (128, 26, 4)]
ELT_QUICK = [(16, 48, 1), (8, 6, 1), (128, 16, 1)]


def _time(fn, min_time):
    """Best seconds of one call of ``fn`` over repeats lasting ``min_time``."""
    fn()  # warm-up: allocations, BLAS thread start
    best, spent, reps = float("inf"), 0.0, 0
    while spent < min_time or reps < 3:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best


def _conv_layer(c, f, k, hw):
    return {"kind": "conv", "index": 0, "inputs": [-1], "in_shape": [c, hw, hw], "out_shape": [f, hw, hw],
            "filters": f, "size": k, "stride": 1, "pad": k // 2, "bn": True, "act": "leaky"}


def _conv_calls(rng, c, f, k, hw, b, dtype):
    x = rng.standard_normal((b, c, hw, hw)).astype(dtype)
    w = rng.standard_normal((f, c, k, k)).astype(dtype)
    gamma, beta = np.ones(f, dtype), np.zeros(f, dtype)
    pads = (k // 2,) * 4

    def forward():
        z = ops.conv2d_forward(x, w, 1, pads)
        n, mean, m2 = ops.bn_combine([ops.bn_stats(z)])
        z, xhat, inv_std = ops.bn_normalize(z, mean, m2 / n, gamma, beta)
        return ops.act_forward(z, "leaky"), xhat, inv_std

    y, xhat, inv_std = forward()
    dy = rng.standard_normal(y.shape).astype(dtype)

    def backward():
        dz = ops.act_backward(y, "leaky", dy)
        s1, s2 = ops.bn_grad_sums(dz, xhat)
        count = dz.shape[0] * dz.shape[2] * dz.shape[3]
        dz = ops.bn_backward(dz, xhat, gamma, inv_std, s1 / count, s2 / count)
        return ops.conv2d_backward(x, w, 1, pads, dz)

    return forward, backward


def _pool_calls(rng, c, k, hw, b, dtype):
    x = rng.standard_normal((b, c, hw * k, hw * k)).astype(dtype)
    y, arg = ops.maxpool_forward(x, k, k, (0, 0, 0, 0))
    dy = rng.standard_normal(y.shape).astype(dtype)
    return (lambda: ops.maxpool_forward(x, k, k, (0, 0, 0, 0)),
            lambda: ops.maxpool_backward(x.shape, k, k, (0, 0, 0, 0), arg, dy))


def _fc_calls(rng, n_in, n_out, b, dtype):
    x = rng.standard_normal((b, n_in, 1, 1)).astype(dtype)
    w = rng.standard_normal((n_out, n_in)).astype(dtype)
    bias = np.zeros(n_out, dtype)
    dy = rng.standard_normal((b, n_out)).astype(dtype)
    return (lambda: ops.act_forward(ops.connected_forward(x, w, bias), "leaky"),
            lambda: ops.connected_backward(x, w, ops.act_backward(dy, "leaky", dy)))


def _elt_calls(rng, c, hw, b, dtype):
    """reorg (a pure data movement) stands for route/reorg/avgpool/losses."""
    x = rng.standard_normal((b, c, hw * 2, hw * 2)).astype(dtype)
    dy = rng.standard_normal((b, c * 4, hw, hw)).astype(dtype)
    return lambda: ops.reorg_forward(x, 2, "darknet"), lambda: ops.reorg_backward(dy, 2, "darknet")


def _samples(quick, dtype, min_time):
    """[(kind, direction, layer, positions, batch, seconds)] of every measured call."""
    rng = np.random.default_rng(0)
    out = []

    def record(layer, positions, batch, calls):
        for direction, fn in zip(("forward", "backward"), calls):
            out.append((kernel_kind(layer), direction, layer, positions, batch, _time(fn, min_time)))

    for c, f, k, hw, b in (CONV_QUICK if quick else CONV_SHAPES):
        record(_conv_layer(c, f, k, hw), hw * hw, b, _conv_calls(rng, c, f, k, hw, b, dtype))
    for c, k, hw, b in (POOL_QUICK if quick else POOL_SHAPES):
        layer = {"kind": "maxpool", "index": 0, "inputs": [-1], "in_shape": [c, hw * k, hw * k],
                 "out_shape": [c, hw, hw], "size": k, "stride": k, "padding": 0}
        record(layer, hw * hw, b, _pool_calls(rng, c, k, hw, b, dtype))
    for n_in, n_out, b in (FC_QUICK if quick else FC_SHAPES):
        layer = {"kind": "connected", "index": 0, "inputs": [-1], "in_shape": [n_in, 1, 1],
                 "out_shape": [n_out, 1, 1], "output": n_out, "act": "leaky"}
        record(layer, 1, b, _fc_calls(rng, n_in, n_out, b, dtype))
    for c, hw, b in (ELT_QUICK if quick else ELT_SHAPES):
        layer = {"kind": "reorg", "index": 0, "inputs": [-1], "in_shape": [c, hw * 2, hw * 2],
                 "out_shape": [c * 4, hw, hw], "stride": 2, "order": "darknet"}
        record(layer, hw * hw, b, _elt_calls(rng, c, hw, b, dtype))
    return out


def fit_kernel(rows, seconds):
    """Non-negative (overhead, s_per_flop, s_per_byte) minimising the relative
    error of ``rows`` (each (1, flops, bytes)) against ``seconds``.

    Every subset of the three terms is solved by least squares and the best
    solution with no negative coefficient wins (exact NNLS for 3 unknowns).
    Returns (coefficients, worst relative error).
    """
    a = np.asarray(rows, float)
    t = np.asarray(seconds, float)
    aw, tw = a / t[:, None], np.ones_like(t)  # divide by t: relative error
    best = (np.inf, np.zeros(3))
    for k in range(1, 4):
        for cols in itertools.combinations(range(3), k):
            sol, *_ = np.linalg.lstsq(aw[:, cols], tw, rcond=None)
            if (sol < 0).any():
                continue
            coef = np.zeros(3)
            coef[list(cols)] = sol
            err = float(np.sum((aw @ coef - tw) ** 2))
            if err < best[0]:
                best = (err, coef)
    coef = best[1]
    worst = float(np.max(np.abs(a @ coef - t) / t))
    return coef, worst


def fit_kernels(samples, itemsize):
    """{kind: {direction: {"overhead_us", "s_per_gflop", "s_per_gb"}}} and the worst relative error of each."""
    kernels, errors = {}, {}
    groups = {}
    for kind, direction, layer, positions, batch, sec in samples:
        flops, nbytes = features(layer, positions, batch, itemsize, direction)
        groups.setdefault((kind, direction), ([], []))
        groups[(kind, direction)][0].append((1.0, flops, nbytes))
        groups[(kind, direction)][1].append(sec)
    for (kind, direction), (rows, secs) in sorted(groups.items()):
        coef, worst = fit_kernel(rows, secs)
        kernels.setdefault(kind, {})[direction] = {
            "overhead_us": round(coef[0] * 1e6, 3), "s_per_gflop": round(coef[1] * 1e9, 6),
            "s_per_gb": round(coef[2] * 1e9, 6)}
        errors[f"{kind}.{direction}"] = round(worst, 3)
    return kernels, errors


def single_core_slowdown(dtype="float32"):
    """Seconds of a conv forward with one BLAS thread over all threads
    (measured in a child process: the thread count is fixed at BLAS load)."""
    code = ("import time,numpy as np\nfrom tilec_runtime import ops\n"
            "x=np.ones((1,64,48,48),np.%s);w=np.ones((128,64,3,3),np.%s)\n"
            "ops.conv2d_forward(x,w,1,(1,1,1,1))\nb=1e9\n"
            "for _ in range(5):\n t=time.perf_counter();ops.conv2d_forward(x,w,1,(1,1,1,1));"
            "b=min(b,time.perf_counter()-t)\nprint(b)\n") % (dtype, dtype)

    def run(env):
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        return float(res.stdout.strip()) if res.returncode == 0 else None

    one = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t_one, t_all = run(one), run(dict(os.environ))
    if not t_one or not t_all:
        return 1.0
    return round(max(t_one / t_all, 1.0), 3)


def _usable_memory_mb():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1000
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e6)


def measure_profile(quick=False, peer=None, dtype="float32", name=None):
    """A profile dict of this machine. ``peer``: (host, port) of a machine
    running ``tilec profile --serve``; without it the link is loopback."""
    itemsize = np.dtype(dtype).itemsize
    samples = _samples(quick, dtype, 0.02 if quick else 0.2)
    kernels, errors = fit_kernels(samples, itemsize)
    if peer is None:
        link = measure_link("127.0.0.1", start_loopback_server(), pings=10, payload=4 << 20)
        link_source = "loopback (no --peer given): an upper bound for a real network"
    else:
        link = measure_link(*peer)
        link_source = f"measured to {peer[0]}:{peer[1]} with the tilec link test"
    host = platform.node() or "this machine"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {
        "format": FORMAT, "version": VERSION, "name": name or f"local-{host}",
        "cores": os.cpu_count() or 1, "memory_mb": _usable_memory_mb(), "process_overhead_mb": 60,
        "multicore_speedup": single_core_slowdown(dtype),
        "link": {"bandwidth_mbps": round(link["bandwidth_mbps"], 3), "latency_ms": round(link["latency_ms"], 4)},
        "kernels": kernels,
        "sources": {
            "kernels": f"measured by `tilec profile{' --quick' if quick else ''}` on {host} ({platform.machine()}, "
                       f"{platform.python_version()}, numpy {np.__version__}) at {when}: {len(samples)} timed calls of "
                       f"tilec_runtime.ops in {dtype}, fitted per kind and direction",
            "fit_worst_relative_error": errors,
            "memory_mb": "MemAvailable at measurement time",
            "multicore_speedup": "a conv forward with one BLAS thread vs all, in child processes",
            "link": link_source,
        },
    }


def write_profile(data, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


# -- the link test ------------------------------------------------------------
HEADER = struct.Struct(">cQ")
MAX_PAYLOAD = 256 << 20
CHUNK = 1 << 20


class LinkError(TilecError):
    """The link test could not reach or talk to its peer."""


def _recv_exact(sock, n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, CHUNK))
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k
    return bytes(buf)


def _drain(sock, n):
    buf = bytearray(min(n, CHUNK))
    left = n
    while left:
        k = sock.recv_into(buf, min(left, len(buf)))
        if k == 0:
            raise ConnectionError("peer closed the connection")
        left -= k


def _serve_one(conn):
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                head = _recv_exact(conn, HEADER.size)
            except ConnectionError:
                return
            op, n = HEADER.unpack(head)
            if n > MAX_PAYLOAD or op not in (b"E", b"S"):
                return  # not our protocol: hang up
            if op == b"E":
                conn.sendall(_recv_exact(conn, n))
            else:
                _drain(conn, n)
                conn.sendall(struct.pack(">Q", n))


def serve(port, host="0.0.0.0", ready=None, connections=None):
    """Answer link tests on ``host:port`` (``connections``: stop after that
    many, None = forever). ``ready`` (a threading.Event) is set once
    listening; returns the bound port."""
    with socket.create_server((host, port)) as srv:
        if ready is not None:
            ready.port = srv.getsockname()[1]
            ready.set()
        served = 0
        while connections is None or served < connections:
            conn, _ = srv.accept()
            _serve_one(conn)
            served += 1
    return port


def start_loopback_server():
    """A one-connection server on a free loopback port, in a thread; returns the port."""
    ready = threading.Event()
    threading.Thread(target=serve, args=(0, "127.0.0.1", ready, 1), daemon=True, name="tilec-linktest").start()
    if not ready.wait(10):
        raise LinkError("the loopback link-test server did not start")
    return ready.port


def parse_peer(text):
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LinkError(f"--peer: expected HOST:PORT, got {text!r}")
    return host, int(port)


def measure_link(host, port, pings=20, payload=16 << 20, timeout=30.0):
    """{"latency_ms", "bandwidth_mbps"} of the link to a serving peer.

    Latency: half the median round trip of small echoes. Bandwidth: a
    ``payload``-byte sink, less one round trip, best of three.
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise LinkError(f"cannot connect to {host}:{port}: {exc}") from None
    try:
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(pings):
                t0 = time.perf_counter()
                sock.sendall(HEADER.pack(b"E", 8) + b"tilecpin")
                if _recv_exact(sock, 8) != b"tilecpin":
                    raise LinkError(f"{host}:{port} answered the echo with other bytes: not a tilec link-test server")
                rtts.append(time.perf_counter() - t0)
            rtt = sorted(rtts)[len(rtts) // 2]
            data = bytes(payload)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                sock.sendall(HEADER.pack(b"S", payload))
                sock.sendall(data)
                if struct.unpack(">Q", _recv_exact(sock, 8))[0] != payload:
                    raise LinkError(f"{host}:{port} acknowledged a different byte count")
                best = min(best, time.perf_counter() - t0)
    except (OSError, ConnectionError) as exc:
        raise LinkError(f"link test to {host}:{port} failed: {exc}") from None
    seconds = max(best - rtt, 1e-9)
    return {"latency_ms": rtt / 2 * 1e3, "bandwidth_mbps": payload * 8 / seconds / 1e6}
