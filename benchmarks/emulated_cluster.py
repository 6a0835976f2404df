"""An emulated slow cluster: does the simulator's step time mean something?

For each configuration (a model, 2-3 devices, each device's share of a CPU
core) this script builds a small cluster on this machine and trains on it
with `tilec train --cluster`, then predicts the same plan with `tilec
simulate` and prints both.

The emulated cluster (made and removed by this script, also on Ctrl-C):

- network: one network namespace per device (``eth0``, link-local
  169.254.91.x/24), each joined by a veth pair to a bridge in a switch
  namespace (as ``tests/test_netns.py`` does). Every device's link is
  shaped with ``tc qdisc ... tbf`` to ``--mbps`` (94 Mbit/s, a Pi 3's
  Ethernet) in both directions: its uplink (``eth0`` egress) and its
  downlink (its switch port's egress), as a full-duplex switch port is.
  No traffic leaves 169.254.91.0/24.
- compute (``--emulate stretch``, the default): each worker runs as
  ``tilec worker --emulate-speed SHARE``, sleeping after each compute stage
  ``1/SHARE - 1`` times as long as the stage took
  (``tilec_runtime.emulate``): a device that computes that much slower and
  never stops, as a slow board. The runtime's own work between stages
  (framing, copies, dispatch) is not slowed.
- compute (``--emulate quota``): each worker runs in its own cgroup (v1 ``cpu`` controller,
  ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, period ``--period-us``,
  or with 0 per device the shortest period that keeps the kernel's minimum
  quota of 1 ms; ``--pin`` adds a cpuset) at a nominal share of one core.
  A quota stops a device for the rest of its period, which a slow board
  never does; a peer waiting for it then waits that long. A shorter period
  shortens those stops (tried: errors -18 to -20% on the tiled configs
  against -17 to -24% at 10 ms, but -41 to -57% on the others), which is
  why it is not the default.
- the launcher (`tilec train`) runs in device 0's namespace (as if rank 0
  read its data from its own disk: the batches do not cross the shaped
  link) and outside the quotas.

The speed a device actually gets is measured, before and after each run:
the same generated conv kernel (forward + backward of a 32->64 3x3 conv
tile, one thread) timed as every device runs it (under its stretch, or in
its cgroup; all at once, best of 5 rounds) against this machine unslowed
(the best over the whole run: other processes' load slows an unconstrained
probe far more than a slowed one). A device's speed ratio is that
reference over the mean of its before and after times.

Per configuration:

1. `tilec compile MODEL --cluster cluster.yaml -o PLAN` (once): every
   device with this machine's profile (``tilec profile``, measured at the
   start unless ``--profile`` names one), ``compute_scale`` = its ratio
   measured just before, ``threads: 1``, ``bandwidth_mbps`` and
   ``latency_ms`` as measured across the shaped path (``tilec profile
   --serve`` in one namespace, ``tilec.profile_measure.measure_link`` from
   another: what `tilec profile --peer` puts in a user's cluster file; TCP
   carries 91 of tbf's 94 Mbit/s), ``memory_mb`` large, and the workers'
   hosts and ports.
2. `tilec train MODEL --plan PLAN --cluster cluster.yaml --key-file KEY
   --steps N --metrics m.jsonl [--trace]` against `tilec worker` processes
   in the namespaces and cgroups. Per device (median over the steps after
   the first ``--warmup``): step_s (rank 0's is the step time), compute_s,
   wait_s, cpu_s, bytes sent, peak resident memory (VmHWM per step, the
   whole process); the cgroups' throttling (cpu.stat).
3. The same plan again with no quota (``--no-full-speed`` skips it): the
   CPU seconds each device spends per step at full speed.
4. At the end, `tilec simulate PLAN --cluster cluster-predicted.yaml --json
   --trace`: the SAME plan (same device names) for the devices at their
   final ratios: step_s, per device busy_s, idle_s, bytes sent and
   peak_bytes.

The tables: measured against predicted step time (error = predicted /
measured - 1) and peak memory per device; per device compute_s against
busy_s, wait_s against idle_s, and the CPU seconds at full speed against
busy_s x ratio (the simulator's compute at full speed: this comparison does
not depend on the quota emulation); with ``--trace``, the seconds per step
of each op kind, measured and simulated.

Run it as root (namespaces, tc and cgroups need it; cgroup v1 ``cpu`` at
/sys/fs/cgroup/cpu), from the repository with tilec installed and a C
compiler (the generated kernels build once into $TILEC_CACHE, which the
workers share), on an otherwise quiet machine (it reports the load average
and the busiest processes before and after)::

    sudo -E env PATH=$PATH python benchmarks/emulated_cluster.py \\
        [--configs NAME,...] [--steps 8] [--warmup 2] [--mbps 94] [--emulate stretch|quota] \\
        [--period-us 10000] [--pin] [--profile host.json] [--trace] [--json out.json] [--keep DIR]
    python benchmarks/emulated_cluster.py --list        # the configurations
    python benchmarks/emulated_cluster.py --cleanup     # remove what a killed run left

A configuration is a model, a batch, the nominal share of a core of each
device, and compile flags. At this machine's speed (an x86 core is some 25x
a Pi 3 core) the optimiser keeps one device busy on a 94 Mbit/s link unless
the devices are slow (about 10% of a core: a Pi 3B's four cores), so the
faster configurations force a split with ``--grid`` (the simulator must
predict whatever plan it is given); the slow ones use the optimiser's plan.
The default configurations ask for at most one core in all, so that on a
small shared machine the devices do not take CPU from each other. A run of
the defaults takes about 8 minutes. Not run in CI (root, minutes, and a
shared machine's load changes the numbers).
"""
import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SUBNET = "169.254.91"
PORT, SERVE_PORT = 7700, 7790
CPU_ROOT = Path("/sys/fs/cgroup/cpu")
CPUSET_ROOT = Path("/sys/fs/cgroup/cpuset")
TAG = "tlcemu"  # prefix of every namespace and cgroup this script makes
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# name: (model, batch, nominal share of a core per device, compile flags, train flags)
SSE = ["--lr", "1e-6"]  # tiny416's sum-of-squares cost diverges at its cfg's rate
CONFIGS = {
    # the optimiser keeps the step on the faster device: the profile and the quota alone, no communication
    "tiny416-25+10": ("tiny416", 1, [0.25, 0.1], [], SSE),
    "detector-small-b16-20+10+10": ("detector-small", 16, [0.2, 0.1, 0.1], [], []),
    # every device tiled by force (at these speeds a 94 Mbit/s link is slow): communication-bound
    "tiny416-2x50-grid": ("tiny416", 1, [0.5, 0.5], ["--grid", "1x2"], SSE),
    "tiny416-50+20-grid": ("tiny416", 1, [0.5, 0.2], ["--grid", "1x2"], SSE),
    "tiny416-3x30-grid": ("tiny416", 1, [0.3, 0.3, 0.3], ["--grid", "1x3"], SSE),
    # Pi-class devices (a Pi 3B's four cores are about 10% of this machine's core): the optimiser's plan
    "tiny416-2x10": ("tiny416", 1, [0.1, 0.1], [], SSE),
    "tiny416-3x10": ("tiny416", 1, [0.1, 0.1, 0.1], [], SSE),
    "detector-small-b16-2x10": ("detector-small", 16, [0.1, 0.1], [], []),
    "detector-small-b16-3x10": ("detector-small", 16, [0.1, 0.1, 0.1], [], []),
    # not run by default: more than one core in all (on a 2-core machine shared with other work the
    # devices then take CPU from each other and the measured ratios move with the load), or one device
    # (`tilec train --metrics` writes no per-device record for one device: no peak memory, no cpu_s)
    "tiny416-100+40-grid": ("tiny416", 1, [1.0, 0.4], ["--grid", "1x2"], SSE),
    "tiny416-3x50-grid": ("tiny416", 1, [0.5, 0.5, 0.5], ["--grid", "1x3"], SSE),
    "detector-small-b16-100+40-grid": ("detector-small", 16, [1.0, 0.4], ["--grid", "1x2"], []),
    "tiny416-1x10": ("tiny416", 1, [0.1], [], SSE),
    "detector-small-b16-1x10": ("detector-small", 16, [0.1], [], []),
    # the tiles split by columns (narrow rows: what a cost per row prices), against the optimiser's rows
    "detector-small-b16-2x10-cols": ("detector-small", 16, [0.1, 0.1], ["--grid", "1x2"], []),
}
DEFAULT = ("tiny416-25+10", "detector-small-b16-20+10+10", "tiny416-2x50-grid", "tiny416-50+20-grid",
           "tiny416-3x30-grid", "tiny416-2x10", "tiny416-3x10", "detector-small-b16-2x10", "detector-small-b16-3x10")


def sh(*cmd, check=True):
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True, timeout=60)


def tilec_cmd(*args):
    return [sys.executable, "-m", "tilec.cli", *map(str, args)]


# -- the speed probe: run as `emulated_cluster.py --probe SECONDS ROUNDS` -------------------------


def probe(seconds, rounds, speed=None):
    """Print the seconds of one forward + backward of a conv tile (generated
    kernels, one thread), per round of at least ``seconds`` wall time; with
    ``speed``, each stage slowed as a worker's ``--emulate-speed`` slows it."""
    from tilec.profile_measure import _conv_tile, _module
    from tilec_runtime.emulate import Stretch
    from tilec_runtime.kernel_set import Kernels
    kernels = Kernels(_module("float32")[0], "float32")
    kernels.set_threads(1)
    step, _, _, params, buffers, acc = _conv_tile(kernels, "float32", 32, 64, 3, 48, 1, True, True)
    step.conv_fwd(0, params)
    step.epi_fwd(0, params, buffers)
    stage = Stretch(speed).run if speed is not None else (lambda fn, *a: fn(*a))
    out = []
    print("ready", flush=True)
    sys.stdin.readline()  # start together with the other probes
    for _ in range(rounds):
        t0, n = time.perf_counter(), 0
        while True:
            stage(step.conv_fwd, 0, params)
            stage(step.conv_bwd, 0, params, acc)
            n += 1
            if time.perf_counter() - t0 >= seconds:
                break
        out.append((time.perf_counter() - t0) / n)
    print(json.dumps(out), flush=True)


# -- the emulated cluster -------------------------------------------------------------------------


class Emulation:
    """Namespaces, shaped links and cgroups for up to ``n`` devices; every
    process started through it is killed and everything removed by close()."""

    def __init__(self, n, mbps, period_us, pin, env, mode="stretch"):
        self.n, self.mbps, self.period_us, self.pin, self.env = n, mbps, period_us, pin, env
        self.mode = mode  # "stretch": workers slow their compute (--emulate-speed); "quota": CFS quotas
        self.speeds = [1.0] * n  # stretch: each device's emulated speed
        self.tag = f"{TAG}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.ns = [f"{self.tag}-{i}" for i in range(n)]
        self.cgroups = [CPU_ROOT / self.tag / f"d{i}" for i in range(n)]
        self.cpusets = [CPUSET_ROOT / self.tag / f"d{i}" for i in range(n)] if pin else []
        self.made_ns, self.procs = [], []
        self.reference = None  # the probe's best seconds outside any quota

    def address(self, i):
        return f"{SUBNET}.{i + 1}"

    def open(self):
        try:
            sh("ip", "netns", "add", self.switch)
        except (subprocess.CalledProcessError, FileNotFoundError, PermissionError) as exc:
            raise SystemExit(f"cannot make network namespaces (run as root): {getattr(exc, 'stderr', '') or exc}")
        self.made_ns.append(self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        rate = f"{self.mbps}mbit"
        for i, ns in enumerate(self.ns):
            sh("ip", "netns", "add", ns)
            self.made_ns.append(ns)
            sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"port{i}", "netns", self.switch)
            sh("ip", "-n", self.switch, "link", "set", f"port{i}", "master", "br0")
            sh("ip", "-n", self.switch, "link", "set", f"port{i}", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # uplink (the device's egress) and downlink (its switch port's egress)
            for where, dev in ((ns, "eth0"), (self.switch, f"port{i}")):
                sh("tc", "-n", where, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb",
                   "latency", "100ms")
        for i, cg in enumerate(self.cgroups):
            cg.mkdir(parents=True, exist_ok=True)
        if self.pin:
            cpus = sorted(os.sched_getaffinity(0))
            mems = (CPUSET_ROOT / "cpuset.mems").read_text().strip()
            top = CPUSET_ROOT / self.tag
            top.mkdir(exist_ok=True)
            (top / "cpuset.cpus").write_text((CPUSET_ROOT / "cpuset.cpus").read_text())
            (top / "cpuset.mems").write_text(mems)
            for i, cs in enumerate(self.cpusets):
                cs.mkdir(exist_ok=True)
                (cs / "cpuset.cpus").write_text(str(cpus[i % len(cpus)]))
                (cs / "cpuset.mems").write_text(mems)
        return self

    def period(self, share):
        """The CFS period of a device at ``share`` of a core: ``period_us``,
        or (0) the shortest whose quota is the kernel's minimum, 1 ms: a
        device throttled in finer slices waits less at each synchronisation
        for a peer that ran out of its quota (a slow board never stops)."""
        return self.period_us or max(1000, int(round(1000 / share)))

    def set_shares(self, shares):
        """Device i runs at shares[i] of one core (1.0: full speed): by
        quota, or (stretch) by its workers' ``--emulate-speed``."""
        if self.mode == "stretch":
            self.speeds = list(shares)
            shares = [1.0] * len(shares)
        for cg, share in zip(self.cgroups, shares):
            (cg / "cpu.cfs_quota_us").write_text("-1")
            period = self.period(share) if share < 1.0 else 100000
            (cg / "cpu.cfs_period_us").write_text(str(period))
            if share < 1.0:
                quota = max(1000, int(round(share * period)))
                (cg / "cpu.cfs_quota_us").write_text(str(quota))

    def start(self, i, cmd, cgroup=True, netns=True, **kw):
        """Start ``cmd`` in device i's namespace (and cgroup)."""
        files = [self.cgroups[i] / "cgroup.procs"] if cgroup else []
        if cgroup and self.pin:
            files.append(self.cpusets[i] / "cgroup.procs")

        def enter():
            for f in files:
                with open(f, "w") as fh:
                    fh.write(str(os.getpid()))

        full = (["ip", "netns", "exec", self.ns[i]] if netns else []) + list(cmd)
        p = subprocess.Popen(full, preexec_fn=enter, start_new_session=True, env=self.env, text=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, procs):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdin, p.stdout, p.stderr):
                if f:
                    f.close()
            if p in self.procs:
                self.procs.remove(p)

    def close(self):
        self.stop(list(self.procs))
        for ns in reversed(self.made_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made_ns = []
        for top in (CPU_ROOT / self.tag, CPUSET_ROOT / self.tag):
            remove_cgroup(top)


def remove_cgroup(top):
    if not top.exists():
        return
    for _ in range(50):
        try:
            for child in sorted(top.iterdir()):
                if child.is_dir():
                    child.rmdir()
            top.rmdir()
            return
        except OSError:
            time.sleep(0.1)  # a killed process is still leaving
    print(f"warning: could not remove cgroup {top}", file=sys.stderr)


def cleanup_leftovers():
    """Remove the namespaces and cgroups a killed run of this script left,
    ending the processes still in them (its workers, by their ids)."""
    for name in sh("ip", "netns", "list").stdout.split():
        if name.startswith(TAG):
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                kill(int(pid), f"namespace {name}")
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            print(f"removed namespace {name}")
    for root in (CPU_ROOT, CPUSET_ROOT):
        for top in root.glob(f"{TAG}*"):
            for child in top.iterdir():
                if child.is_dir():
                    for pid in (child / "cgroup.procs").read_text().split():
                        kill(int(pid), f"cgroup {child}")
            remove_cgroup(top)
            print(f"removed cgroup {top}")


def kill(pid, where):
    try:
        os.kill(pid, signal.SIGKILL)
        print(f"ended process {pid} (in {where})")
    except ProcessLookupError:
        pass


# -- measurements -------------------------------------------------------------------------------


def run_probes(emu, devices, seconds, rounds):
    """[seconds per call, best of ``rounds``] of the probe in each of
    ``devices`` (cgroup indices; None = outside any quota), all at once."""
    procs = []
    for d in devices:
        cmd = [sys.executable, __file__, "--probe", str(seconds), str(rounds)]
        if d is not None and emu.mode == "stretch" and emu.speeds[d] < 1.0:
            cmd += ["--probe-speed", str(emu.speeds[d])]
        if d is None:
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=emu.env,
                                 start_new_session=True)
            emu.procs.append(p)
        else:
            p = emu.start(d, cmd, netns=False, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(p)
    try:
        for p in procs:
            line = "-"
            while line and line.strip() != "ready":  # (a first kernel build prints progress first)
                line = p.stdout.readline()
            if not line:
                raise RuntimeError("a speed probe did not start")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        return [json.loads(p.stdout.readline()) for p in procs]
    finally:
        emu.stop(procs)


def probe_times(emu, shares):
    """The probe outside any quota (best of 7 rounds) and inside each
    device's cgroup, all devices at once (best of 5 rounds each), in
    seconds per call; the run-wide reference (``emu.reference``) follows
    the best outside time."""
    free = min(run_probes(emu, [None], 0.15, 7)[0])
    emu.reference = min(emu.reference or free, free)
    inside = run_probes(emu, list(range(len(shares))), max(0.3, 0.05 / min(shares)), 5)
    return {"free_s": free, "inside_s": [min(t) for t in inside], "inside_rounds_s": inside}


def speed_ratios(reference, before, after=None):
    """Each device's speed over this machine's: the probe's best time outside
    any quota over the whole run / its time inside the device's cgroup
    (the mean of the best before and after the run).

    The reference is the run-wide best because load from other processes
    slows the unconstrained probe far more than a device held to a fraction
    of a core: a reference taken at one moment would move the ratio with
    the load rather than with the quota (and the profile the simulator
    uses is a best-of measurement too)."""
    times = [before["inside_s"]] + ([after["inside_s"]] if after else [])
    return [reference / statistics.mean(t) for t in zip(*times)]


def link_test(emu, payload=4 << 20):
    """Latency and bandwidth from device 0 to device 1 across the shaped path."""
    server = emu.start(1, tilec_cmd("profile", "--serve", SERVE_PORT), cgroup=False, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    try:
        server.stdout.readline()
        code = (f"import json; from tilec.profile_measure import measure_link; "
                f"print(json.dumps(measure_link('{emu.address(1)}', {SERVE_PORT}, pings=50, payload={payload})))")
        client = emu.start(0, [sys.executable, "-c", code], cgroup=False, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        out, err = client.communicate(timeout=120)
        emu.stop([client])
        if client.returncode != 0:
            raise RuntimeError(f"link test failed: {err.strip()}")
        return json.loads(out)
    finally:
        emu.stop([server])


def write_cluster(path, profile, ratios, emu, latency_ms, mbps):
    lines = ["devices:"]
    for i, r in enumerate(ratios):
        lines.append(f"  - {{name: d{i}, host: {emu.address(i)}, port: {PORT}, profile: {profile}, "
                     f"compute_scale: {r:.4f}, threads: 1, memory_mb: 100000}}")
    lines.append(f"link: {{bandwidth_mbps: {mbps:.3f}, latency_ms: {latency_ms:.4f}}}")
    path.write_text("\n".join(lines) + "\n")


def cpu_stat(cgroup):
    """The cgroup's cpu.stat (nr_periods, nr_throttled, throttled_time ns)."""
    out = {}
    for line in (cgroup / "cpu.stat").read_text().splitlines():
        k, v = line.split()
        if k in ("nr_periods", "nr_throttled", "throttled_time"):
            out[k] = int(v)
    return out


def start_workers(emu, n, key_file):
    procs = []
    for i in range(n):
        slow = ["--emulate-speed", emu.speeds[i]] if emu.mode == "stretch" and emu.speeds[i] < 1.0 else []
        procs.append(emu.start(i, tilec_cmd("worker", "--listen", f"{emu.address(i)}:{PORT}", "--key-file",
                                            key_file, *slow), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for i, p in enumerate(procs):
        line = p.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"worker {i} did not start: {line}{p.stderr.read() if p.poll() is not None else ''}")
    return procs


def summarise(metrics_path, n, warmup):
    """Median per device (and rank 0's step) over the steps after ``warmup``."""
    per = [[] for _ in range(n)]
    steps = []
    for line in Path(metrics_path).read_text().splitlines():
        r = json.loads(line)
        if r["step"] < warmup:
            continue
        if "device" in r:
            per[r["device"]].append(r)
        else:
            steps.append(r["step_s"])
    med = statistics.median
    if n == 1:  # one device: `tilec train --metrics` writes only the step line (rank 0's step_s)
        return {"step_s": med(steps), "step_s_all": steps,
                "devices": [{"step_s": med(steps), "compute_s": med(steps), "wait_s": 0.0, "cpu_s": None,
                             "bytes_sent": 0, "peak_bytes": None}]}
    return {"step_s": med(steps), "step_s_all": steps,
            "devices": [{"step_s": med(x["step_s"] for x in rs), "compute_s": med(x["compute_s"] for x in rs),
                         "wait_s": med(x["wait_s"] for x in rs), "cpu_s": med(x["cpu_s"] for x in rs),
                         "bytes_sent": med(x["bytes_sent"] for x in rs),
                         "peak_bytes": max(x["peak_bytes"] for x in rs)} for rs in per]}


def run_config(name, emu, args, work, profile, link):
    """Compile, train on the emulated devices, and (without quotas) again."""
    model, batch, shares, compile_flags, train_flags = CONFIGS[name]
    n = len(shares)
    d = work / name
    d.mkdir()
    emu.set_shares(shares + [1.0] * (emu.n - n))
    before = probe_times(emu, shares)
    ratios = speed_ratios(emu.reference, before)
    print(f"  speed ratios {' '.join(f'{r:.3f}' for r in ratios)} (nominal {shares})", flush=True)
    # the plan: compiled once, for the devices as they measure now
    cluster = d / "cluster.yaml"
    write_cluster(cluster, profile, ratios, emu, link["latency_ms"], link["bandwidth_mbps"])
    plan = d / "plan"
    got = subprocess.run(tilec_cmd("compile", model, "--cluster", cluster, "--batch", batch, "-o", plan,
                                   "--workers", "2", *compile_flags), capture_output=True, text=True,
                         env=emu.env, timeout=600)
    if got.returncode != 0:
        raise RuntimeError(f"{name}: compile failed: {got.stderr.strip()}")
    (d / "compile.txt").write_text(got.stdout)
    plan_json = json.loads((plan / "plan.json").read_text())
    key = d / "key"
    key.write_text(secrets.token_hex(32))
    key.chmod(0o600)
    run = [model, plan, cluster, key, train_flags]
    metrics, stats = train_once(emu, d, "metrics", n, args, run, trace=args.trace)
    measured = summarise(metrics, n, args.warmup)
    measured["throttling"] = stats
    if args.trace:
        measured["ops"] = op_seconds(d / "metrics-trace.json", n, args.warmup, measured=True)
    after = probe_times(emu, shares) if args.recheck else None
    full = None
    if args.full_speed:
        # the same plan with no quota: the CPU seconds per step each device needs at full speed
        emu.set_shares([1.0] * emu.n)
        full = summarise(train_once(emu, d, "full-speed", n, args, run, trace=True)[0], n, args.warmup)
        full["ops"] = op_seconds(d / "full-speed-trace.json", n, args.warmup, measured=True)
    measured["full_speed"] = full
    print(f"  measured {measured['step_s']:.3f} s per step (rank 0's median)", flush=True)
    return {"name": name, "model": model, "batch": batch,
            "devices": n, "nominal_shares": shares, "compile_flags": compile_flags, "train_flags": train_flags,
            "probe": {"before": before, "after": after}, "compile_ratios": ratios,
            "busy_devices": sorted({t["device"] for g in plan_json["groups"] for t in g["tiles"]}),
            "plan_hash": plan_json["hash"], "dir": str(d),
            "groups": [{"layers": g["layers"], "devices": sorted({t["device"] for t in g["tiles"]})}
                       for g in plan_json["groups"]],
            "measured": measured}


def predict(result, emu, args, profile, link):
    """`tilec simulate` of the config's plan for its devices at the speed
    ratios against the run-wide reference (same plan, same device names)."""
    d = Path(result["dir"])
    ratios = speed_ratios(emu.reference, result["probe"]["before"], result["probe"]["after"])
    cluster = d / "cluster-predicted.yaml"
    write_cluster(cluster, profile, ratios, emu, link["latency_ms"], link["bandwidth_mbps"])
    got = subprocess.run(tilec_cmd("simulate", d / "plan", "--cluster", cluster, "--json", "--trace",
                                   d / "sim-trace.json"), capture_output=True, text=True, env=emu.env, timeout=600)
    if got.returncode != 0:
        raise RuntimeError(f"{result['name']}: simulate failed: {got.stderr.strip()}")
    predicted = json.loads(got.stdout)
    predicted["ops"] = op_seconds(d / "sim-trace.json", result["devices"], 0, measured=False)
    result.update(speed_ratios=ratios, predicted=predicted,
                  error=predicted["step_s"] / result["measured"]["step_s"] - 1)
    return result


def train_once(emu, d, tag, n, args, run, trace):
    """Train ``run`` (model, plan, cluster, key, flags) on fresh workers;
    returns (metrics path, each device cgroup's throttling during it)."""
    model, plan, cluster, key, train_flags = run
    workers = start_workers(emu, n, key)
    metrics = d / f"{tag}.jsonl"
    stat0 = [cpu_stat(cg) for cg in emu.cgroups[:n]]
    try:
        # the launcher: in device 0's namespace (its data does not cross the link), outside the quotas
        train = emu.start(0, tilec_cmd("train", model, "--plan", plan, "--cluster", cluster, "--key-file", key,
                                       "--steps", args.steps, "--metrics", metrics, "--timeout", 60, *train_flags,
                                       *(["--trace", d / f"{tag}-trace.json"] if trace else [])),
                          cgroup=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=d)
        out, err = train.communicate(timeout=args.train_timeout)
        emu.stop([train])
        (d / f"{tag}-train.txt").write_text(out + err)
        if train.returncode != 0:
            raise RuntimeError(f"{d.name}: training failed ({train.returncode}): {err.strip()[-2000:]}")
        stat1 = [cpu_stat(cg) for cg in emu.cgroups[:n]]
    finally:
        emu.stop(workers)
    return metrics, [{k: b[k] - a.get(k, 0) for k in b} for a, b in zip(stat0, stat1)]


def op_class(name, cat, tid, measured):
    """The class of a trace event: compute kinds by name, else comm / wait / update."""
    kind = name.split()[0]
    if tid == 1:
        return "allreduce-thread" if measured or cat != "update" else "update"
    if measured:
        return kind  # a compute kind, or send, recv, bn_stats, bn_grad, grad_start, grad_wait
    if cat in ("forward", "backward"):
        return kind
    if cat == "tail":
        return "tail_fwd" if name.endswith("forward") else "tail_bwd"
    if cat == "update":
        return "stage/copy" if name.startswith(("stage", "copy")) else "update"
    return cat  # send (the link, not the thread), wait


def op_seconds(path, n, warmup, measured):
    """{device: {class: seconds per step}} of a trace (median step for a measured one)."""
    events = [e for e in json.loads(Path(path).read_text())["traceEvents"] if e.get("ph") == "X"]
    per = [{} for _ in range(n)]
    for e in events:
        step = e.get("args", {}).get("step", 0)
        if step < warmup:
            continue
        key = op_class(e["name"], e.get("cat", ""), e.get("tid", 0), measured)
        per[e["pid"]].setdefault(key, {}).setdefault(step, 0.0)
        per[e["pid"]][key][step] += e["dur"] * 1e-6
    return [{k: round(statistics.median(v.values()), 6) for k, v in sorted(d.items())} for d in per]


# -- the report ---------------------------------------------------------------------------------


def table(results):
    lines = []
    head = (f"{'config':<30} {'ratios':<17} {'measured s':>10} {'predicted s':>11} {'error':>7}  "
            f"{'peak MB measured / predicted per device'}")
    lines += [head, "-" * len(head)]
    for r in results:
        ratios = "/".join(f"{x:.2f}" for x in r["speed_ratios"])
        mem = "  ".join(f"{num(m['peak_bytes'] and m['peak_bytes'] / 1e6, 0, 0)}/{p['peak_bytes'] / 1e6:.0f}"
                        for m, p in zip(r["measured"]["devices"], r["predicted"]["devices"]))
        lines.append(f"{r['name']:<30} {ratios:<17} {r['measured']['step_s']:>10.3f} "
                     f"{r['predicted']['step_s']:>11.3f} {100 * r['error']:>+6.0f}%  {mem}")
    lines.append("")
    head = (f"{'config':<30} {'dev':>3} {'ratio':>6} {'compute s':>10} {'busy s':>8} {'wait s':>8} {'idle s':>8} "
            f"{'cpu s':>8} {'cpu@1 s':>8} {'busy*ratio':>10} {'unmodelled':>10} {'sent MB':>8} {'sim MB':>8} "
            f"{'throttled':>9}")
    lines += ["per device, measured vs simulated: compute_s vs busy_s, wait_s vs idle_s; CPU seconds per step: "
              "cpu s (emulated run), cpu@1 s (the same plan with no quota) vs busy*ratio (the simulator's compute "
              "at full speed); unmodelled = (cpu@1 - busy*ratio) / ratio: the wall seconds at the device's speed of "
              "the CPU work the simulator does not see; bytes sent; throttled: CFS periods that hit the quota",
              head, "-" * len(head)]
    for r in results:
        full = (r["measured"].get("full_speed") or {}).get("devices")
        for i, (m, p) in enumerate(zip(r["measured"]["devices"], r["predicted"]["devices"])):
            ratio = r["speed_ratios"][i]
            lines.append(f"{r['name'] if i == 0 else '':<30} {i:>3} {ratio:>6.3f} {m['compute_s']:>10.3f} "
                         f"{p['busy_s']:>8.3f} {m['wait_s']:>8.3f} {p['idle_s']:>8.3f} {num(m['cpu_s'], 8, 3)} "
                         f"{num(full[i]['cpu_s'] if full else None, 8, 3)} {p['busy_s'] * ratio:>10.3f} "
                         f"{num(unmodelled(full, i, p, ratio), 10, 3)} "
                         f"{m['bytes_sent'] / 1e6:>8.2f} "
                         f"{p['sent_bytes'] / 1e6:>8.2f} {throttled(r, i):>9}")
    return "\n".join(lines)


def unmodelled(full, i, predicted, ratio):
    """Wall seconds at the device's speed of the CPU work per step (with no
    quota) beyond the simulator's compute, or None where unmeasured."""
    if not full or full[i]["cpu_s"] is None:
        return None
    return (full[i]["cpu_s"] - predicted["busy_s"] * ratio) / ratio


def num(x, width, digits):
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def throttled(result, i):
    """The share of CFS periods in which device i hit its quota during the run."""
    t = result["measured"].get("throttling", [{}] * (i + 1))[i]
    return f"{100 * t['nr_throttled'] / t['nr_periods']:.0f}%" if t.get("nr_periods") else "-"


def ops_table(results):
    """Seconds per step by op kind, measured (trace) next to simulated."""
    lines = ["seconds per step by op kind, measured / simulated (compute kinds; the measured send, recv and "
             "collectives include their waits; simulated 'send' is link time, 'wait' idle time)"]
    for r in results:
        if "ops" not in r["measured"]:
            continue
        for i, (m, p) in enumerate(zip(r["measured"]["ops"], r["predicted"]["ops"])):
            keys = sorted(set(m) | set(p))
            cells = [f"{k} {m.get(k, 0):.3f}/{p.get(k, 0):.3f}" if k in m and k in p else
                     f"{k} {m[k]:.3f}/-" if k in m else f"{k} -/{p[k]:.3f}" for k in keys]
            lines.append(f"{r['name'] if i == 0 else '':<30} d{i}: " + ", ".join(cells))
    return "\n".join(lines)


def machine_state():
    load = Path("/proc/loadavg").read_text().split()[:3]
    top = subprocess.run(["ps", "-eo", "pcpu,etimes,args", "--sort=-pcpu", "--no-headers"], capture_output=True,
                         text=True).stdout.splitlines()
    busy = [line.strip()[:160] for line in top if line.strip() and float(line.split()[0]) >= 5.0]
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": load, "busy_processes": busy[:8]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(DEFAULT), help="comma-separated names (see --list)")
    ap.add_argument("--list", action="store_true", help="list the configurations and exit")
    ap.add_argument("--cleanup", action="store_true", help="remove namespaces and cgroups a killed run left")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the medians")
    ap.add_argument("--mbps", type=float, default=94.0, help="every device's link rate, both ways")
    ap.add_argument("--period-us", type=int, default=10000,
                    help="CFS period of the quotas; 0: per device the shortest that gives a 1 ms quota")
    ap.add_argument("--pin", action="store_true", help="also pin device i to CPU i mod ncpu (cpuset)")
    ap.add_argument("--profile", help="this machine's profile (default: measure it with `tilec profile`)")
    ap.add_argument("--no-recheck", dest="recheck", action="store_false",
                    help="skip measuring the speed ratios again after each run")
    ap.add_argument("--no-full-speed", dest="full_speed", action="store_false",
                    help="skip training each plan again without quotas (the CPU seconds a step needs at full speed)")
    ap.add_argument("--train-timeout", type=float, default=900)
    ap.add_argument("--trace", action="store_true", help="trace the runs (tilec train --trace) and compare the "
                    "time per op kind with the simulator's")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--keep", help="keep the plans, cluster files and metrics in this directory")
    ap.add_argument("--emulate", choices=("stretch", "quota"), default="stretch",
                    help="how a device is slowed: its worker sleeps after each compute stage (--emulate-speed), "
                         "or a CFS quota (default stretch; see the module docstring)")
    ap.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--probe-speed", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return probe(float(args.probe[0]), int(args.probe[1]), args.probe_speed)
    if args.list:
        for name, (model, batch, shares, cflags, tflags) in CONFIGS.items():
            print(f"{name:<32} {model:<16} batch {batch:<3} shares {shares}  compile {' '.join(cflags)}"
                  f"{'  (default)' if name in DEFAULT else ''}")
        return 0
    if os.geteuid() != 0:
        raise SystemExit("run as root: network namespaces, tc and cgroups need it")
    if args.cleanup:
        cleanup_leftovers()
        return 0
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; see --list")
    if not CPU_ROOT.is_dir():
        raise SystemExit(f"no cgroup v1 cpu controller at {CPU_ROOT}")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also where a shell started us with SIGINT ignored
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="tilec-emu-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **ONE_THREAD)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    before = machine_state()
    print(f"{before['time']}: load average {' '.join(before['loadavg'])}; busy: {before['busy_processes']}",
          flush=True)
    emu = Emulation(max(len(CONFIGS[c][2]) for c in names), args.mbps, args.period_us, args.pin, env, args.emulate)
    results, failed, profile_used = [], [], None
    try:
        if args.profile:
            profile = str(Path(args.profile).resolve())
        else:
            profile = str(work / "host.json")
            print("measuring this machine's profile (tilec profile) ...", flush=True)
            got = subprocess.run(tilec_cmd("profile", "-o", profile), capture_output=True, text=True, env=env,
                                 timeout=900)
            if got.returncode != 0:
                raise RuntimeError(f"tilec profile failed: {got.stderr.strip()}")
            print("  " + got.stdout.strip().splitlines()[0], flush=True)
        # a stale cached profile must not matter: every tilec here reads this one
        env["TILEC_PROFILE"] = profile
        profile_used = {"from": args.profile or "tilec profile at the start", "data": json.loads(Path(profile).read_text())}
        emu.open()
        emu.reference = min(run_probes(emu, [None], 0.1, 15)[0])
        print(f"speed probe outside any quota: {emu.reference * 1e3:.2f} ms per call (best of 15)", flush=True)
        link = link_test(emu)
        print(f"link d0 -> d1 across the shaped path: {link['latency_ms']:.3f} ms one way, "
              f"{link['bandwidth_mbps']:.1f} Mbit/s (shaped to {args.mbps:g})", flush=True)
        for name in names:
            print(f"{name}: ...", flush=True)
            try:
                results.append(run_config(name, emu, args, work, profile, link))
            except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
                print(f"  failed: {exc}", flush=True)
                failed.append({"name": name, "error": str(exc)})
                continue
        print(f"speed probe: best {emu.reference * 1e3:.2f} ms per call outside any quota over the run; predicting",
              flush=True)
        for r in results:
            predict(r, emu, args, profile, link)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        return 130
    finally:
        emu.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    after = machine_state()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"before": before, "after": after, "cpu_count": os.cpu_count(),
                                   "node": platform.node()},
                       "settings": {"emulate": args.emulate, "mbps": args.mbps, "period_us": args.period_us,
                                    "pin": args.pin,
                                    "steps": args.steps, "warmup": args.warmup, "probe_reference_s": emu.reference},
                       "link": link, "profile": profile_used, "results": results, "failed": failed}, f, indent=1)
    print()
    slowed = ("compute stretched by sleeps (--emulate-speed)" if args.emulate == "stretch"
              else f"CFS quotas, period {args.period_us} us")
    print(f"emulated cluster: {args.mbps:g} Mbit/s links (tbf, both ways), {slowed}, "
          f"{args.steps} steps, medians over steps {args.warmup + 1}-{args.steps}; {platform.node()}, "
          f"{os.cpu_count()} cores")
    print(f"link latency {link['latency_ms']:.3f} ms, TCP throughput {link['bandwidth_mbps']:.1f} Mbit/s; "
          f"load average {' '.join(before['loadavg'])} at {before['time']}, {' '.join(after['loadavg'])} at "
          f"{after['time']}")
    print(table(results))
    for f in failed:
        print(f"{f['name']}: FAILED: {f['error']}")
    if args.trace:
        print()
        print(ops_table(results))
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
