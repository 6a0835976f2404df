"""Binary frames over TCP, validated before any buffer is touched.

A frame is a fixed 40-byte header followed by the raw bytes of one array::

    magic "TLCF" | version u8 | kind u8 | dtype u8 | ndim u8 | step u32 |
    tensor u32 | shape 4 x u32 | payload length u64        (network order)

The receiver reads the header into a preallocated buffer, asks its
``expect(kind, step, tensor)`` what the plan says this sender may send
there (a ``Spec``: dtype and exact shape, or a byte string up to a bound),
checks dtype, shape and length against it, and only then allocates the
array and fills it with ``recv_into``. So a peer cannot make a device
allocate more than the plan allows, and nothing is ever unpickled: control
messages are UTF-8 JSON in a ``uint8`` payload.

After the handshake (``auth.py``) a connection is a ``Channel``: every frame
ends in a 16-byte tag, a MAC (keyed BLAKE2b, HMAC-SHA256 or Poly1305:
``new_mac``) of a sequence number, the header and the payload, under a key
of this connection and direction derived in the handshake. The sequence
numbers are not sent; both ends count. A frame that was changed, replayed,
reordered, dropped or sent the other way is refused
before anything reads its payload.

``Link`` is one connection in use: a reader thread that validates frames and
files them in a ``Mailbox``, and a sender thread that writes queued frames
in order (so a device computes while its sends drain, and two devices
sending to each other at once cannot deadlock on full socket buffers). A
frame sent while nothing is queued is written by the sending thread
itself (``INLINE_BYTES``), saving a thread hand-off per frame; without
blocking, and without copying the payload: what the socket does not take
at once (a peer that stopped reading), the sender thread writes, so no
caller ever waits on a peer outside the mailbox's timed waits.
An idle link sends a HEARTBEAT a few times per receive timeout, so that
``await_frame`` tells a silent peer (stopped, hung, cut off without a FIN)
from one that is merely waiting for someone else, and names the right one.

A launcher whose workers run on its own machine makes its links'
threads ``background`` ones (``yield_cores``), so that its bookkeeping
runs on a core a worker leaves idle rather than taking one from a worker.
"""
import collections
import contextlib
import enum
import functools
import hashlib
import hmac
import json
import math
import os
import queue
import socket
import struct
import threading
import time
from typing import NamedTuple

import numpy as np

from tilec_runtime import poly1305
from tilec_runtime.errors import RuntimeFault

MAGIC = b"TLCF"
VERSION = 1
MAX_DIMS = 4
HEADER = struct.Struct("!4sBBBBII4IQ")
DTYPES = tuple(np.dtype(d) for d in ("uint8", "float32", "float64", "int64"))
_DCODE = {d: i for i, d in enumerate(DTYPES)}
BYTES = np.dtype("uint8")

MAX_TEXT = 4096  # error and abort messages
REST = ("rest",)  # queued after a frame a caller could not write whole: the sender writes the rest
# Frames up to this size are written by the thread that sends them (``Link.send``), from the array itself,
# where the socket takes them at once. Queued instead, a frame waits for the sender thread, which on a
# device whose cores all compute gets one only when the stepping thread blocks (Linux's EEVDF scheduler
# lets a running thread finish its slice). Measured against 64 KiB here (yolov2-tiny-12 at batch 1, two
# single-core workers, whose 86-173 KB halos and channel exchanges were queued): rank 0 waited about 1 ms
# a step less, and steps were 0.93, 0.97, 0.97 and 0.99 as long (four runs, each the median of 10-14
# interleaved pairs of jobs). A long frame leaves in pieces (``Channel.framed``), each hashed as it is
# reached, so that the receiver checks one while the next is hashed; longer than this, a frame's hashing
# would keep the caller from its work for milliseconds where the sender thread can fill the idle ones.
INLINE_BYTES = 1 << 22
MAC_CHUNK = 1 << 17  # bytes hashed and sent (or received and checked) at a time
TAG_BYTES = 16  # the MAC of a frame on a Channel
READ_AHEAD = 1 << 16  # bytes a Channel reads ahead of the frame it is reading


class Kind(enum.IntEnum):
    # connection set-up (auth.py)
    HELLO = 1
    PROOF = 2
    REFUSE = 3
    # launcher <-> worker (worker.py, launch.py)
    JOB = 10
    STATE = 11
    READY = 12
    GO = 13
    BATCH = 14
    METRICS = 15
    ERROR = 16
    DONE = 17
    PEER = 18
    STOP = 19  # launcher -> worker: end the job after this many steps (Ctrl-C)
    # any link: a peer stops the job (ABORT), leaves cleanly (BYE), or is
    # idle but alive (HEARTBEAT)
    ABORT = 20
    BYE = 21
    HEARTBEAT = 22
    # the plan's tensors between devices (socketcomm.py, collectives.py)
    FWD = 30
    BWD = 31
    BN = 32
    BNG = 33
    GRAD = 34
    RING_RS = 35
    RING_AG = 36
    CHAN = 37  # a channel-split group's all-reduce, all-gathered
    CHAN_RS = 38  # ... or round a ring
    CHAN_AG = 39


class FrameError(RuntimeFault):
    """A frame that the plan does not allow here (or not a frame at all)."""


class ConnectionClosed(RuntimeFault):
    """The peer closed the connection (possibly in the middle of a frame)."""


class Spec(NamedTuple):
    """What a frame may carry: ``dtype`` and exact ``shape``, or with
    ``variable`` a 1-d array of at most ``shape[0]`` elements."""
    dtype: np.dtype
    shape: tuple
    variable: bool = False

    @property
    def max_bytes(self):
        return math.prod(self.shape) * self.dtype.itemsize


def kind_name(kind):
    return Kind(kind).name if kind in Kind._value2member_map_ else f"kind-{kind}"


def text_spec(limit=MAX_TEXT):
    return Spec(BYTES, (limit,), True)


EMPTY = Spec(BYTES, (0,))


class Frame(NamedTuple):
    kind: int
    step: int
    tensor: int
    array: np.ndarray

    def json(self):
        try:
            return json.loads(self.array.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FrameError(f"{Kind(self.kind).name} frame is not JSON: {exc}") from None

    def text(self):
        return self.array.tobytes().decode("utf-8", errors="replace")


def as_bytes(value):
    """A JSON-able value or a str as a uint8 payload."""
    raw = value.encode("utf-8") if isinstance(value, str) else json.dumps(value, separators=(",", ":")).encode()
    return np.frombuffer(raw, BYTES)


def header(kind, step, tensor, array):
    if array.ndim > MAX_DIMS:
        raise ValueError(f"a frame carries at most {MAX_DIMS} dimensions, got {array.shape}")
    shape = list(array.shape) + [0] * (MAX_DIMS - array.ndim)
    return HEADER.pack(MAGIC, VERSION, int(kind), _DCODE[array.dtype], array.ndim, step, tensor, *shape, array.nbytes)


MACS = ("blake2b", "sha256") + ((poly1305.NAME,) if poly1305.available() else ())


class KeyedHash:
    """A keyed hash as a frame MAC (``new_mac``): each frame's starts from
    a copy of the keyed one (keying costs a compression per frame)."""

    def __init__(self, keyed):
        self.keyed = keyed

    def frame(self, seq):
        return self.keyed.copy()


def new_mac(name, key):
    """One direction's frame MAC under ``key``: keyed BLAKE2b, HMAC-SHA256
    (cut to ``TAG_BYTES``) or Poly1305 (``tilec_runtime.poly1305``: a
    one-time key per frame, its number the nonce); ``frame(seq)`` starts a
    frame's (``frame_mac``)."""
    if name == poly1305.NAME:
        return poly1305.Key(key)
    if name == "blake2b":
        return KeyedHash(hashlib.blake2b(key=key, digest_size=TAG_BYTES))
    return KeyedHash(hmac.new(key, digestmod=hashlib.sha256))


def frame_mac(base, seq, head=b""):
    """The MAC of frame number ``seq`` under ``base`` (``new_mac``), the
    number and ``head`` already in it."""
    h = base.frame(seq)
    h.update(seq.to_bytes(8, "big") + bytes(head))  # (one call: a Poly1305 update is a foreign call)
    return h


class Channel:
    """A socket whose frames are authenticated (see the module docstring).
    Anything but framing goes to the socket itself.

    Reads go through a buffer of ``READ_AHEAD`` bytes of this connection's
    own (its size fixed here, never by a peer): a small frame, header,
    payload and tag, then comes in one system call where the sender wrote it
    in one. A device waits for most of its small frames (batch-norm
    statistics above all), and on a core that has just woken each call on
    the way costs tens of microseconds that both devices wait."""

    def __init__(self, sock, send_key, recv_key, mac="blake2b"):
        if mac not in MACS:
            raise ValueError(f"unknown MAC {mac!r}")
        self.sock, self.mac = sock, mac
        self._send_mac, self._recv_mac = new_mac(mac, bytes(send_key)), new_mac(mac, bytes(recv_key))
        self.sent = self.received = 0
        self._lock = threading.RLock()  # numbering and writing a frame (``send`` frames under it)
        self._ahead = bytearray(READ_AHEAD)
        self._lo = self._hi = 0  # the bytes read ahead and not yet taken: _ahead[_lo:_hi]

    def __getattr__(self, name):  # settimeout, shutdown, close, sendall ...
        return getattr(self.sock, name)

    def recvmsg_into(self, views):
        """``socket.recvmsg_into`` for ``recv_exact``: the bytes read ahead
        first; a request shorter than the buffer refills it (one call, what
        is there), a longer one reads into ``views`` themselves."""
        if self._lo == self._hi:
            if sum(len(v) for v in views) >= READ_AHEAD:
                return self.sock.recvmsg_into(views)
            self._lo, self._hi = 0, self.sock.recv_into(self._ahead)
        got = 0
        for view in views:
            k = min(len(view), self._hi - self._lo)
            view[:k] = self._ahead[self._lo:self._lo + k]
            self._lo += k
            got += k
            if self._lo == self._hi:
                break
        return got, [], 0, None

    def framed(self, head, payload):
        """One frame, numbered next, as the lists of buffers it goes out in
        (the caller writes all of them before any frame framed after it):
        a short payload in one, [head, payload, tag]; a long one in pieces
        of ``MAC_CHUNK``, each hashed only when reached (an iterator), so
        that the receiver checks one piece while the next is hashed, the tag
        with the last."""
        with self._lock:
            h = frame_mac(self._send_mac, self.sent, head)
            self.sent += 1
        if len(payload) <= MAC_CHUNK:
            h.update(payload)
            return iter(([head, payload, h.digest()[:TAG_BYTES]],))
        return self._pieces(h, head, memoryview(payload))

    @staticmethod
    def _pieces(h, head, payload):
        for start in range(0, len(payload), MAC_CHUNK):
            piece = payload[start:start + MAC_CHUNK]
            h.update(piece)
            parts = [head, piece] if start == 0 else [piece]
            if start + MAC_CHUNK >= len(payload):
                parts.append(h.digest()[:TAG_BYTES])
            yield parts

    def send(self, head, payload):
        """Write one frame and its tag (one writer at a time: the sequence is
        the order on the wire), a long payload piece by piece (``framed``)."""
        with self._lock:
            for parts in self.framed(head, payload):
                sendall_parts(self.sock, parts)

    def receive(self, head, payload, alive=None):
        """Fill ``payload`` (a writable byte view) and check the frame's tag;
        FrameError if the frame is not the next one this peer sent. The
        payload's last piece (a short payload: all of it) is read with the
        tag (one request: for a small frame, already read ahead)."""
        h = frame_mac(self._recv_mac, self.received, head)
        self.received += 1
        tag = bytearray(TAG_BYTES)
        pieces = [payload[start:start + MAC_CHUNK] for start in range(0, len(payload), MAC_CHUNK)] or [payload]
        for piece in pieces[:-1]:
            recv_exact(self, piece, alive=alive)
            h.update(piece)
        recv_exact(self, pieces[-1], memoryview(tag), alive=alive)
        h.update(pieces[-1])
        if not hmac.compare_digest(tag, h.digest()[:TAG_BYTES]):
            raise FrameError(f"{kind_name(head[5])} frame failed authentication (changed, replayed or out of order)")


def _contiguous(array):
    array = np.empty(0, BYTES) if array is None else np.asarray(array)
    return array if array.flags.c_contiguous else array.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)


def _framing(kind, step, tensor, array):
    """(header, payload) of a frame: the array's own bytes, not a copy."""
    array = _contiguous(array)
    return header(kind, step, tensor, array), memoryview(array).cast("B") if array.nbytes else b""


def frame_pieces(sock, kind, step, tensor, array=None):
    """A frame as the lists of buffers ``send_frame`` writes, in order (an
    iterator; on a Channel, ``Channel.framed``: numbered, so write them all
    before any frame framed after them): no copy of the payload, which must
    not change until they are written."""
    head, payload = _framing(kind, step, tensor, array)
    return sock.framed(head, payload) if isinstance(sock, Channel) else iter(([head, payload],))


def _advance(views, n):
    """Drop the first ``n`` bytes of ``views``, a list of byte memoryviews (in place)."""
    while views and n >= len(views[0]):
        n -= len(views.pop(0))
    if views:
        views[0] = views[0][n:]


def _byte_views(parts):
    """Byte memoryviews of the non-empty ``parts`` (for ``_advance``)."""
    return [memoryview(p).cast("B") for p in parts if len(p)]


def sendall_parts(sock, parts):
    """``sendall`` of several buffers, in one system call where the socket takes them."""
    views = _byte_views(parts)
    while views:
        _advance(views, sock.sendmsg(views))


def send_frame(sock, kind, step, tensor, array=None):
    head, payload = _framing(kind, step, tensor, array)
    if isinstance(sock, Channel):
        sock.send(head, payload)
    else:
        sendall_parts(sock, [head, payload])


def recv_exact(sock, *views, alive=None):
    """Fill the writable byte memoryviews ``views`` in order from ``sock``,
    in one read where the bytes are there (``recvmsg_into``); ``alive()``
    after every read (a long frame on a slow link is a sign of life)."""
    views = [v for v in views if len(v)]
    n, got = sum(len(v) for v in views), 0
    while views:
        k = sock.recvmsg_into(views)[0]
        if k == 0:
            raise ConnectionClosed("connection closed" + (f" after {got} of {n} bytes" if got else ""))
        got += k
        if alive is not None:
            alive()
        _advance(views, k)


def read_header(sock, buf, alive=None):
    """(kind, step, tensor, dtype, shape, length) from a header read into ``buf``."""
    recv_exact(sock, memoryview(buf), alive=alive)
    magic, version, kind, dcode, ndim, step, tensor, *dims, length = HEADER.unpack(buf)
    if magic != MAGIC:
        raise FrameError(f"not a tilec frame (magic {magic!r})")
    if version != VERSION:
        raise FrameError(f"frame version {version} (this runtime speaks {VERSION})")
    if dcode >= len(DTYPES):
        raise FrameError(f"unknown dtype code {dcode}")
    if ndim > MAX_DIMS or any(dims[ndim:]):
        raise FrameError(f"bad shape: ndim {ndim}, dims {dims}")
    return kind, step, tensor, DTYPES[dcode], tuple(dims[:ndim]), length


def check(spec, kind, dtype, shape, length):
    """Raise FrameError unless a header agrees with ``spec``."""
    name = kind_name(kind)
    if dtype != spec.dtype:
        raise FrameError(f"{name} frame has dtype {dtype}, expected {spec.dtype}")
    if spec.variable:
        if len(shape) != 1 or shape[0] > spec.shape[0]:
            raise FrameError(f"{name} frame has shape {shape}, expected at most ({spec.shape[0]},)")
    elif shape != tuple(spec.shape):
        raise FrameError(f"{name} frame has shape {shape}, expected {tuple(spec.shape)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if length != nbytes:
        raise FrameError(f"{name} frame claims {length} payload bytes for shape {shape} {dtype} ({nbytes})")


def read_frame(sock, expect, buf=None, alive=None):
    """Read one frame; ``expect(kind, step, tensor)`` returns its ``Spec`` or
    raises FrameError. The payload array is allocated only after the header
    passed every check."""
    buf = buf if buf is not None else bytearray(HEADER.size)
    kind, step, tensor, dtype, shape, length = read_header(sock, buf, alive)
    check(expect(kind, step, tensor), kind, dtype, shape, length)
    array = np.empty(shape, dtype)
    view = memoryview(array).cast("B") if length else memoryview(bytearray(0))
    if isinstance(sock, Channel):
        sock.receive(buf, view, alive)
    elif length:
        recv_exact(sock, view, alive=alive)
    return Frame(kind, step, tensor, array)


def expect_kinds(table):
    """An ``expect`` for a fixed {kind: Spec} table (set-up exchanges)."""
    def expect(kind, step, tensor):
        if kind not in table:
            raise FrameError(f"unexpected {kind_name(kind)} frame (expected {', '.join(Kind(k).name for k in table)})")
        return table[kind]
    return expect


def read_expected(sock, table):
    return read_frame(sock, expect_kinds(table))


# -- connecting ------------------------------------------------------------------


def parse_address(text, default_host="127.0.0.1"):
    """``HOST:PORT`` (or ``PORT``) -> (host, port)."""
    host, sep, port = str(text).rpartition(":")
    try:
        port = int(port)
    except ValueError:
        raise RuntimeFault(f"bad address {text!r} (expected HOST:PORT)") from None
    if not 0 <= port < 65536:
        raise RuntimeFault(f"bad port in {text!r}")
    return (host.strip("[]") if sep and host else default_host), port


def tune(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def connect(address, deadline, what="peer"):
    """Connect to ``(host, port)``, retrying with exponential backoff (a
    peer may still be starting) until ``deadline`` (time.monotonic())."""
    delay, last = 0.05, None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectionClosed(f"cannot connect to {what} at {address[0]}:{address[1]}: {last}")
        try:
            sock = socket.create_connection(address, timeout=min(left, 10.0))
            tune(sock)
            return sock
        except OSError as exc:
            last = exc
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 1.0)


# -- links in use ----------------------------------------------------------------


class Fault(NamedTuple):
    peer: object
    reason: str
    relayed: bool  # the reason is another device's own one-line report


class Lost(RuntimeFault):
    """A wait ended because a link failed; ``fault`` says which and why."""

    def __init__(self, fault):
        super().__init__(fault.reason)
        self.fault = fault


class Silent(RuntimeFault):
    """A wait ended because ``peer`` has sent nothing, not even a heartbeat,
    for ``seconds`` (stopped, hung, or cut off without a FIN)."""

    def __init__(self, peer, seconds):
        super().__init__(f"{peer} silent for {seconds:.1f} s")
        self.peer, self.seconds = peer, seconds


def heartbeat_interval(timeout):
    """How often an idle link says it is alive: several times per timeout."""
    return max(0.05, min(5.0, timeout / 4))


def await_frame(mailbox, links, key, timeout, patience=4):
    """``mailbox.get(key)`` that tells a dead peer from a slow one.

    Raises ``Silent`` as soon as any link in ``links`` has been silent for
    ``timeout`` (so the device that stopped is the one named, not the one
    this device happens to wait for), and ``Silent(key[0])`` if the frame
    has not come after ``patience * timeout`` although everyone is alive
    (a deadlock guard). Raises ``Lost`` on any link's fault."""
    start = time.monotonic()
    tick = heartbeat_interval(timeout)
    while True:
        try:
            return mailbox.get(key, tick)
        except TimeoutError:
            pass
        now = time.monotonic()
        live = [link for link in links if link.peer not in mailbox.left]
        if live:
            quiet = min(live, key=lambda link: link.heard)
            if now - quiet.heard > timeout:
                raise Silent(quiet.peer, now - quiet.heard)
        if now - start > patience * timeout:
            raise Silent(key[0], now - start)


class Stopped(RuntimeFault):
    """A wait for a frame of a step the job will not run (the launcher said STOP)."""


class Mailbox:
    """Frames that arrived, keyed ``(peer, kind, step, tensor)``; the first
    fault of any link wakes every waiter (a full mesh: one lost device
    dooms the step for all)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.boxes = collections.defaultdict(collections.deque)
        self.fault = None
        self.left = set()  # peers that said BYE
        self.stop_step, self.stop_kinds = None, ()

    def stop(self, step, kinds):
        """Wake (with ``Stopped``) every wait for a frame of ``kinds`` of ``step`` or later."""
        with self.cond:
            self.stop_step, self.stop_kinds = step, tuple(kinds)
            self.cond.notify_all()

    def _stopped(self, key):
        return self.stop_step is not None and key[1] in self.stop_kinds and key[2] >= self.stop_step

    def put(self, key, array):
        with self.cond:
            self.boxes[key].append(array)
            self.cond.notify_all()

    def fail(self, peer, reason, relayed=False):
        with self.cond:
            if self.fault is None:
                self.fault = Fault(peer, reason, relayed)
            self.cond.notify_all()

    def bye(self, peer):
        with self.cond:
            self.left.add(peer)
            self.cond.notify_all()

    def get(self, key, timeout):
        """The next array filed under ``key``; raises ``Lost`` on a fault and
        TimeoutError after ``timeout`` seconds."""
        with self.cond:
            box = self.boxes[key]  # (made under the lock: see ``comm._InProcessComm._recv``)
            if not self.cond.wait_for(lambda: box or self.fault is not None or self._stopped(key), timeout=timeout):
                raise TimeoutError(key)
            if box:
                array = box.popleft()
                if not box:
                    del self.boxes[key]
                return array
            if self.fault is not None:
                raise Lost(self.fault)
            raise Stopped(f"step {key[2]} will not run")

    def wait_left(self, peers, timeout):
        with self.cond:
            return self.cond.wait_for(lambda: self.left >= set(peers) or self.fault is not None, timeout=timeout)


def yield_cores(thread):
    """Run a started ``thread`` only on cores that nothing else wants (Linux
    ``SCHED_IDLE``; a no-op where the system has no such policy or refuses
    it). For a launcher's threads beside the workers it drives: each step
    ends with every worker reporting to the launcher, and the last report
    woke the launcher on that worker's core, which then started the next
    step about 1 ms after the others, who waited that out at the first
    batch-norm barrier (tiny416 at batch 1 on two single-core workers: rank
    1 started 0.9-1.0 ms after rank 0 in every step; 0.01 ms with this). A
    thread of this policy is never starved for long where workers wait for
    each other or for their next batch, which the launcher sends."""
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None:
        return
    try:
        os.sched_setscheduler(thread.native_id, policy, os.sched_param(0))  # (that thread alone)
    except OSError:
        pass


@functools.lru_cache(maxsize=None)
def _may_leave_idle():
    """Whether this process may move a thread out of ``SCHED_IDLE`` again
    (root, CAP_SYS_NICE or an RLIMIT_NICE of 20: an ordinary user may not),
    tried on a thread of its own."""
    done = []

    def probe():
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            done.append(True)
        except OSError:
            pass
    thread = threading.Thread(target=probe, name="tilec-probe")
    thread.start()
    thread.join()
    return bool(done)


@contextlib.contextmanager
def yielding_cores():
    """The calling thread runs as ``yield_cores`` makes a started one while
    the block runs, and as before after it: for a launcher's training loop
    beside the workers it drives (its work of a step, a few ms there, then
    fills the waits at the workers' barriers instead of lengthening a
    worker's step). Only where the thread may return to its policy: else
    every process it started later would inherit the idle one."""
    if not hasattr(os, "SCHED_IDLE") or not hasattr(os, "sched_getscheduler") or not _may_leave_idle():
        yield
        return
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    yield_cores(threading.current_thread())
    try:
        yield
    finally:
        os.sched_setscheduler(0, *before)


class Link:
    """One connection in use. The reader files each valid frame under
    ``(peer, kind, step, tensor)``; an invalid frame, an ABORT or the
    connection closing without a BYE is a fault of this peer.
    ``background``: the reader and sender threads ``yield_cores``."""

    def __init__(self, sock, peer, mailbox, expect, on_frame=None, heartbeat=None, background=False):
        self.sock, self.peer, self.mailbox, self.expect = sock, peer, mailbox, expect
        self.on_frame = on_frame
        self.heartbeat = heartbeat  # seconds of idleness before a HEARTBEAT (None: never)
        self.heard = time.monotonic()  # when the peer last sent anything
        self.sock.settimeout(None)  # waits are timed in the mailbox
        self.queue = queue.SimpleQueue()
        # whoever writes a frame holds ``writing``; ``pending`` counts frames queued and not yet written
        self.writing, self.counting, self.pending = threading.Lock(), threading.Lock(), 0
        self.rest = None  # (buffers, pieces, done) of a frame a caller began, the sender ends (``_write_now``)
        self.closing = False
        self.dead = False  # the sender has stopped: nothing queued will leave
        self.reader = threading.Thread(target=self._read, name=f"tilec-read-{peer}", daemon=True)
        self.sender = threading.Thread(target=self._write, name=f"tilec-send-{peer}", daemon=True)
        self.reader.start()
        self.sender.start()
        if background:
            yield_cores(self.reader)
            yield_cores(self.sender)

    def send(self, kind, step, tensor, array=None, done=None):
        """Send a frame: at once from the calling thread when nothing is queued
        or being written and the frame is at most ``INLINE_BYTES`` (no
        hand-off to the sender thread, which on a device whose cores all
        compute waits for one), else queued. The array must not change
        until it is sent. Returns None when the frame has left (``done``, if
        given, set), else an Event (``done``, or one made here) set when it
        leaves, or when it never will (the connection broke: the mailbox's
        fault says why), so that no sender waits out its timeout for it. (No
        Event is made for a frame that leaves at once: on a just-woken core
        that alone took a sixth of a small frame's send.)"""
        if (array is None or np.asarray(array).nbytes <= INLINE_BYTES) and not self.dead \
                and self.writing.acquire(blocking=False):
            try:
                with self.counting:
                    idle = self.pending == 0
                if idle:
                    return self._write_now(frame_pieces(self.sock, kind, step, tensor, array), done)
            finally:
                self.writing.release()
        done = threading.Event() if done is None else done
        with self.counting:
            self.pending += 1
        self.queue.put((kind, step, tensor, array, done))
        if self.dead:
            done.set()
        return done

    @property
    def raw(self):
        """The socket itself (a Channel's, whose frames are already tagged here)."""
        return self.sock.sock if isinstance(self.sock, Channel) else self.sock

    def _write_now(self, pieces, done):
        """Write a whole frame (its pieces, ``frame_pieces``) without blocking
        (``writing`` held): from where the socket takes no more (a peer that
        stopped reading, a full buffer) the sender thread writes the rest,
        before anything queued, from the caller's array as for a queued
        frame, so that no caller ever waits on a peer here; a broken
        connection is its to report. Returns what ``send`` does."""
        for parts in pieces:
            try:
                n = self.raw.sendmsg(parts, (), socket.MSG_DONTWAIT)
            except OSError:  # full (BlockingIOError), or broken: the sender meets that again and reports it
                n = 0
            if n < sum(len(p) for p in parts):
                rest = _byte_views(parts)
                _advance(rest, n)
                done = threading.Event() if done is None else done
                with self.counting:
                    self.pending += 1
                self.rest = (rest, pieces, done)
                self.queue.put(REST)
                return done
        if done is not None:
            done.set()
        return None

    def _write(self):
        while True:
            try:
                item, queued = self.queue.get(timeout=self.heartbeat), True
            except queue.Empty:
                item, queued = (Kind.HEARTBEAT, 0, 0, None, None), False
            if item is None:
                return
            frame, done = (None, None) if item is REST else (item[:-1], item[-1])
            try:
                with self.writing:
                    if self.rest is not None:  # the end of a frame a caller began: first
                        rest, pieces, rest_done = self.rest
                        sendall_parts(self.raw, rest)
                        for parts in pieces:
                            sendall_parts(self.raw, parts)
                        self.rest = None
                        with self.counting:
                            self.pending -= 1
                        if rest_done is not None:
                            rest_done.set()
                    if frame is not None:
                        try:
                            send_frame(self.sock, *frame)
                        finally:
                            if queued:
                                with self.counting:
                                    self.pending -= 1
            except OSError as exc:
                if not self.closing:
                    # a peer that closed may have said why first (ERROR, ABORT):
                    # let the reader get to it before this becomes the fault
                    self.reader.join(2.0)
                    self.mailbox.fail(self.peer, f"connection broken ({exc.strerror or exc})")
                self._release(done)
                return
            if done is not None:
                done.set()

    def _release(self, done):
        """Wake every waiter for a frame that will not leave: this one and
        the queued ones (``dead`` first, so a frame queued meanwhile is
        released by ``send`` or here)."""
        self.dead = True
        rest_done = self.rest[-1] if self.rest is not None else None  # (a frame a caller began)
        if rest_done is not None:
            rest_done.set()
        while True:
            if done is not None:
                done.set()
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            done = item[-1] if item is not None and item is not REST else None

    def _alive(self):
        self.heard = time.monotonic()

    def _read(self):
        buf = bytearray(HEADER.size)
        try:
            while True:
                frame = read_frame(self.sock, self._expect, buf, self._alive)
                if frame.kind == Kind.HEARTBEAT:
                    continue
                if frame.kind == Kind.BYE:
                    self.mailbox.bye(self.peer)
                elif frame.kind == Kind.ABORT:
                    self.mailbox.fail(self.peer, frame.text(), relayed=True)
                    return
                elif self.on_frame is None or not self.on_frame(self, frame):
                    self.mailbox.put((self.peer, frame.kind, frame.step, frame.tensor), frame.array)
                # not held while the next read blocks: the frame's array would outlive its use by the
                # step, to the next frame on this link (a batch of images: the next step's)
                del frame
        except ConnectionClosed as exc:
            if not (self.closing or self.peer in self.mailbox.left):
                self.mailbox.fail(self.peer, str(exc))
        except FrameError as exc:
            self.mailbox.fail(self.peer, f"sent an invalid frame: {exc}")
        except OSError as exc:
            if not self.closing:
                self.mailbox.fail(self.peer, f"connection broken ({exc.strerror or exc})")

    def _expect(self, kind, step, tensor):
        if kind in (Kind.BYE, Kind.HEARTBEAT):
            return EMPTY
        if kind == Kind.ABORT:
            return text_spec()
        return self.expect(kind, step, tensor)

    def close(self, grace=5.0):
        """Flush queued frames (for up to ``grace`` seconds), then close."""
        self.queue.put(None)
        self.sender.join(grace)
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.reader.join(grace)
