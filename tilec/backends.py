"""Where a plan's devices run: the backends under the one training loop.

Every backend has the same small protocol, which ``tilec.train.run_loop``
drives:

``steps(batches, first, last, lr, state_every)``
    yields a :class:`StepResult` per step, with the whole model's state
    (params, buffers, momentum) after steps ``first + k * state_every`` and
    the last;
``request_stop()``
    end after the steps already under way (safe from a signal handler):
    the generator ends;
``final_state()``
    (params, buffers, momentum) after the last step run;
``close()``.

- :class:`ReferenceBackend`: one device, the numpy reference executor (the
  oracle; ``--kernels reference``).
- :class:`ThreadsBackend`: the plan's ranks as threads of this process
  (a one-device plan runs on the calling thread).
- :class:`WorkersBackend`: worker processes on this machine or a cluster's
  ``tilec worker``\\ s, over TCP (``tilec_runtime.launch``).
"""
import queue
import threading
import time
from dataclasses import dataclass, field

from tilec_runtime.comm import InProcessHub, PeerLost
from tilec_runtime.shards import cut_target, target_part, total_loss
from tilec_runtime.trace import step_events


@dataclass
class StepResult:
    step: int
    loss: float
    seconds: float  # rank 0's step
    records: list = field(default_factory=list)  # per device: step_s, compute_s, wait_s, bytes_sent, ...
    state: tuple = None  # (params, buffers, momentum) after this step, at report steps


def report_steps(first, last, every):
    """Steps after which the state is reported: every ``every`` and the last."""
    return (set(range(first + every, last + 1, every)) if every else set()) | {last}


class ReferenceBackend:
    """One device, the reference executor and ``tilec_runtime.optim.SGD``."""

    def __init__(self, program, params, buffers, momentum, optimizer):
        from tilec_runtime.optim import SGD
        self.program, self.params, self.buffers = program, params, buffers
        self.opt = SGD(**optimizer)
        self.opt.velocity = {k: v.copy() for k, v in (momentum or {}).items()}
        self.stop = False

    def request_stop(self):
        self.stop = True

    def steps(self, batches, first, last, lr, state_every):
        from tilec_runtime import reference
        reports = report_steps(first, last, state_every)
        for step in range(first, last):
            if self.stop:
                return
            t0 = time.perf_counter()
            images, target = batches.get(step)
            loss, grads = reference.train_step(self.program, self.params, self.buffers, images, target)
            self.opt.lr = lr(step)
            self.opt.step(self.params, grads)
            seconds = time.perf_counter() - t0
            state = self.state() if step + 1 in reports else None
            yield StepResult(step, loss, seconds, [{"device": 0, "step_s": seconds}], state)

    def state(self):
        return ({k: v.copy() for k, v in self.params.items()}, {k: v.copy() for k, v in self.buffers.items()},
                {k: v.copy() for k, v in self.opt.velocity.items()})

    final_state = state

    def close(self):
        pass


class ThreadsBackend:
    """The ranks of ``plan`` as threads of this process, stepped together:
    each step every rank runs its schedule once, and the step ends when all
    have (so that the loop can stop, checkpoint or change the learning rate
    between steps). One rank runs on the calling thread."""

    def __init__(self, plan, module, params, buffers, momentum=None, threads=None, timeout=120.0, trace=False):
        from tilec_runtime import inprocess
        self.plan = plan
        self.hub = InProcessHub(len(plan["devices"]), timeout)
        self.executors = inprocess.make_executors(plan, [self.hub.comm(r) for r in range(len(plan["devices"]))],
                                                  module, params, buffers, momentum, threads, trace)
        self.stop = False
        self.workers = []
        if len(self.executors) > 1:
            self.jobs = [queue.SimpleQueue() for _ in self.executors]
            self.done = queue.SimpleQueue()
            for r in range(len(self.executors)):
                t = threading.Thread(target=self._serve, args=(r,), name=f"tilec-device-{r}", daemon=True)
                t.start()
                self.workers.append(t)

    def request_stop(self):
        self.stop = True

    def _serve(self, rank):
        ex = self.executors[rank]
        ex.comm.stepping_thread = threading.get_ident()
        while True:
            job = self.jobs[rank].get()
            if job is None:
                return
            self.done.put((rank, *self._one(rank, *job)))

    def _one(self, rank, images, target, lr):
        ex = self.executors[rank]
        ex.lr = lr
        if ex.events is not None:
            ex.events.clear()
            ex.reducer.events.clear()
        wait0, sent0, t0, wall0 = ex.comm.wait_s, ex.comm.bytes_sent, time.perf_counter(), time.time()
        try:
            loss = ex.step(images, target)
        except BaseException as exc:  # noqa: BLE001 - handed to the stepping thread
            self.hub.fail(rank, exc)
            return None, exc
        seconds = time.perf_counter() - t0
        wait = ex.comm.wait_s - wait0
        record = {"device": rank, "name": self.plan["devices"][rank]["name"], "loss": loss, "step_s": seconds,
                  "compute_s": seconds - wait, "wait_s": wait, "bytes_sent": ex.comm.bytes_sent - sent0,
                  "threads": ex.threads}
        if ex.events is not None:
            record["trace"] = step_events(ex.events, ex.reducer.events, self.plan["messages"], t0)
            record["start"] = wall0
        return record, None

    def steps(self, batches, first, last, lr, state_every):
        reports = report_steps(first, last, state_every)
        parts = [target_part(self.plan, r) for r in range(len(self.executors))]
        for step in range(first, last):
            if self.stop:
                return
            images, target = batches.get(step)
            rate = lr(step)
            if not self.workers:
                self.executors[0].comm.stepping_thread = threading.get_ident()
                record, error = self._one(0, images, cut_target(target, parts[0]), rate)
                results = [(0, record, error)]
            else:
                for r, q in enumerate(self.jobs):
                    # each rank cuts its own pieces of the image; the targets, the part of the loss it computes
                    q.put((images, cut_target(target, parts[r]), rate))
                results = sorted(self.done.get() for _ in self.executors)
            errors = [e for _, _, e in results if e is not None]
            if errors:
                raise next((e for e in errors if not isinstance(e, PeerLost)), errors[0])
            records = [rec for _, rec, _ in results]
            state = self.state() if step + 1 in reports else None
            yield StepResult(step, total_loss([r["loss"] for r in records]), records[0]["step_s"], records, state)

    def state(self):
        """The whole model, each array from the lowest rank that holds it (replicas are identical)."""
        from tilec_runtime.inprocess import gather_state
        params, buffers, momentum = gather_state(self.executors)
        return ({k: v.copy() for k, v in params.items()}, {k: v.copy() for k, v in buffers.items()},
                {k: v.copy() for k, v in momentum.items()})

    final_state = state

    def close(self):
        for q in getattr(self, "jobs", []):
            q.put(None)
        for ex in self.executors:
            ex.close()


class WorkersBackend:
    """A job on workers that listen at ``addresses`` (``tilec worker``, or
    ``tilec_runtime.launch.LocalWorkers``), over TCP."""

    def __init__(self, plan, addresses, key, kernel_source, params, buffers, momentum=None, threads=None,
                 timeout=120.0, trace=False, data_dir=None):
        """``data_dir``: on the workers' machine (local workers), where they read the images (``launch.local_data``)."""
        self.plan, self.addresses, self.key, self.kernel_source = plan, addresses, key, kernel_source
        self.data_dir = data_dir
        self.params, self.buffers, self.momentum = params, buffers, momentum
        self.threads, self.timeout, self.trace = threads, timeout, trace
        self.job = None
        self.stop = False

    def request_stop(self):
        self.stop = True
        if self.job is not None:
            self.job.request_stop()

    def steps(self, batches, first, last, lr, state_every):
        from tilec_runtime import launch
        from tilec_runtime.errors import RuntimeFault
        changes, previous = [], None
        for step in range(first, last):
            rate = lr(step)
            if rate != previous:
                changes.append([step, rate])
                previous = rate
        self.job = job = launch.Job(self.plan, self.addresses, self.key, self.timeout)
        if self.stop:
            job.request_stop()
        try:
            job.start(self.params, self.buffers, self.momentum, first, last - first, state_every, 30.0, self.kernel_source,
                      self.threads, self.trace, changes,
                      launch.local_data(self.plan, self.data_dir))
            for step, records, state in job.steps(batches):
                yield StepResult(step, total_loss([r["loss"] for r in records]), records[0]["step_s"], records, state)
        except BaseException as exc:
            job.abort(str(exc) if isinstance(exc, RuntimeFault) else f"the launcher stopped: {type(exc).__name__}")
            raise

    def final_state(self):
        return self.job.final_state

    def close(self):
        pass
