"""``Comm`` over a full mesh of TCP connections, for one device of a plan.

Tags of the executor become frame headers (``encode``), and the plan's
schedule says which frames each peer may send this device (``frame_table``):
the messages it receives with their exact shapes, the batch-norm
all-gathers it joins and the weight-gradient all-reduces of its buckets. A frame outside
the table, of another shape, for a step other than this one or the next,
or a second copy of one, ends the job (``FrameError``) before anything is
allocated for it.

Every wait has the receive timeout. The first fault of any link (closed,
broken, invalid, or an ABORT relaying another device's fault) wakes every
wait and surfaces as ``PeerLost`` with a one-line message that names the
device and the step.
"""
import queue
import time

import numpy as np

from tilec_runtime import collectives, shards
from tilec_runtime.auth import handshake
from tilec_runtime.comm import Comm, PeerLost, Sent
from tilec_runtime.errors import ProgramError
from tilec_runtime.program import members_of, message_shape, param_shapes
from tilec_runtime.transport import (FrameError, Kind, Link, Lost, Mailbox, Silent, Spec, as_bytes,
                                     await_frame, connect, heartbeat_interval, kind_name, send_frame, text_spec)

F64 = np.dtype("float64")
LAUNCHER = -1  # the peer id of the launcher's connection in a worker's mailbox
MAX_GROUPS = 1 << 15
MAX_MEMBERS = 1 << 8
_PHASE = {"f": Kind.FWD, "b": Kind.BWD, "bn": Kind.BN, "bng": Kind.BNG, "g": Kind.GRAD,
          "rs": Kind.RING_RS, "ag": Kind.RING_AG, "c": Kind.CHAN, "crs": Kind.CHAN_RS, "cag": Kind.CHAN_AG}


def param_index(program):
    """{key: index} of every trainable parameter, sorted by key."""
    keys = sorted(k for layer in program for k in param_shapes(layer))
    return {k: i for i, k in enumerate(keys)}


def ring_id(key_index, chunk):
    return key_index << 8 | chunk


def _allreduce_frames(table, rank, members, dtype, shape, ring, ident, kinds, gather_id):
    """Into ``table``: the frames ``rank`` receives in an all-reduce of
    ``shape`` over ``members``: with ``ring`` the chunks
    collectives.ring_allreduce takes from the predecessor (tensor ids
    ``ring_id(ident, chunk)``), else every other member's whole array
    (``gather_id``). ``kinds``: (reduce-scatter, all-gather, gather)."""
    n, p = len(members), members.index(rank)
    if ring:
        lengths = collectives.ring_chunks(shape, n)
        pred = members[(p - 1) % n]
        for s in range(n - 1):
            rs, ag = (p - s - 1) % n, (p - s) % n
            table[(pred, kinds[0], ring_id(ident, rs))] = Spec(dtype, (lengths[rs],))
            table[(pred, kinds[1], ring_id(ident, ag))] = Spec(dtype, (lengths[ag],))
    else:
        for d in members:
            if d != rank:
                table[(d, kinds[2], gather_id)] = Spec(dtype, tuple(shape))


def frame_table(plan, rank):
    """{(sender, kind, tensor id): Spec} of every frame ``rank`` may receive,
    read off its schedule: the messages it receives, the batch-norm
    all-gathers it joins and the gradient buckets it is a member of."""
    program, dtype, batch = plan["program"], np.dtype(plan["dtype"]), plan["batch"]
    messages, groups = plan["messages"], plan["groups"]
    keys = param_index(program)
    table = {}
    for op in plan["schedule"][rank]:
        kind = op["op"]
        if kind == "recv":
            m = messages[op["msg"]]
            if m["sender"] == rank:
                continue
            table[(m["sender"], Kind.FWD if m["phase"] == "forward" else Kind.BWD, op["msg"])] = Spec(
                dtype, message_shape(program, m, batch))
        elif kind in ("bn_stats", "bn_grad"):
            c = program[op["layer"]]["filters"]
            spec = Spec(F64, (1 + 2 * c,) if kind == "bn_stats" else (2 * c,))
            for d in members_of(groups[op["group"]]):
                if d != rank:
                    table[(d, Kind.BN if kind == "bn_stats" else Kind.BNG, op["layer"])] = spec
        elif kind == "chan_reduce":
            ident, shape, members, ring = shards.op_reduce(plan, op)
            _allreduce_frames(table, rank, members, dtype, shape, ring, ident,
                              (Kind.CHAN_RS, Kind.CHAN_AG, Kind.CHAN), ident)
        elif kind == "grad_start":
            bucket = plan["buckets"][op["bucket"]]
            shapes = {k: s for i in range(len(program)) for k, s in param_shapes(program[i]).items()}
            for key, algorithm in bucket["reduce"].items():
                _allreduce_frames(table, rank, bucket["members"], dtype, shapes[key], algorithm == "ring", keys[key],
                                  (Kind.RING_RS, Kind.RING_AG, Kind.GRAD), ring_id(keys[key], 0))
    return table


def check_limits(plan):
    """Plans this wire format can carry (ids are packed into 32 bits)."""
    if len(plan["groups"]) >= MAX_GROUPS or len(plan["program"]) >= 1 << 16:
        raise ProgramError(f"plan too large for the socket runtime: {len(plan['groups'])} groups, "
                           f"{len(plan['program'])} layers")
    if len(plan["devices"]) > MAX_MEMBERS:
        raise ProgramError(f"the socket runtime supports at most {MAX_MEMBERS} devices")


class SocketComm(Comm):
    """One device's ``Comm`` over sockets to every peer (``socks``: {rank:
    socket}), plus optionally the launcher's connection (``launcher``: a
    socket, an ``expect`` for what the launcher may send and an ``on_frame``
    for the frames it handles itself)."""

    def __init__(self, plan, rank, socks, timeout, launcher=None):
        super().__init__(rank, len(plan["devices"]), timeout)
        check_limits(plan)
        self.names = [d["name"] for d in plan["devices"]]
        self.table = frame_table(plan, rank)
        self.phases = {k: Kind.FWD if m["phase"] == "forward" else Kind.BWD for k, m in enumerate(plan["messages"])}
        self.keys = param_index(plan["program"])
        self.mailbox = Mailbox()
        self.step = 0  # the training step (1-based) that messages name
        self.step_no = 0  # the latest executor step number in a tag
        beat = heartbeat_interval(timeout)
        self.links = {peer: Link(sock, peer, self.mailbox, self._expect_from(peer), heartbeat=beat)
                      for peer, sock in socks.items()}
        if launcher is not None:
            sock, expect, on_frame = launcher
            self.links[LAUNCHER] = Link(sock, LAUNCHER, self.mailbox, expect, on_frame=on_frame, heartbeat=beat)

    def describe(self, peer):
        return "the launcher" if peer == LAUNCHER else f"device {peer} ({self.names[peer]})"

    # -- the plan's frames ---------------------------------------------------------

    def encode(self, tag):
        """(kind, step, tensor id) of an executor tag: (step, "m", message),
        (step, "bn" | "bng", layer), (step, "g", key) or (step, "rs" | "ag", key, chunk)."""
        step, phase = tag[0], tag[1]
        if phase == "m":
            return self.phases[tag[2]], step, tag[2]
        kind = _PHASE[phase]
        if kind in (Kind.BN, Kind.BNG, Kind.CHAN):
            return kind, step, tag[2]
        if kind in (Kind.CHAN_RS, Kind.CHAN_AG):
            return kind, step, ring_id(tag[2], tag[3])
        return kind, step, ring_id(self.keys[tag[2]], tag[3] if len(tag) > 3 else 0)

    def _expect_from(self, peer):
        seen = {}  # step -> {(kind, tensor)} received, for the current and the next step

        def expect(kind, step, tensor):
            spec = self.table.get((peer, kind, tensor))
            if spec is None:
                raise FrameError(f"{kind_name(kind)} tensor {tensor} is not in the plan from device {peer} "
                                 f"to device {self.rank}")
            now = self.step_no
            if not now <= step <= now + 1:
                raise FrameError(f"{kind_name(kind)} frame for step {step} while at step {now}")
            for old in [s for s in seen if s < now]:
                del seen[old]
            got = seen.setdefault(step, set())
            if (kind, tensor) in got:
                raise FrameError(f"second {kind_name(kind)} frame for tensor {tensor} in step {step}")
            got.add((kind, tensor))
            return spec
        return expect

    # -- Comm ------------------------------------------------------------------------

    def _send(self, dest, tag, array):
        kind, step, tensor = self.encode(tag)
        self.step_no = max(self.step_no, step)
        if dest == self.rank:
            self.mailbox.put((dest, kind, step, tensor), array.copy())
            return None
        left = self.links[dest].send(kind, step, tensor, array)
        return None if left is None else Sent(left)  # (None: gone already, ``Comm.send``'s SENT)

    def _recv(self, src, tag):
        kind, step, tensor = self.encode(tag)
        self.step_no = max(self.step_no, step)
        return self.wait((src, kind, step, tensor), src, lambda: f"{kind.name} {tag[2:]}")

    def wait(self, key, src, what):
        """The frame filed under ``key``, or PeerLost naming who and when."""
        try:
            if src == self.rank:
                return self.mailbox.get(key, 0)  # sent to itself earlier in the step
            return await_frame(self.mailbox, list(self.links.values()), key, self.timeout)
        except Silent as exc:
            waiting = f", waiting for {what()}" if exc.peer == src else ""
            raise PeerLost(f"{self.describe(exc.peer)} sent nothing for {exc.seconds:.0f} s at step {self.step} "
                           f"(stopped, hung or cut off{waiting})") from None
        except TimeoutError:
            raise PeerLost(f"device {self.rank} has no message {what()} from itself") from None
        except Lost as exc:
            raise self.lost(exc.fault) from None

    def lost(self, fault):
        if fault.relayed:
            return PeerLost(fault.reason)
        return PeerLost(f"{self.describe(fault.peer)} lost at step {self.step} ({fault.reason})")

    # -- ending ----------------------------------------------------------------------

    def close(self, error=None):
        """Leave the mesh: when all went well, after a BYE from every peer
        and the launcher (so nobody takes a closing connection for a fault,
        and no socket closes with unread data, which would reset it); or at
        once after telling every peer why (ABORT) when ``error`` is given."""
        peers = [p for p in self.links if p != LAUNCHER]
        grace = max(10.0, self.timeout)
        if error is None:
            for p in peers:
                self.links[p].send(Kind.BYE, 0, 0)
            self.mailbox.wait_left(list(self.links), grace)
        else:
            for p in peers:
                self.links[p].send(Kind.ABORT, 0, 0, as_bytes(error[:4000]))
        for link in self.links.values():
            link.close(grace if error is None else 2.0)


# -- making the mesh ---------------------------------------------------------------


def open_mesh(rank, addresses, key, plan_hash, job, accepted, deadline):
    """Sockets to every other device of a job: this device connects to the
    lower ranks and is connected to by the higher ones (``accepted``: a
    queue of (rank, channel) filled by the worker's accept loop).
    Returns {rank: channel}: authenticated connections (``transport.Channel``)."""
    socks = {}
    try:
        for j in range(rank):
            sock = connect(tuple(addresses[j]), deadline, what=f"device {j}")
            sock.settimeout(max(1.0, deadline - time.monotonic()))
            channel = handshake(sock, key, role="peer", ident=str(rank), plan=plan_hash, initiator=True).channel
            send_frame(channel, Kind.PEER, 0, 0, as_bytes({"job": job, "rank": rank}))
            socks[j] = channel
        while len(socks) < len(addresses) - 1:
            try:
                j, sock = accepted.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                missing = [j for j in range(rank + 1, len(addresses)) if j not in socks]
                raise PeerLost(f"device {missing[0]} did not connect to device {rank}") from None
            if j <= rank or j in socks:
                sock.close()
                continue
            socks[j] = sock
        return socks
    except BaseException:
        for sock in socks.values():
            sock.close()
        raise


PEER_SPEC = {Kind.PEER: text_spec(256)}


def socketpair_mesh(plan, timeout):
    """``SocketComm``s of every rank of ``plan`` in this process, joined by
    socket pairs: the real framing, validation and collectives without
    processes or ports (what ``InProcessHub`` is to threads)."""
    import socket
    n = len(plan["devices"])
    socks = [{} for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            socks[i][j], socks[j][i] = socket.socketpair()
    return [SocketComm(plan, r, socks[r], timeout) for r in range(n)]
