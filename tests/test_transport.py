"""The wire: frames round-trip, every header field is checked against the
plan before a byte of payload is allocated, fuzzed and truncated input
only ever raises FrameError / ConnectionClosed, the frame table covers
exactly the messages the executor sends, and the ring all-reduce is exact
and bit-identical on every member."""
import os
import socket
import struct
import threading
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from built import module
from programs import ProgramBuilder
from tilec.plan.build import build_plan, default_grid, even_choices
from tilec_runtime import collectives, comm, inprocess, weights
from tilec_runtime.comm import PeerLost
from tilec_runtime.data import generated_batches
from tilec_runtime.socketcomm import SocketComm, frame_table, socketpair_mesh
from tilec_runtime.transport import (HEADER, MAGIC, READ_AHEAD, TAG_BYTES, VERSION, Channel, ConnectionClosed, FrameError, Kind,
                                     Spec, frame_pieces, header, read_frame, send_frame)

OPT = {"lr": 0.01, "momentum": 0.9, "decay": 5e-4}


def frame_bytes(sock, kind, step, tensor, array=None):
    """A frame whole, as one bytes object (its pieces joined)."""
    return b"".join(b"".join(parts) for parts in frame_pieces(sock, kind, step, tensor, array))


def small_program():
    b = ProgramBuilder(3, 12, 12)
    b.conv(4, 3, bn=True, act="leaky")
    b.maxpool(2, 2)
    b.conv(6, 3, bn=True, act="leaky")
    b.conv(5, 3, bn=False, act="relu")
    b.avgpool()
    b.connected(3)
    b.softmax()
    return b.build()


def make_plan(program, n, spans=((0, 1), (2, 3)), dtype="float64", batch=2, ring_min_bytes=None):
    choices = even_choices(program, list(spans), default_grid(n), n)
    extra = {} if ring_min_bytes is None else {"ring_min_bytes": ring_min_bytes}
    return build_plan(program, choices, model="small", batch=batch, dtype=dtype,
                      devices=[f"dev{r}" for r in range(n)], optimizer=OPT, **extra)


def spec_table(spec):
    return lambda kind, step, tensor: spec


def roundtrip(array, kind=Kind.FWD, step=3, tensor=7, spec=None):
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, kind, step, tensor, array)
        return read_frame(b, spec_table(spec or Spec(array.dtype, array.shape)))


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64", "int64"])
@pytest.mark.parametrize("shape", [(0,), (5,), (2, 3), (1, 2, 3, 4), ()])
def test_frames_round_trip(dtype, shape):
    array = (np.arange(int(np.prod(shape))) * 3 - 4).astype(dtype).reshape(shape)
    frame = roundtrip(array)
    assert (frame.kind, frame.step, frame.tensor) == (Kind.FWD, 3, 7)
    assert frame.array.dtype == array.dtype and frame.array.shape == array.shape
    np.testing.assert_array_equal(frame.array, array)


def test_large_frame_is_streamed_intact():
    array = np.random.default_rng(0).standard_normal((3, 700, 1000))  # 16 MB: many recv_into calls
    a, b = socket.socketpair()
    with a, b:
        t = threading.Thread(target=send_frame, args=(a, Kind.GRAD, 1, 2, array))
        t.start()
        frame = read_frame(b, spec_table(Spec(array.dtype, array.shape)))
        t.join()
    np.testing.assert_array_equal(frame.array, array)


def raw_header(kind=Kind.FWD, dcode=2, ndim=1, dims=(4, 0, 0, 0), length=32, magic=MAGIC, version=VERSION):
    return HEADER.pack(magic, version, kind, dcode, ndim, 1, 0, *dims, length)


@pytest.mark.parametrize("head, message", [
    (raw_header(magic=b"HTTP"), "magic"),
    (raw_header(version=9), "version"),
    (raw_header(dcode=17), "dtype code"),
    (raw_header(ndim=5), "shape"),
    (raw_header(dims=(4, 2, 0, 0)), "shape"),
    (raw_header(dcode=1, length=16), "dtype"),
    (raw_header(dims=(5, 0, 0, 0), length=40), "shape"),
    (raw_header(length=33), "payload bytes"),
    (raw_header(length=1 << 60), "payload bytes"),
])
def test_bad_headers_are_refused_before_the_payload(head, message):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(head + b"\0" * 8)
        with pytest.raises(FrameError, match=message):
            read_frame(b, spec_table(Spec(np.dtype("float64"), (4,))))
        assert b.recv(100) == b"\0" * 8  # nothing of the payload was read


def test_variable_payload_is_bounded():
    spec = Spec(np.dtype("uint8"), (10,), True)
    assert roundtrip(np.frombuffer(b"hello", np.uint8), spec=spec).text() == "hello"
    with pytest.raises(FrameError, match="at most"):
        roundtrip(np.zeros(11, np.uint8), spec=spec)


@pytest.mark.parametrize("cut", [0, 5, HEADER.size - 1, HEADER.size, HEADER.size + 31])
def test_truncated_frames_raise_connection_closed(cut):
    data = header(Kind.FWD, 1, 0, np.zeros(4)) + np.zeros(4).tobytes()
    a, b = socket.socketpair()
    with b:
        a.sendall(data[:cut])
        a.close()
        with pytest.raises(ConnectionClosed):
            read_frame(b, spec_table(Spec(np.dtype("float64"), (4,))))


@settings(max_examples=25, deadline=None)
@given(n=st.sampled_from([0, 1, 33, 5000]), pieces=st.lists(st.integers(1, 97), min_size=1, max_size=12))
def test_authenticated_frames_arrive_whole_however_the_bytes_are_cut(n, pieces):
    """A frame's payload and tag are read together where they are there:
    bytes that come in pieces of any size (a slow link) still make the
    frame, and a frame cut inside its tag is a closed connection."""
    a, b = socket.socketpair()
    with a, b:
        tx, rx = Channel(a, b"k" * 32, b"j" * 32), Channel(b, b"j" * 32, b"k" * 32)
        array = np.arange(n, dtype=np.float64)
        data = frame_bytes(tx, Kind.BN, 2, 5, array) + frame_bytes(tx, Kind.BN, 2, 6, np.array([7.0]))
        cuts, at = [], 0
        for k in pieces * (1 + len(data) // max(1, sum(pieces))):
            cuts.append(data[at:at + k])
            at += k
        cuts.append(data[at:])

        def dribble():
            for piece in cuts:
                a.sendall(piece)
                time.sleep(0)
        writer = threading.Thread(target=dribble)
        writer.start()
        first = read_frame(rx, spec_table(Spec(np.dtype("float64"), (n,))))
        second = read_frame(rx, spec_table(Spec(np.dtype("float64"), (1,))))
        writer.join()
    assert first.tensor == 5 and np.array_equal(first.array, array)
    assert second.tensor == 6 and second.array.tolist() == [7.0]


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 33, 9000, 20000]), min_size=1, max_size=6))
def test_frames_read_ahead_come_out_whole_and_in_order(sizes):
    """A Channel reads ahead of the frame it is reading (several small
    frames in one read; a long payload past its buffer straight into the
    array): a run of frames of any sizes, written at once, comes out whole,
    in order, each checked."""
    a, b = socket.socketpair()
    with a, b:
        tx, rx = Channel(a, b"k" * 32, b"j" * 32), Channel(b, b"j" * 32, b"k" * 32)
        b.settimeout(5)  # (a byte lost in the read-ahead: a failure, not a hang)
        arrays = [np.arange(n, dtype=np.float64) + t for t, n in enumerate(sizes)]
        data = b"".join(frame_bytes(tx, Kind.FWD, 1, t, x) for t, x in enumerate(arrays))
        writer = threading.Thread(target=a.sendall, args=(data,))
        writer.start()
        got = [read_frame(rx, spec_table(Spec(np.dtype("float64"), (n,)))) for n in sizes]
        writer.join()
    assert [f.tensor for f in got] == list(range(len(sizes)))
    assert all(np.array_equal(f.array, x) for f, x in zip(got, arrays))
    assert any(n * 8 > READ_AHEAD for n in [9000, 20000])  # (both paths of the read-ahead are drawn)


def test_a_frame_cut_inside_its_tag_is_a_closed_connection():
    a, b = socket.socketpair()
    with b:
        tx, rx = Channel(a, b"k" * 32, b"j" * 32), Channel(b, b"j" * 32, b"k" * 32)
        a.sendall(frame_bytes(tx, Kind.BN, 1, 0, np.zeros(4))[:-TAG_BYTES // 2])
        a.close()
        with pytest.raises(ConnectionClosed):
            read_frame(rx, spec_table(Spec(np.dtype("float64"), (4,))))


def test_header_rejects_too_many_dimensions():
    with pytest.raises(ValueError, match="dimensions"):
        header(Kind.FWD, 0, 0, np.zeros((1,) * 5))


# -- fuzzing -------------------------------------------------------------------

TABLE_SPEC = Spec(np.dtype("float32"), (2, 3, 5, 7))
VALID = header(Kind.BWD, 4, 9, np.zeros(TABLE_SPEC.shape, np.float32)) + bytes(TABLE_SPEC.max_bytes)


def _read_bounded(data, expect, bound):
    """Feed ``data`` then EOF to read_frame; returns the frame or the error,
    and checks that no more than ``bound`` bytes were allocated."""
    a, b = socket.socketpair()
    with b:
        writer = threading.Thread(target=lambda: (a.sendall(data), a.close()))
        writer.start()
        tracemalloc.start()
        try:
            result = read_frame(b, expect)
        except (FrameError, ConnectionClosed) as exc:
            result = exc
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            writer.join()
    assert peak <= bound + 64 * 1024, peak
    return result


def _expect_only(kind, tensor, spec):
    def expect(k, step, t):
        if (k, t) != (kind, tensor):
            raise FrameError("not in the plan")
        return spec
    return expect


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzzed_bytes_only_raise_frame_errors(data):
    result = _read_bounded(data, _expect_only(Kind.BWD, 9, TABLE_SPEC), TABLE_SPEC.max_bytes)
    assert isinstance(result, (FrameError, ConnectionClosed))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(VALID)))
def test_mutated_and_truncated_frames(flips, cut):
    data = bytearray(VALID)
    for pos, value in flips:
        data[pos] = value
    result = _read_bounded(bytes(data[:cut]), _expect_only(Kind.BWD, 9, TABLE_SPEC), TABLE_SPEC.max_bytes)
    if not isinstance(result, Exception):
        # whatever got through is exactly what the plan allows there
        assert result.kind == Kind.BWD and result.tensor == 9
        assert result.array.shape == TABLE_SPEC.shape and result.array.dtype == TABLE_SPEC.dtype


@st.composite
def plan_headers(draw, table):
    """A header that names an entry of ``table`` (or not), with its shape
    and length sometimes off by a little or a lot, and some payload."""
    (src, kind, tensor), spec = draw(st.sampled_from(sorted(table.items())))
    dims = list(spec.shape) + [0] * (4 - len(spec.shape))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(spec.shape) - 1))
        dims[i] = draw(st.sampled_from([0, dims[i] + 1, 1 << 20, (1 << 32) - 1]))
    length = int(np.prod([d for d in dims if d] or [0], dtype=np.int64)) * spec.dtype.itemsize
    length = draw(st.sampled_from([length, length + 8, 1 << 40]))
    kind = draw(st.sampled_from([kind, kind, Kind.GRAD, 99]))
    step = draw(st.sampled_from([1, 1, 2, 7]))
    head = HEADER.pack(MAGIC, VERSION, kind, 2, len(spec.shape), step, tensor, *dims, length)
    return head + draw(st.binary(max_size=64))


PLAN3 = make_plan(small_program(), 3, ((0, 3),), ring_min_bytes=0)
TABLE3 = frame_table(PLAN3, 0)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan_headers({k: v for k, v in TABLE3.items() if k[0] == 1}))
def test_frames_are_checked_against_the_plan_before_allocation(data):
    pairs = [socket.socketpair() for _ in range(2)]
    me = SocketComm(PLAN3, 0, {1: pairs[0][0], 2: pairs[1][0]}, timeout=5.0)
    try:
        # what device 0's reader applies to device 1's frames
        expect = me._expect_from(1)
        bound = max(spec.max_bytes for key, spec in TABLE3.items() if key[0] == 1)
        result = _read_bounded(data, expect, bound)
        if not isinstance(result, Exception):
            spec = TABLE3[(1, result.kind, result.tensor)]
            assert result.array.shape == spec.shape and result.array.dtype == spec.dtype
    finally:
        me.close(error="test over")
        for _, theirs in pairs:
            theirs.close()


# -- the plan's frames -----------------------------------------------------------


class SpyComm(comm.Comm):
    """Wraps an in-process comm and records every message sent to a peer."""

    def __init__(self, inner, log):
        super().__init__(inner.rank, inner.size, inner.timeout)
        self.inner, self.log = inner, log

    def _send(self, dest, tag, array):
        if dest != self.rank:
            self.log.append((self.rank, dest, tag, array.dtype, array.shape))
        return self.inner._send(dest, tag, array)

    def _recv(self, src, tag):
        return self.inner._recv(src, tag)


@pytest.mark.parametrize("n, spans", [(2, ((0, 1), (2, 3))), (3, ((0, 3),)), (4, ((0, 0), (1, 2), (3, 3)))])
@pytest.mark.parametrize("ring_min_bytes", [0, 1 << 62])
def test_frame_table_is_exactly_what_the_executor_sends(n, spans, ring_min_bytes, monkeypatch):
    program = small_program()
    plan = make_plan(program, n, spans, ring_min_bytes=ring_min_bytes)
    log = []
    real = comm.InProcessHub.comm
    monkeypatch.setattr(comm.InProcessHub, "comm", lambda hub, rank: SpyComm(real(hub, rank), log))
    params, buffers = weights.init_params(program, 0, "float64")
    inprocess.train(plan, params, buffers, generated_batches(program, 2, 0, "float64"), 1, module("float64"),
                    timeout=10)
    tables = [frame_table(plan, r) for r in range(n)]
    meshes = socketpair_mesh(plan, 1.0)
    try:
        sent = set()
        for src, dest, tag, dtype, shape in log:
            kind, _, tensor = meshes[dest].encode(tag)
            assert tables[dest][(src, kind, tensor)] == Spec(dtype, shape), tag
            sent.add((dest, src, kind, tensor))
        listed = {(r, *key) for r in range(n) for key in tables[r]}
        assert sent and listed == sent  # nothing in the table that is never sent
    finally:
        for c in meshes:
            c.close(error="test over")


def test_frame_from_outside_the_plan_ends_the_step_with_peer_lost():
    plan = make_plan(small_program(), 2)
    a, b = socket.socketpair()
    me = SocketComm(plan, 0, {1: a}, timeout=5.0)
    me.step = 1
    try:
        send_frame(b, Kind.GRAD, 1, 12345, np.zeros(3))
        with pytest.raises(PeerLost, match=r"device 1 \(dev1\) lost at step 1 \(sent an invalid frame: GRAD "
                                           r"tensor 12345 is not in the plan"):
            me.recv(1, (1, "bn", 0))
    finally:
        me.close(error="test over")
        b.close()


def test_a_send_that_cannot_leave_does_not_wait_out_the_timeout():
    """A peer gone mid-job: the frames for it never leave, and whoever waits
    for them (a bucket's all-reduce) wakes at once, not after the timeout,
    so a survivor stops promptly; the mailbox's fault says why."""
    plan = make_plan(small_program(), 2)
    a, b = socket.socketpair()
    me = SocketComm(plan, 0, {1: a}, timeout=60.0)
    me.step = 1
    try:
        b.close()
        big = np.zeros(1 << 20)  # more than a socket buffer: the write fails
        handles = [me.send(1, (1, "g", "0.conv.weight"), big) for _ in range(3)]
        start = time.monotonic()
        for handle in handles:
            handle.wait(60.0)
        assert time.monotonic() - start < 10.0
        with pytest.raises(PeerLost, match=r"device 1 \(dev1\) lost at step 1 \(connection (broken|closed)"):
            me.recv(1, (1, "bn", 0))
        late = me.send(1, (1, "g", "0.conv.weight"), big)  # after the link died
        late.wait(1.0)
    finally:
        me.close(error="test over")


def test_frames_for_a_later_step_or_twice_are_refused():
    plan = make_plan(small_program(), 2)
    for steps in ([5], [1, 1]):
        a, b = socket.socketpair()
        me = SocketComm(plan, 0, {1: a}, timeout=5.0)
        try:
            packed = np.zeros(1 + 2 * 4)
            for step in steps:
                send_frame(b, Kind.BN, step, 0, packed)
            if steps == [1, 1]:
                me.recv(1, (1, "bn", 0))
            with pytest.raises(PeerLost, match="BN frame for step 5 while at step|second BN frame"):
                me.recv(1, (1, "bn", 0))
        finally:
            me.close(error="test over")
            b.close()


# -- the ring ------------------------------------------------------------------------


def run_ranks(comms, fn):
    out, errors = [None] * len(comms), []

    def body(r):
        try:
            out[r] = fn(comms[r])
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
    threads = [threading.Thread(target=body, args=(r,)) for r in range(len(comms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("n", [2, 3, 4, 5])
@pytest.mark.parametrize("size", [1, 4, 1001])
def test_ring_allreduce_is_exact_and_identical_on_every_member(n, size):
    hub = comm.InProcessHub(n, timeout=10)
    rng = np.random.default_rng(n * 1000 + size)
    parts = [rng.standard_normal((size,)) * 10.0 ** rng.integers(-3, 3) for _ in range(n)]
    members = list(range(n))
    got = run_ranks([hub.comm(r) for r in range(n)],
                    lambda c: collectives.ring_allreduce(c, (1, "g", "k"), parts[c.rank], members))
    want = np.sum(parts, axis=0)
    for g in got:
        assert g.shape == want.shape
        np.testing.assert_array_equal(g, got[0])  # bit-identical replicas
        np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-12 * np.abs(parts).max())
    if n == 2:
        np.testing.assert_array_equal(got[0], parts[0] + parts[1])  # a + b == b + a exactly


def test_ring_over_sockets_sends_two_n_minus_one_over_n():
    plan = make_plan(small_program(), 4, spans=((0, 3),), ring_min_bytes=0)
    comms = socketpair_mesh(plan, 10.0)
    try:
        grad = {r: np.full((6, 4, 3, 3), float(r + 1)) for r in range(4)}
        got = run_ranks(comms, lambda c: collectives.ring_allreduce(c, (1, "g", "2.conv.weight"), grad[c.rank],
                                                                     [0, 1, 2, 3], inplace=True))
        for g in got:
            np.testing.assert_array_equal(g, np.full((6, 4, 3, 3), 10.0))
        for c in comms:
            assert c.bytes_sent == 2 * 3 * (6 * 4 * 3 * 3 // 4) * 8
    finally:
        for c in comms:
            c.close(error="test over")


def test_chunks_cover_the_array():
    for size in range(0, 30):
        for parts in range(1, 6):
            b = collectives.chunk_bounds(size, parts)
            assert b[0] == 0 and b[-1] == size and all(x <= y for x, y in zip(b, b[1:]))
            assert sum(collectives.ring_chunks((size,), parts)) == size


def test_struct_layout_is_forty_bytes():
    assert HEADER.size == 40 and struct.calcsize("!4sBBBBII4IQ") == 40


def test_a_small_frame_leaves_from_the_sending_thread_and_frames_keep_their_order(monkeypatch):
    """``Link.send`` writes a frame of up to ``INLINE_BYTES`` itself when
    nothing is queued or being written (no hand-off to the sender thread,
    which waits for a core where every core computes); a frame sent while a
    longer one is being written, and any after it, wait their turn in the
    queue: the receiver files them in the order sent, each intact. (Fails
    where every frame goes through the sender thread.)"""
    from tilec_runtime import transport
    from tilec_runtime.transport import INLINE_BYTES, Link, Mailbox
    writers = []
    real = transport.send_frame

    def recording(sock, kind, step, tensor, array=None):
        writers.append((tensor, threading.current_thread().name))
        real(sock, kind, step, tensor, array)
    monkeypatch.setattr(transport, "send_frame", recording)
    a, b = socket.socketpair()
    big_n = 4 << 20  # longer than a socket buffer: written while the small ones are sent
    sizes = {0: 8, 1: big_n, 2: 8, 3: INLINE_BYTES // 8, 4: 8}
    specs = {t: Spec(np.dtype("float64"), (n,)) for t, n in sizes.items()}
    inbox = Mailbox()
    receiver = Link(b, 0, inbox, lambda kind, step, tensor: specs[tensor])
    sender = Link(a, 1, Mailbox(), spec_table(Spec(np.dtype("float64"), (0,))))
    try:
        arrays = {t: np.arange(n, dtype=np.float64) + t for t, n in sizes.items()}
        dones = {t: threading.Event() for t in sizes}
        sender.send(Kind.FWD, 1, 0, arrays[0], dones[0])
        assert dones[0].is_set()  # written before send returned
        sender.send(Kind.FWD, 1, 1, arrays[1], dones[1])
        for t in (2, 3, 4):
            sender.send(Kind.FWD, 1, t, arrays[t], dones[t])
        order = []
        for t in sizes:
            got = inbox.get((0, Kind.FWD, 1, t), 30.0)
            np.testing.assert_array_equal(got, arrays[t])
            order.append(t)
        assert all(d.wait(30.0) for d in dones.values())
        # the first went out from this thread, not through the sender thread's send_frame; the rest did, in order
        assert writers == [(t, "tilec-send-1") for t in (1, 2, 3, 4)]
    finally:
        sender.close()
        receiver.close()


def close_links(sender, receiver, sock):
    """Close a sending link and its peer's (or, never read, the peer's socket)."""
    sender.close()
    if receiver is not None:
        receiver.close()
    else:
        sock.close()


def test_a_long_frame_leaves_from_the_sending_thread_without_a_copy(monkeypatch):
    """A frame of up to ``INLINE_BYTES`` longer than the socket takes at
    once (a halo of a few hundred KB) is begun by the calling thread
    itself: what the socket did not take, the sender thread writes from
    the caller's own array, as for a queued frame (``send`` returns an
    Event for it): no hand-off before the first byte leaves, no copy of the
    payload. (Fails where such a frame is queued whole, or its rest copied.)"""
    from tilec_runtime import transport
    from tilec_runtime.transport import INLINE_BYTES, Link, Mailbox
    writers = []
    real = transport.send_frame

    def recording(sock, kind, step, tensor, array=None):
        writers.append(tensor)
        real(sock, kind, step, tensor, array)
    monkeypatch.setattr(transport, "send_frame", recording)
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 14)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 14)
    n = min(INLINE_BYTES, 1 << 20) // 8  # (pieces of MAC_CHUNK: the rest of the first, and the next ones)
    sender = Link(a, 1, Mailbox(), spec_table(Spec(np.dtype("float64"), (0,))))
    receiver = None
    try:
        array = np.arange(n, dtype=np.float64)
        left = sender.send(Kind.FWD, 1, 0, array)
        assert left is not None and not left.is_set()  # the peer reads nothing yet: the rest waits
        rest, _, _ = sender.rest
        assert any(np.shares_memory(np.frombuffer(p, np.uint8), array) for p in rest)
        inbox = Mailbox()
        receiver = Link(b, 0, inbox, spec_table(Spec(np.dtype("float64"), (n,))))
        np.testing.assert_array_equal(inbox.get((0, Kind.FWD, 1, 0), 30.0), array)
        assert left.wait(30.0)
        assert writers == []  # never through send_frame: begun here, finished by the sender thread
    finally:
        close_links(sender, receiver, b)


def test_a_peer_that_stops_reading_never_blocks_the_sending_thread():
    """A peer that stopped reading (hung, its connection open) fills the
    socket: ``Link.send`` still returns at once (what a small frame's
    socket did not take, the sender thread writes before anything queued),
    so the caller reaches its timed waits and the job can stop; when the
    peer reads again every frame arrives, in order, intact."""
    from tilec_runtime.transport import Link, Mailbox
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 14)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 14)
    n, size = 64, 1000  # 64 frames of 8 KB: far more than both buffers hold
    sender = Link(a, 1, Mailbox(), spec_table(Spec(np.dtype("float64"), (0,))))
    receiver = None
    try:
        arrays = [np.full(size, t, dtype=np.float64) for t in range(n)]
        dones = [threading.Event() for _ in range(n)]
        caller = threading.Thread(target=lambda: [sender.send(Kind.FWD, 1, t, arrays[t], dones[t])
                                                  for t in range(n)], daemon=True)
        caller.start()
        caller.join(5.0)
        assert not caller.is_alive()  # (with a blocking write it waits for the peer for ever)
        assert not all(d.is_set() for d in dones)  # some wait in the queue: the peer reads nothing
        inbox = Mailbox()
        receiver = Link(b, 0, inbox, spec_table(Spec(np.dtype("float64"), (size,))))
        for t in range(n):
            np.testing.assert_array_equal(inbox.get((0, Kind.FWD, 1, t), 30.0), arrays[t])
        assert all(d.wait(30.0) for d in dones)
    finally:
        close_links(sender, receiver, b)


def test_a_received_array_is_freed_once_its_taker_lets_go():
    """The reader thread keeps nothing of a frame it filed: once the step
    has taken the array from the mailbox and let go of it, it is freed, not
    held until the next frame on the link arrives (a batch of images held
    so stood beside the next one: 8 MB more at a worker's peak)."""
    import gc
    import weakref

    from tilec_runtime.transport import Link, Mailbox
    a, b = socket.socketpair()
    spec = Spec(np.dtype("float64"), (1000,))
    inbox = Mailbox()
    receiver = Link(b, 0, inbox, lambda kind, step, tensor: spec)
    sender = Link(a, 1, Mailbox(), spec_table(Spec(np.dtype("float64"), (0,))))
    try:
        sender.send(Kind.FWD, 1, 0, np.ones(1000))
        got = inbox.get((0, Kind.FWD, 1, 0), 30.0)
        gone = weakref.ref(got)
        del got
        deadline = time.monotonic() + 5.0
        while gone() is not None and time.monotonic() < deadline:  # (the reader may still be finishing its turn)
            gc.collect()
            time.sleep(0.01)
        assert gone() is None
    finally:
        sender.close()
        receiver.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="the system has no idle scheduling policy")
def test_a_background_link_runs_its_threads_only_on_idle_cores():
    """A launcher beside its local workers: its links' reader and sender
    threads take the idle policy (``yield_cores``), a worker's stay as they
    were; frames flow alike both ways."""
    from tilec_runtime.transport import Link, Mailbox
    a, b = socket.socketpair()
    spec = Spec(np.dtype("float64"), (100,))
    inboxes = (Mailbox(), Mailbox())
    back = Link(a, 1, inboxes[0], lambda kind, step, tensor: spec, background=True)
    fore = Link(b, 0, inboxes[1], lambda kind, step, tensor: spec)
    try:
        back.send(Kind.FWD, 1, 0, np.arange(100.0))
        fore.send(Kind.FWD, 1, 0, np.arange(100.0) + 1)
        np.testing.assert_array_equal(inboxes[1].get((0, Kind.FWD, 1, 0), 30.0), np.arange(100.0))
        np.testing.assert_array_equal(inboxes[0].get((1, Kind.FWD, 1, 0), 30.0), np.arange(100.0) + 1)
        policies = {link: [os.sched_getscheduler(t.native_id) for t in (link.reader, link.sender)]
                    for link in (back, fore)}
        assert policies[back] == [os.SCHED_IDLE] * 2
        assert os.SCHED_IDLE not in policies[fore]
        assert os.sched_getscheduler(0) != os.SCHED_IDLE  # (the caller's thread is left as it was)
    finally:
        back.close()
        fore.close()
