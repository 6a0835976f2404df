"""Point-to-point messages and all-reduces between the devices of a plan.

``Comm`` is what the executor talks to; backends implement ``_send`` and
``_recv``. Every receive has a timeout, so a lost peer ends the step with an
error that names it instead of hanging. All-reduces combine contributions in
rank order, so every member computes bit-identical results and replicated
weights never drift apart.
"""
import collections
import threading
import time

import numpy as np

from tilec_runtime.errors import RuntimeFault


class PeerLost(RuntimeFault):
    """A peer did not deliver an expected message in time."""


class Sent:
    """What ``Comm.send`` returns: ``wait()`` until the array has left, after
    which the sender may overwrite it."""

    def __init__(self, event=None):
        self.event = event

    def wait(self, timeout=None):
        if self.event is not None and not self.event.wait(timeout):
            raise PeerLost(f"a send did not leave in {timeout:.0f} s")


SENT = Sent()


class Comm:
    """``send`` never blocks (the array must not change until its ``Sent``
    says so); ``recv`` blocks up to the timeout. ``wait_s`` adds up the
    time the *stepping* thread (``stepping_thread``, default any) spent
    blocked: what a device waited, not what a background all-reduce did."""

    def __init__(self, rank, size, timeout):
        self.rank, self.size, self.timeout = rank, size, timeout
        self.bytes_sent = 0
        self.wait_s = 0.0
        self.stepping_thread = None

    def send(self, dest, tag, array):
        if dest != self.rank:
            self.bytes_sent += array.nbytes
        return self._send(dest, tag, np.ascontiguousarray(array)) or SENT

    def recv(self, src, tag):
        t0 = time.perf_counter()
        try:
            return self._recv(src, tag)
        finally:
            if self.stepping_thread in (None, threading.get_ident()):
                self.wait_s += time.perf_counter() - t0

    def allgather(self, tag, array, members):
        """Contributions of every member, in rank order (this one's included)."""
        for m in members:
            if m != self.rank:
                self.send(m, tag, array)
        return [array if m == self.rank else self.recv(m, tag) for m in members]

    def allreduce_sum(self, tag, array, members):
        if len(members) == 1:
            return array
        parts = self.allgather(tag, array, members)
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        return total


class InProcessHub:
    """Mailboxes for devices that run as threads of one process.

    A send hands over the sender's array itself, and the receiver copies it
    when it receives it; only then does the send's ``Sent`` complete. That
    is what a socket does (the array goes out after ``send`` returned), so a
    sender that changes an array before its send has left is caught here,
    in the tests that run on threads, and not only on a real network."""

    def __init__(self, size, timeout=120.0):
        self.size, self.timeout = size, timeout
        self._boxes = [collections.defaultdict(collections.deque) for _ in range(size)]
        self._cond = threading.Condition()
        self.failed = None  # set when a device thread dies, to wake the others

    def comm(self, rank):
        return _InProcessComm(self, rank)

    def fail(self, rank, exc):
        with self._cond:
            if self.failed is None:
                self.failed = (rank, exc)
            self._cond.notify_all()


class _InProcessComm(Comm):
    def __init__(self, hub, rank):
        super().__init__(rank, hub.size, hub.timeout)
        self.hub = hub

    def _send(self, dest, tag, array):
        done = threading.Event()
        with self.hub._cond:
            self.hub._boxes[dest][(self.rank, tag)].append((array, done))
            self.hub._cond.notify_all()
        return Sent(done)

    def _recv(self, src, tag):
        with self.hub._cond:
            # the mailbox made under the lock too: made by two threads at once (a collection
            # inside defaultdict's insert can let another thread run), one of the two deques would
            # be dropped with what was sent to it (the likely cause of a test's hang, seen once)
            boxes = self.hub._boxes[self.rank]
            box = boxes[(src, tag)]
            ok = self.hub._cond.wait_for(lambda: box or self.hub.failed is not None, timeout=self.timeout)
            if box:
                array, done = box.popleft()
                if not box:  # (every step's tags are new: emptied ones would pile up)
                    del boxes[(src, tag)]
                copy = array.copy()
                done.set()
                return copy
            if self.hub.failed is not None:
                rank, exc = self.hub.failed
                raise PeerLost(f"device {rank} failed: {exc}")
            if not ok:
                raise PeerLost(f"device {src} sent nothing for {self.timeout:.0f} s (waiting for {tag})")
        raise AssertionError("unreachable")
