"""All-reduces over the devices of a group, on any ``Comm``.

Weight gradients of three or more members (``use_ring``) use a ring
all-reduce: a reduce-scatter then an all-gather,
each of ``n - 1`` rounds in which every member sends one ``1/n`` chunk to
its successor in the ring (members in rank order, wrapping around). Each
member sends ``2 (n - 1) / n`` of the array whatever ``n`` is, the least
any all-reduce can, and only to one neighbour at a time.

Every chunk is summed by exactly one member and then copied to the others,
so all members end with bit-identical gradients (replicated weights never
drift apart). The summation order of a chunk starts at the member that
owns it, so a sum of three or more differs from the rank-order sum of
``Comm.allreduce_sum`` by rounding only. Batch-norm statistics keep the
rank-order all-gather of ``Comm``: they are small, and combining them in
one fixed order on every member is what keeps them identical.
"""
import queue
import threading
import time

import numpy as np

RING_MIN_BYTES = 64 * 1024  # below this, latency dominates: one all-gather round


def use_ring(nbytes, n_members, ring_min_bytes=RING_MIN_BYTES):
    """A ring for ``nbytes`` over ``n_members``: from three members, where it
    sends less than an all-gather. Two members send each other the whole
    array either way; the all-gather does it in one round instead of two
    (and two frames a member instead of four), the same sum on both."""
    return n_members > 2 and nbytes >= ring_min_bytes


def chunk_bounds(size, parts):
    """Start offsets of ``parts`` nearly equal chunks of ``size`` elements, and the end."""
    return [size * i // parts for i in range(parts + 1)]


def ring_chunks(shape, parts):
    """Lengths of the ring chunks of an array of ``shape``."""
    b = chunk_bounds(int(np.prod(shape, dtype=np.int64)), parts)
    return [b[i + 1] - b[i] for i in range(parts)]


def ring_allreduce(comm, tag, array, members, inplace=False, labels=("rs", "ag")):
    """Sum of ``array`` over ``members`` (sorted ranks, this one included);
    with ``inplace`` the sum overwrites ``array`` (C-contiguous).

    Tags of the chunk messages: ``(step, labels[0] | labels[1], key, chunk)``
    for a ``tag`` of ``(step, _, key)``.
    """
    n = len(members)
    if n == 1:
        return array
    step, _, key = tag
    p = members.index(comm.rank)
    succ, pred = members[(p + 1) % n], members[(p - 1) % n]
    flat = array.reshape(-1) if inplace else np.array(array, copy=True).reshape(-1)
    b = chunk_bounds(flat.size, n)

    def chunk(c):
        return flat[b[c]:b[c + 1]]

    # Reduce-scatter: in round s, pass on chunk p - s (own part plus what
    # came before) and add the predecessor's partial of chunk p - s - 1.
    # After n - 1 rounds this member holds the full sum of chunk p + 1.
    for s in range(n - 1):
        comm.send(succ, (step, labels[0], key, (p - s) % n), chunk((p - s) % n))
        c = (p - s - 1) % n
        chunk(c)[...] += comm.recv(pred, (step, labels[0], key, c))
    # All-gather: pass each finished chunk on around the ring. A chunk sent
    # above is overwritten here only after it has gone round the whole ring
    # (the predecessor could not have finished it otherwise), so the queued
    # send has left this process: no copies needed. The last sends may still
    # be queued when the ring is done: the caller may change the array only
    # once they have left.
    sent = []
    for s in range(n - 1):
        sent.append(comm.send(succ, (step, labels[1], key, (p + 1 - s) % n), chunk((p + 1 - s) % n)))
        c = (p - s) % n
        chunk(c)[...] = comm.recv(pred, (step, labels[1], key, c))
    for handle in sent:
        handle.wait(comm.timeout)
    return flat.reshape(array.shape)


def gather_allreduce(comm, tag, array, members):
    """In place: ``array`` becomes the sum over ``members``, added in rank
    order on every member (so the result is bit-identical everywhere)."""
    sent = [comm.send(m, tag, array) for m in members if m != comm.rank]
    parts = [array if m == comm.rank else comm.recv(m, tag) for m in members]
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    for handle in sent:
        handle.wait(comm.timeout)  # the array goes out as it is now, before it changes
    array[...] = total


class GradientReducer:
    """Sums gradient buckets over their members and applies them, on a
    thread of its own, in the order they are started (every member starts
    a group's buckets in the same order, so the blocking rounds of two
    buckets never wait on each other). Other collectives that overlap
    compute (a channel group's all-reduce of an input gradient while the
    weight gradient is computed) queue on the same thread (``call``), in
    schedule order too.

    ``apply(bucket)`` runs after a bucket's sums (the optimiser update).
    A failure is kept and raised by the next ``wait``; ``events``, if a
    list, receives (name, start, end, thread CPU clock at start, at end) of
    each bucket for traces.
    """

    def __init__(self, comm, apply, events=None):
        self.comm, self.apply, self.events = comm, apply, events
        self.queue = queue.SimpleQueue()
        self.cond = threading.Condition()
        self.issued = self.finished = 0  # tickets: the thread runs them in order
        self.error = None
        self.thread = None

    def start(self, step, bucket, accumulators):
        def run():
            for key, algorithm in sorted(bucket["reduce"].items()):
                tag = (step, "g", key)
                if algorithm == "ring":
                    ring_allreduce(self.comm, tag, accumulators[key], bucket["members"], inplace=True)
                else:
                    gather_allreduce(self.comm, tag, accumulators[key], bucket["members"])
            self.apply(bucket)
        return self.call(run, f"all-reduce {','.join(bucket['reduce']) or 'local'}")

    def call(self, fn, label):
        """Run ``fn()`` on the thread after everything queued before it;
        returns its ticket (``wait_for``)."""
        with self.cond:
            self.issued += 1
            ticket = self.issued
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=f"tilec-grads-{self.comm.rank}", daemon=True)
            self.thread.start()
        self.queue.put((fn, label))
        return ticket

    def wait_for(self, ticket, timeout=None):
        """Until the job of ``ticket`` (and every one before it) is done; raises the first failure."""
        with self.cond:
            if not self.cond.wait_for(lambda: self.finished >= ticket or self.error is not None, timeout):
                raise TimeoutError("an all-reduce on the communication thread did not finish")
            if self.error is not None:
                raise self.error

    def wait(self, timeout=None):
        """Until every job started so far is done; raises the first failure."""
        self.wait_for(self.issued, timeout)  # (only the stepping thread issues tickets)

    def close(self):
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(5.0)
            self.thread = None

    def _run(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            fn, label = item
            t0 = time.perf_counter()
            c0 = time.thread_time() if self.events is not None else None  # (a clock read a bucket only when traced)
            try:
                if self.error is None:
                    fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                with self.cond:
                    self.error = self.error or exc
            if self.events is not None:
                c1 = time.thread_time()
                self.events.append((label, t0, time.perf_counter(), c0, c1))
            with self.cond:
                self.finished += 1
                self.cond.notify_all()
