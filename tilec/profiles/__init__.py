"""Device profiles: what a device computes how fast, holds, and sends.

A profile is a JSON file (format ``tilec-profile``, version 2)::

    {"format": "tilec-profile", "version": 2, "name": "rpi3b",
     "cores": 4, "memory_mb": 750, "process_overhead_mb": 60,
     "link": {"bandwidth_mbps": 94, "latency_ms": 0.25,
              "cpu_us_per_message": 60, "cpu_ns_per_byte": 12},
     "kernels": {"conv": {"forward": {"overhead_us": 400, "s_per_gflop": 0.25,
                                      "s_per_gb": 2.4, "ns_per_row": 20},
                          "backward": {...}},
                 "epilogue": {...}, "maxpool": {...}, "connected": {...},
                 "elementwise": {...}},
     "threads": {"conv": [1.0, 1.8, 2.5, 3.0], "epilogue": [1.0, 1.5, ...], ...},
     "sustained": 0.9, "jitter": 0.1, "jitter_call_ms": 8,
     "sources": {"...": "where each number comes from"}}

The time of one kernel call on one thread (one stage of one tile, as the
runtime's schedule runs it) is ``overhead + flops * s_per_flop + bytes *
s_per_byte + rows * s_per_row`` (a :class:`KernelCost`;
``Profile.costs[kind][direction]``, the JSON's ``kernels``; ``ns_per_row``
optional, 0 if absent) with the FLOPs, bytes and rows of
:mod:`tilec.cost.compute`:
the effective rate depends on the shape through its arithmetic intensity
(a 3-channel input or a 1x1 conv moves more bytes per FLOP) and the
per-call overhead (small tiles), not a single constant. Kinds: ``conv``
(the GEMM-bound convolution, forward and backward), ``epilogue`` (the
memory-bound batch norm, bias, activation and fused max-pool around it),
``maxpool``, ``connected``, and ``elementwise`` (everything else: route,
reorg, losses, the optimiser update); optionally ``region`` (a detector's
region loss, forward: numpy over every anchor and truth box, far slower per
byte than an element-wise pass; priced as ``elementwise`` where absent, as
in the shipped Pi profiles).

``threads[kind][t - 1]`` is how much faster a kernel of ``kind`` runs on
``t`` threads than on one (the runtime splits every kernel over a device's
cores); ``cores`` threads is the whole board. ``sustained`` scales every
kernel for sustained load (thermal throttling), once, for all of them.
``memory_mb`` is what a training process may use (RAM less the OS and GPU
reservations). ``jitter`` (optional, 0 if absent) is how much a kernel
call's time varies from one step to the next (its standard deviation over
its mean) where devices compute side by side: at every barrier of a step
(a batch-norm all-gather, a halo) the faster device waits for the slower,
which the simulator prices (``tilec.inspect.simulate``); ``jitter_call_ms``
(optional) is how long the calls it was measured on take: a longer call
varies less (its ups and downs average out), and the simulator scales the
spread to each op's length from there (without it, every op takes the
spread as it is). ``link.cpu_us_per_message`` and ``link.cpu_ns_per_byte``
(optional, 0 if absent) are the CPU one end of a message spends on it,
sending or receiving (the frame, its MAC, the copies, the system calls):
where a device's kernel threads take every core, that time is the
kernels' (:mod:`tilec.cost.comm`). ``tilec profile`` measures all of it on
the device.

Shipped profiles live beside this module (``*.json``, package data);
:func:`load_profile` takes a shipped name or a path.
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tilec.errors import TilecError

FORMAT = "tilec-profile"
VERSION = 2
KERNEL_KINDS = ("conv", "epilogue", "maxpool", "connected", "elementwise")
# kinds a profile may price on their own (``tilec profile`` measures them);
# where one is absent, its calls are priced as ``elementwise``
OPTIONAL_KINDS = ("region",)
DIRECTIONS = ("forward", "backward")
PROFILES_DIR = Path(__file__).resolve().parent


class ProfileError(TilecError):
    """A device profile is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class KernelCost:
    """Time of one kernel call in a training step:
    ``(overhead_s + flops * s_per_flop + bytes * s_per_byte + rows * s_per_row)
    * in_step + dispatch_s``; ``rows``: the row segments it walks one by one
    (:mod:`tilec.cost.compute`; 0 where not measured), ``in_step``: how much
    slower a step runs the kernel than the fitted calls, ``dispatch_s``: what
    the executor adds per call (:mod:`tilec.profile_calibrate`; 1 and 0 where
    not measured)."""
    overhead_s: float
    s_per_flop: float
    s_per_byte: float
    in_step: float = 1.0
    dispatch_s: float = 0.0
    s_per_row: float = 0.0

    def seconds(self, flops, nbytes, rows=0):
        return ((self.overhead_s + flops * self.s_per_flop + nbytes * self.s_per_byte + rows * self.s_per_row)
                * self.in_step + self.dispatch_s)


@dataclass(frozen=True)
class Profile:
    name: str
    cores: int
    memory_bytes: int
    process_overhead_bytes: int
    bandwidth_bps: float  # bytes per second
    latency_s: float
    costs: dict  # kind -> direction -> KernelCost (the JSON's "kernels")
    threads: dict = field(default_factory=dict)  # kind -> [speed-up on 1, 2, ... threads]
    sustained: float = 1.0
    jitter: float = 0.0  # a kernel call's time: standard deviation over mean, step to step
    jitter_call_s: float = 0.0  # the length of call ``jitter`` holds for (0: not measured, every length alike)
    message_cpu_s: float = 0.0  # CPU seconds one end spends on a message, sending or receiving, and per byte
    message_cpu_s_per_byte: float = 0.0
    source: str = ""  # the file it came from
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    def priced_as(self, kind, direction):
        """The kind whose cost and speed-up price ``kind``: itself, or
        ``elementwise`` for an optional kind the profile lacks."""
        return kind if direction in self.costs.get(kind, {}) else "elementwise"

    def cost(self, kind, direction):
        return self.costs[self.priced_as(kind, direction)][direction]

    @property
    def measured_beside_others(self):
        """Whether ``tilec profile`` measured how local workers slow each
        other's kernels down (``kernels.KIND.DIRECTION.beside_others``)."""
        kernels = self.raw.get("kernels", {}) if isinstance(self.raw, dict) else {}
        return any(isinstance(k, dict) and "beside_others" in k
                   for per in kernels.values() if isinstance(per, dict) for k in per.values())

    def beside_others(self):
        """This profile as it prices a local worker whose kernels run while
        the others' do, on the cores of the machine it measured: each
        kind's in-step factor times the one measured so
        (``tilec.profile_calibrate.beside_others``). Its ``raw`` says so,
        and a plan's cluster reads it back the same; ``alone`` undoes it."""
        return profile_from_dict(dict(self.raw, beside_others=True), self.source)

    def alone(self):
        """The profile of one process alone on the machine (undoes ``beside_others``)."""
        if not self.raw.get("beside_others"):
            return self
        return profile_from_dict({k: v for k, v in self.raw.items() if k != "beside_others"}, self.source)

    def speedup(self, kind, threads):
        """How much faster ``threads`` threads run a kernel of ``kind`` than one
        (beyond the measured counts: the last one's, the cores are all busy)."""
        table = self.threads.get(kind) or [1.0]
        return table[max(0, min(threads, len(table)) - 1)]

    def seconds(self, kind, direction, flops, nbytes, threads=1, scale=1.0, rows=0):
        """One call of a ``kind`` kernel on ``threads`` threads of a device ``scale`` times this profile."""
        kind = self.priced_as(kind, direction)
        one = self.costs[kind][direction].seconds(flops, nbytes, rows)
        return one / (self.speedup(kind, threads) * scale * self.sustained)


def shipped_names():
    """Names of the profiles shipped with tilec, sorted."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


_REQUIRED = object()


def _number(data, key, where, minimum=0.0, strict=True, integer=False, default=_REQUIRED):
    if default is not _REQUIRED and key not in data:
        return default
    value = data.get(key) if isinstance(data, dict) else None
    if value is None:
        raise ProfileError(f"{where}: missing field {key!r}")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok and integer:
        ok = isinstance(value, int)
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ProfileError(f"{where}: field {key!r} must be {kind} {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return value


def profile_from_dict(data, source="<dict>"):
    """A :class:`Profile` from its JSON dict; ProfileError naming ``source`` and the field."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ProfileError(f"{source}: not a tilec profile (missing format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ProfileError(f"{source}: profile version {data.get('version')!r} is not supported (this tilec reads {VERSION})")
    link = data.get("link")
    if not isinstance(link, dict):
        raise ProfileError(f"{source}: missing field 'link'")
    costs = {}
    kernels = data.get("kernels") if isinstance(data.get("kernels"), dict) else {}
    for kind in KERNEL_KINDS + tuple(k for k in OPTIONAL_KINDS if k in kernels):
        per = kernels.get(kind)
        if not isinstance(per, dict):
            raise ProfileError(f"{source}: missing field 'kernels.{kind}'")
        costs[kind] = {}
        for direction in DIRECTIONS:
            where = f"{source}: kernels.{kind}.{direction}"
            k = per.get(direction)
            if k is None and kind in OPTIONAL_KINDS:
                continue
            if not isinstance(k, dict):
                raise ProfileError(f"{where}: missing")
            costs[kind][direction] = KernelCost(
                _number(k, "overhead_us", where, strict=False) * 1e-6,
                _number(k, "s_per_gflop", where, strict=False) * 1e-9,
                _number(k, "s_per_gb", where, strict=False) * 1e-9,
                _number(k, "in_step", where, default=1.0),
                _number(k, "dispatch_us", where, strict=False, default=0.0) * 1e-6,
                _number(k, "ns_per_row", where, strict=False, default=0.0) * 1e-9)
            if data.get("beside_others"):  # a local worker's view (``Profile.beside_others``)
                cost = costs[kind][direction]
                costs[kind][direction] = dataclasses.replace(
                    cost, in_step=cost.in_step * _number(k, "beside_others", where, default=1.0))
    threads = data.get("threads", {})
    if not isinstance(threads, dict):
        raise ProfileError(f"{source}: field 'threads' must map kernel kinds to speed-ups")
    speedups = {}
    for kind, table in threads.items():
        if kind not in KERNEL_KINDS + OPTIONAL_KINDS:
            raise ProfileError(f"{source}: threads.{kind}: not a kernel kind "
                               f"({', '.join(KERNEL_KINDS + OPTIONAL_KINDS)})")
        if not (isinstance(table, list) and table and all(isinstance(v, (int, float)) and v > 0 for v in table)):
            raise ProfileError(f"{source}: threads.{kind} must be a list of positive speed-ups, got {table!r}")
        speedups[kind] = [float(v) for v in table]
    sustained = data.get("sustained", 1.0)
    if not (isinstance(sustained, (int, float)) and 0 < sustained <= 1):
        raise ProfileError(f"{source}: field 'sustained' must be in (0, 1], got {sustained!r}")
    jitter = _number(data, "jitter", source, strict=False, default=0.0)
    if jitter >= 1:
        raise ProfileError(f"{source}: field 'jitter' must be below 1 (a spread over the mean), got {jitter!r}")
    jitter_call = _number(data, "jitter_call_ms", source, default=0.0)
    return Profile(
        name=str(data.get("name", Path(str(source)).stem)),
        cores=_number(data, "cores", source, integer=True),
        memory_bytes=int(_number(data, "memory_mb", source) * 1e6),
        process_overhead_bytes=int(_number(data, "process_overhead_mb", source, strict=False) * 1e6),
        bandwidth_bps=_number(link, "bandwidth_mbps", f"{source}: link") * 1e6 / 8,
        latency_s=_number(link, "latency_ms", f"{source}: link", strict=False) * 1e-3,
        costs=costs, threads=speedups, sustained=float(sustained), jitter=float(jitter),
        jitter_call_s=float(jitter_call) * 1e-3,
        message_cpu_s=_number(link, "cpu_us_per_message", f"{source}: link", strict=False, default=0.0) * 1e-6,
        message_cpu_s_per_byte=_number(link, "cpu_ns_per_byte", f"{source}: link", strict=False, default=0.0) * 1e-9,
        source=str(source),
        raw=data)


def load_profile(name_or_path):
    """A :class:`Profile` from a shipped name (``rpi3b``) or a JSON file path."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".json") or os.sep in text or "/" in text or path.is_file()):
        if text not in shipped_names():
            raise ProfileError(f"unknown profile {text!r}: not a file and not a shipped profile "
                               f"({', '.join(shipped_names())})")
        path = PROFILES_DIR / f"{text}.json"
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ProfileError(f"{path}: not valid JSON: {exc}") from None
    return profile_from_dict(data, str(path))
