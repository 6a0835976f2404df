"""Point-to-point messages and all-reduces between the devices of a plan.

``Comm`` is what the executor talks to; backends implement ``_send`` and
``_recv``. Every receive has a timeout, so a lost peer ends the step with an
error that names it instead of hanging. All-reduces combine contributions in
rank order, so every member computes bit-identical results and replicated
weights never drift apart.
"""
import collections
import threading

import numpy as np

from tilec_runtime.errors import RuntimeFault


class PeerLost(RuntimeFault):
    """A peer did not deliver an expected message in time."""


class Comm:
    def __init__(self, rank, size, timeout):
        self.rank, self.size, self.timeout = rank, size, timeout
        self.bytes_sent = 0

    def send(self, dest, tag, array):
        if dest != self.rank:
            self.bytes_sent += array.nbytes
        self._send(dest, tag, np.ascontiguousarray(array))

    def recv(self, src, tag):
        return self._recv(src, tag)

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
    """Mailboxes for devices that run as threads of one process."""

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
        # a private copy: the sender may overwrite its buffer afterwards
        with self.hub._cond:
            self.hub._boxes[dest][(self.rank, tag)].append(array.copy())
            self.hub._cond.notify_all()

    def _recv(self, src, tag):
        box = self.hub._boxes[self.rank][(src, tag)]
        with self.hub._cond:
            ok = self.hub._cond.wait_for(lambda: box or self.hub.failed is not None, timeout=self.timeout)
            if box:
                return box.popleft()
            if self.hub.failed is not None:
                rank, exc = self.hub.failed
                raise PeerLost(f"device {rank} failed: {exc}")
            if not ok:
                raise PeerLost(f"device {src} sent nothing for {self.timeout:.0f} s (waiting for {tag})")
        raise AssertionError("unreachable")
