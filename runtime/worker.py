"""A worker: one device's process, serving jobs from a launcher.

``python -m tilec_runtime.worker --listen HOST:PORT`` (or ``tilec worker``)
binds to the address it is told (loopback by default), prints
``tilec worker listening on HOST:PORT``, and serves one job at a time. Every
connection first passes the HMAC handshake (``auth.py``); a client without
the key is refused and the worker goes on serving. A job, all frames on the
launcher's connection::

    launcher -> worker   JOB    JSON: job id, rank, peers, steps, timeout, plan,
                                and the generated kernels' C source (built
                                here, into the build cache, on first use)
    launcher -> worker   STATE  the parameters, buffers (and momentum) this
                                rank computes with, in ``state_table`` order
    worker -> launcher   READY  (or ERROR: the plan or state was refused)
    launcher -> worker   GO     every worker is ready: open the mesh
    launcher -> worker   BATCH  its pieces of the image, and its part of the labels/targets (where it
                                computes the loss or a part of it), of each step
    worker -> launcher   METRICS  per step: its part of the loss (if any), compute, wait,
                                bytes sent, peak memory
    worker -> launcher   STATE  at checkpoint steps and at the end: the
                                state this rank is the lowest holder of
    worker -> launcher   DONE

A fault ends the job on every worker: the first one to see it sends its
one-line report to the launcher (ERROR) and to its peers (ABORT), who
relay the same line. ``--once`` exits after one job, with status 1 if it
failed (what the local launcher uses).
"""
import argparse
import os
import queue
import socket
import sys
import threading
import time

import numpy as np

from tilec_runtime import pages, planfile
from tilec_runtime.auth import AuthError, handshake, load_key
from tilec_runtime.comm import PeerLost
from tilec_runtime.data import target_shape
from tilec_runtime.emulate import add_emulate_argument
from tilec_runtime.errors import Diverged, ProgramError, RuntimeFault, check_loss
from tilec_runtime.executor import BATCHES_AHEAD, RankExecutor, input_messages
from tilec_runtime.executor import holdings as holdings_of
from tilec_runtime.imagefile import ImagePieces
from tilec_runtime.program import buffer_shapes, param_shapes
from tilec_runtime.shards import target_part
from tilec_runtime.socketcomm import LAUNCHER, PEER_SPEC, SocketComm, open_mesh
from tilec_runtime.trace import step_events
from tilec_runtime.transport import (BYTES, EMPTY, ConnectionClosed, FrameError, Kind, Spec, Stopped, as_bytes,
                                     kind_name,
                                     parse_address, read_expected, read_frame, send_frame, tune)

MAX_JOB_BYTES = 64 << 20
MAX_METRICS_BYTES = 4 << 20  # a step's trace rides along when asked for
HANDSHAKE_TIMEOUT = 10.0
SETUP_TIMEOUT = 120.0
BUILD_TIMEOUT = 1800.0  # a first build of the kernels from C, on a slow device
MAX_PENDING = 32  # connections being authenticated or served at once
LISTENING = "tilec worker listening on"
SWITCH_INTERVAL = 2e-4  # seconds (see ``run``)
PEER_KINDS = (Kind.FWD, Kind.BWD, Kind.BN, Kind.BNG, Kind.GRAD, Kind.RING_RS, Kind.RING_AG, Kind.CHAN, Kind.CHAN_RS,
              Kind.CHAN_AG)


# -- what each rank holds -------------------------------------------------------------


def state_table(program):
    """[(section, key, shape)]: the tensor ids of STATE frames."""
    params = sorted((k, s) for layer in program for k, s in param_shapes(layer).items())
    buffers = sorted((k, s) for layer in program for k, s in buffer_shapes(layer).items())
    return ([("param", k, tuple(s)) for k, s in params] + [("buffer", k, tuple(s)) for k, s in buffers]
            + [("momentum", k, tuple(s)) for k, s in params])


def has_momentum(plan):
    return plan["optimizer"].get("momentum", 0) > 0


def pieces(plan, rank):
    """{state index: None (the whole array) or (axis, start, stop) (a slice
    of a layer split by channels)} of what ``rank`` holds."""
    params, buffers = holdings_of(plan, rank)
    out = {}
    for i, (section, key, _) in enumerate(state_table(plan["program"])):
        held = buffers if section == "buffer" else params
        if key in held:
            out[i] = held[key]
    return out


def holdings(plan, rank, momentum):
    """Indices into ``state_table`` of what ``rank`` holds (all or a slice of)."""
    table = state_table(plan["program"])
    return [i for i in pieces(plan, rank) if momentum or table[i][0] != "momentum"]


def owned(plan, rank, momentum):
    """Indices of the state ``rank`` reports: its slices, and the whole
    arrays no lower rank holds too (replicas are bit-identical, so the
    lowest holder speaks for all)."""
    mine = pieces(plan, rank)
    lower = set()
    for r in range(rank):
        lower.update(i for i, piece in pieces(plan, r).items() if piece is None)
    return [i for i in holdings(plan, rank, momentum) if mine[i] is not None or i not in lower]


def piece_shape(shape, piece):
    if piece is None:
        return tuple(shape)
    axis, start, stop = piece
    shape = list(shape)
    shape[axis] = stop - start
    return tuple(shape)


TARGET = 0  # BATCH frames: a rank's part of the labels/targets (``shards.target_part``), then the image's pieces
FIRST_PIECE = 1


def batch_specs(plan, rank, local=False):
    """{tensor: Spec} of the BATCH frames ``rank`` takes each step: its
    part of the labels/targets where it computes the loss or a part of it
    (``shards.target_part``) and its pieces of the image (``input_messages``);
    where it reads its pieces itself (``local``, ``tilec_runtime.imagefile``),
    the targets, or for a rank without any an empty frame (the step's go)."""
    program, dtype, batch = plan["program"], np.dtype(plan["dtype"]), plan["batch"]
    if local:
        specs = {TARGET: EMPTY}
    else:
        specs = {FIRST_PIECE + j: Spec(dtype, shape) for j, (_, shape) in enumerate(input_messages(plan, rank))}
    part = target_part(plan, rank)
    if part is not None:
        shape = list(target_shape(program))
        if part != "all":
            shape[0] = part[1] - part[0]
        specs[TARGET] = (Spec(np.dtype("int64"), (batch,)) if program[-1]["kind"] == "softmax"
                         else Spec(dtype, (batch, *shape)))
    return specs


def state_spec(plan, index, piece):
    """What a STATE frame of ``index`` carries: the sender's slice ``piece``
    of it (``pieces``), or the whole array (None)."""
    shape = state_table(plan["program"])[index][2]
    return Spec(np.dtype(plan["dtype"]), piece_shape(shape, piece))


# -- memory ---------------------------------------------------------------------------


def reset_peak():
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes():
    """Peak resident memory since ``reset_peak`` (else since start)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- one job ----------------------------------------------------------------------------


class JobError(RuntimeFault):
    """A job could not start (bad plan or state); reported to the launcher."""


def parse_job(job):
    try:
        plan = planfile.validate(job["plan"])
        rank, peers = job["rank"], job["peers"]
        if not (isinstance(rank, int) and 0 <= rank < len(plan["devices"])):
            raise JobError(f"rank {rank!r} is not a device of the plan")
        if len(peers) != len(plan["devices"]) or not all(isinstance(p, list) and len(p) == 2 for p in peers):
            raise JobError(f"{len(peers)} peer addresses for {len(plan['devices'])} devices")
        for key in ("first_step", "steps", "state_every"):
            if not (isinstance(job[key], int) and job[key] >= 0):
                raise JobError(f"job field {key!r} must be a non-negative integer")
        if not (isinstance(job["timeout"], (int, float)) and job["timeout"] > 0):
            raise JobError("job field 'timeout' must be positive")
        source = job.get("kernel_source")
        if not (isinstance(source, dict) and isinstance(source.get("source"), str)
                and isinstance(source.get("module"), str) and source["module"].isidentifier()):
            raise JobError("job field 'kernel_source' must be {module: a name, source: C text}")
        threads = job.get("threads")
        if threads is not None and not (isinstance(threads, int) and threads >= 1):
            raise JobError("job field 'threads' must be a positive integer")
        if not isinstance(job.get("trace", False), bool):
            raise JobError("job field 'trace' must be true or false")
        schedule = job.get("lr", [])
        if not (isinstance(schedule, list) and all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and isinstance(p[1], (int, float))
                and p[1] > 0 for p in schedule)):
            raise JobError("job field 'lr' must be [[step, learning rate], ...]")
        data = job.get("data")
        if data is not None and not (isinstance(data, dict) and isinstance(data.get("images"), str)):
            raise JobError("job field 'data' must be {images: a path}")
        return plan
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise JobError(f"malformed job ({exc!r})") from None
    except ProgramError as exc:
        raise JobError(f"bad plan: {exc}") from None


def receive_state(conn, plan, wanted, rank):
    """{section: {key: array}} from the STATE frames listed in ``wanted`` (``rank``'s slices)."""
    table, held = state_table(plan["program"]), pieces(plan, rank)
    state = {"param": {}, "buffer": {}, "momentum": {}}
    for index in wanted:
        def expect(kind, step, tensor, index=index):
            if kind != Kind.STATE or tensor != index:
                raise FrameError(f"expected STATE {index}, got {kind_name(kind)} {tensor}")
            return state_spec(plan, index, held.get(index))
        frame = read_frame(conn, expect)
        section, key, _ = table[index]
        state[section][key] = frame.array
    return state


def state_steps(first, last, every):
    """Steps (counted in completed steps) after which the state is reported."""
    steps = set(range(first + every, last + 1, every)) if every else set()
    return steps | {last}


class Job:
    def __init__(self, server, conn, job):
        self.server, self.conn, self.job = server, conn, job
        self.plan = parse_job(job)
        self.rank = job["rank"]
        self.name = self.plan["devices"][self.rank]["name"]
        self.id = str(job["job"])
        self.hash = self.plan["hash"]
        self.accepted = queue.Queue()
        self.comm = None
        self.images = None  # the image file the pieces are read from (``imagefile``), or None: sent
        self.landing = None  # where they are read to (``RankExecutor.input_views``, once it exists)
        self.current = job["first_step"]  # the step in progress (0-based)
        self.stop_after = None  # a STOP from the launcher: end after this many steps
        self.reported = owned(self.plan, self.rank, has_momentum(self.plan))

    def run(self):
        """Returns None, or the one-line error that ended the job."""
        plan, job, rank = self.plan, self.job, self.rank
        step = job["first_step"]
        try:
            momentum = bool(job.get("momentum")) and has_momentum(plan)
            state = receive_state(self.conn, plan, holdings(plan, rank, momentum), rank)
            if job.get("data") is not None:
                self.images = ImagePieces(job["data"], plan, input_messages(plan, rank))
            module = self._build_kernels()
            job.pop("kernel_source", None)  # built: the source may go
            send_frame(self.conn, Kind.READY, 0, 0)
            read_expected(self.conn, {Kind.GO: EMPTY})
            deadline = time.monotonic() + SETUP_TIMEOUT
            socks = open_mesh(rank, job["peers"], self.server.key, self.hash, self.id, self.accepted, deadline)
            self.comm = comm = SocketComm(plan, rank, socks, float(job["timeout"]),
                                          launcher=(self.conn, self._launcher_expect(), self._on_launcher_frame))
            comm.step = step + 1
            comm.stepping_thread = threading.get_ident()
            dev = self.executor = RankExecutor(plan, rank, comm, module, state["param"], state["buffer"],
                                               state["momentum"] if momentum else None,
                                               threads=job.get("threads"), trace=bool(job.get("trace")),
                                               stretch=self.server.stretch)
            del state
            if self.images is not None:
                self.landing = dev.input_views()
            last = step + job["steps"]
            reports = state_steps(step, last, job["state_every"])
            launcher = comm.links[LAUNCHER]
            lr_changes = sorted(job.get("lr", []))
            for step in range(step, last):
                self.current, comm.step = step, step + 1
                for at, lr in lr_changes:
                    if at <= step:
                        dev.lr = float(lr)
                reset_peak()
                sent0, cpu0 = comm.bytes_sent, time.process_time()
                batch = None
                if self.stop_after is None or step < self.stop_after:
                    batch = self._batch(step)
                t0, wall0, wait0 = time.perf_counter(), time.time(), comm.wait_s  # (not the wait for data)
                if dev.events is not None:
                    dev.events.clear()
                    dev.reducer.events.clear()
                try:
                    if self.stop_after is not None and step >= self.stop_after:
                        raise Stopped("stopped")
                    if batch is None:
                        raise Stopped("no batch")
                    loss = dev.step(target=batch[0], inputs=batch[1])
                except Stopped:
                    if self.stop_after is None or step < self.stop_after:
                        raise
                    last = step  # the launcher stopped the job: this step never started anywhere
                    if step not in reports:
                        self._report_state(dev, step)
                    break
                check_loss(step, loss)
                seconds = time.perf_counter() - t0
                wait = comm.wait_s - wait0
                record = {"step": step, "device": rank, "name": self.name,
                          "loss": None if loss is None else float(loss), "step_s": seconds,
                          "compute_s": seconds - wait, "wait_s": wait, "cpu_s": time.process_time() - cpu0,
                          "bytes_sent": comm.bytes_sent - sent0, "peak_bytes": peak_bytes(),
                          "threads": dev.threads}
                if dev.events is not None:
                    record["trace"] = step_events(dev.events, dev.reducer.events, plan["messages"], t0)
                    record["start"] = wall0
                launcher.send(Kind.METRICS, step, 0, as_bytes(record))
                if step + 1 in reports:
                    self._report_state(dev, step + 1)
            launcher.send(Kind.DONE, last, 0)
            comm.close()
            return None
        except Exception as exc:  # noqa: BLE001 - every failure becomes the one-line report
            message = self._message(exc, step)
            if self.comm is not None:
                self.comm.links[LAUNCHER].send(Kind.ERROR, 0, 0, as_bytes(message[:4000]))
                self.comm.close(error=message)
            else:
                try:
                    send_frame(self.conn, Kind.ERROR, 0, 0, as_bytes(message[:4000]))
                except OSError:
                    pass
            return message
        finally:
            if self.images is not None:
                self.images.close()

    def _build_kernels(self):
        """The generated kernels the launcher sent (as C), built here into
        the build cache on first use, and loaded."""
        from tilec_runtime.native import build_and_load
        spec = self.job["kernel_source"]
        module, _ = build_and_load(spec["source"], spec["module"])
        return module

    def _message(self, exc, step):
        if isinstance(exc, PeerLost):
            return str(exc)
        if isinstance(exc, (ConnectionClosed, FrameError, OSError)) and self.comm is None:
            return f"device {self.rank} ({self.name}): the launcher's connection failed before training ({exc})"
        if isinstance(exc, Diverged):  # its message names the step
            return f"device {self.rank} ({self.name}): {exc}"
        where = f"device {self.rank} ({self.name}) failed at step {step + 1}"
        if isinstance(exc, RuntimeFault):
            return f"{where}: {exc}"
        return f"{where}: {type(exc).__name__}: {exc}"

    def _on_launcher_frame(self, link, frame):
        """A STOP ends the job after ``frame.step`` steps: waits for later
        steps' frames (a peer that stopped will not send them) end at once."""
        if frame.kind != Kind.STOP:
            return False
        self.stop_after = frame.step
        mailbox = self.comm.mailbox
        for tensor in self.batch_specs:  # no batch is coming
            mailbox.put((LAUNCHER, Kind.BATCH, frame.step, tensor), None)
        first = self.job["first_step"]
        mailbox.stop(frame.step - first + 1, PEER_KINDS)  # the executor counts its steps from 1
        return True

    def _batch(self, step):
        """(target or None, {message id: piece of the image}) of ``step`` from
        the launcher (``batch_specs``), or None if the job stopped before it."""
        out = {}
        for tensor in self.batch_specs:
            array = self.comm.wait((LAUNCHER, Kind.BATCH, step, tensor), LAUNCHER, lambda: "its batch")
            if array is None:
                return None
            out[tensor] = array
        if self.images is not None:
            return (out[TARGET] if self.batch_specs[TARGET] is not EMPTY else None), self.images.read(step, self.landing)
        return out.get(TARGET), {k: out[FIRST_PIECE + j] for j, k in enumerate(self.piece_ids)}

    def _launcher_expect(self):
        """What the launcher may send during training: batches, and STOP."""
        specs = self.batch_specs = batch_specs(self.plan, self.rank, self.images is not None)
        self.piece_ids = [k for k, _ in input_messages(self.plan, self.rank)]  # BATCH frame FIRST_PIECE + j: piece j
        seen = set()

        def expect(kind, step, tensor):
            if kind == Kind.STOP:
                return EMPTY
            if kind != Kind.BATCH or tensor not in specs:
                raise FrameError(f"the launcher may not send {kind_name(kind)} {tensor} to device {self.rank}")
            now = self.current
            if not now <= step <= now + BATCHES_AHEAD or (step, tensor) in seen:
                raise FrameError(f"BATCH {tensor} for step {step} while at step {now}")
            seen.add((step, tensor))
            return specs[tensor]
        return expect

    def _report_state(self, dev, step):
        table = state_table(self.plan["program"])
        launcher = self.comm.links[LAUNCHER]
        for index in self.reported:
            section, key, shape = table[index]
            if section == "param":
                array = dev.params[key]
            elif section == "buffer":
                array = dev.buffers[key]
            else:
                array = dev.velocity[key]
            # copied: the next step updates parameters in place while this queues
            launcher.send(Kind.STATE, step, index, array.copy())


# -- the server -------------------------------------------------------------------------


class Server:
    """Accepts connections; runs one job at a time."""

    def __init__(self, listen, key, once=False, log=None, stretch=None):
        host, port = parse_address(listen)
        self.key, self.once = key, once
        self.stretch = stretch  # a tilec_runtime.emulate.Stretch: compute slowed (an emulated device), or None
        self.log = log or sys.stderr
        self.sock = socket.create_server((host, port))
        self.address = self.sock.getsockname()[:2]
        self.ident = f"{self.address[0]}:{self.address[1]}"
        self.lock = threading.Lock()
        self.job = None
        self.done = threading.Event()
        self.status = 0
        self.slots = threading.BoundedSemaphore(MAX_PENDING)

    def say(self, line):
        print(f"tilec worker {self.ident}: {line}", file=self.log, flush=True)

    def serve(self, parent=None):
        """Accept until ``--once`` finished a job (or forever). Returns the exit status."""
        self.sock.settimeout(0.5)
        try:
            while not self.done.is_set():
                if parent is not None and os.getppid() != parent:
                    self.say("the launching process is gone; exiting")
                    return 1
                try:
                    conn, addr = self.sock.accept()
                except socket.timeout:
                    continue
                except OSError:
                    if self.done.is_set():
                        break  # woken by finish()
                    raise
                if not self.slots.acquire(blocking=False):
                    conn.close()
                    continue
                threading.Thread(target=self._handle, args=(conn, addr), daemon=True).start()
            return self.status
        finally:
            self.sock.close()

    def _handle(self, conn, addr):
        keep = False
        try:
            tune(conn)
            conn.settimeout(HANDSHAKE_TIMEOUT)
            with self.lock:
                plan_hash = self.job.hash if self.job else ""
            hello = handshake(conn, self.key, role="worker", ident=self.ident, plan=plan_hash, initiator=False)
            conn = hello.channel  # every frame from here on is authenticated
            frame = read_expected(conn, {Kind.JOB: Spec(BYTES, (MAX_JOB_BYTES,), True), **PEER_SPEC})
            if frame.kind == Kind.PEER and hello["role"] == "peer":
                keep = self._join(conn, frame.json())
            elif frame.kind == Kind.PEER:
                self.say(f"refused {addr[0]}:{addr[1]}: a {hello['role']} may not join a job")
            elif hello["role"] != "launcher":
                self.say(f"refused {addr[0]}:{addr[1]}: a {hello['role']} may not start a job")
            else:
                spec = frame.json()
                del frame  # the raw JOB bytes (the kernels' C source among them) are not needed any more
                self._run(conn, spec)
        except (AuthError, FrameError, ConnectionClosed, OSError) as exc:
            self.say(f"refused {addr[0]}:{addr[1]}: {exc}")
        except Exception as exc:  # noqa: BLE001 - never let a connection take the server down
            self.say(f"dropped {addr[0]}:{addr[1]}: {type(exc).__name__}: {exc}")
        finally:
            if not keep:
                conn.close()
            self.slots.release()

    def _join(self, conn, hello):
        """A peer of the running job connected: hand its socket to the job."""
        with self.lock:
            job = self.job
        if not (isinstance(hello, dict) and job is not None and hello.get("job") == job.id
                and isinstance(hello.get("rank"), int)):
            self.say("refused a peer connection for another job")
            return False
        job.accepted.put((hello["rank"], conn))
        return True

    def _run(self, conn, spec):
        conn.settimeout(SETUP_TIMEOUT)
        try:
            job = Job(self, conn, spec)
        except JobError as exc:
            send_frame(conn, Kind.ERROR, 0, 0, as_bytes(str(exc)))
            self.say(f"refused a job: {exc}")
            return
        with self.lock:
            if self.job is not None:
                send_frame(conn, Kind.ERROR, 0, 0, as_bytes(f"worker {self.ident} is busy with another job"))
                return
            self.job = job
        if not self.once:
            first, steps = spec["first_step"], spec["steps"]
            self.say(f"job {job.id}: device {job.rank} ({job.name}) of {len(job.plan['devices'])}, plan "
                     f"{job.hash[:12]}, steps {first + 1}-{first + steps}")
        try:
            error = job.run()
        finally:
            with self.lock:
                self.job = None
        if error:
            print(f"tilec worker: error: {error}", file=self.log, flush=True)
        elif not self.once:
            self.say(f"job {job.id}: done")
        if self.once:
            self.status = 1 if error else 0
            self.done.set()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept() now, not at its next timeout
            except OSError:
                pass


def die_with_parent():
    """Ask Linux to kill this process when its parent dies (local workers)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def add_arguments(p):
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="address to bind (default 127.0.0.1 and a free port)")
    p.add_argument("--key-file", metavar="FILE", help="the cluster key (default: $TILEC_KEY)")
    p.add_argument("--once", action="store_true", help="exit after one job (status 1 if it failed)")
    p.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    add_emulate_argument(p)


def run(args):
    key = load_key(args.key_file)
    if args.parent is not None:
        die_with_parent()
    pages.fix_mmap_threshold()
    # A frame's reader and sender threads need the GIL for a moment: by default a thread running Python
    # may keep it 5 ms, which a barrier (a batch-norm all-gather, a halo) waits out every time.
    sys.setswitchinterval(SWITCH_INTERVAL)
    server = Server(args.listen, key, once=args.once, stretch=args.stretch)
    print(f"{LISTENING} {server.address[0]}:{server.address[1]}", flush=True)
    return server.serve(parent=args.parent)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tilec_runtime.worker", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except RuntimeFault as exc:
        print(f"tilec worker: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
