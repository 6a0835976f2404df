"""The cluster file: which devices, with which profile, memory and link.

YAML::

    devices:
      - {name: pi-a, host: pi-a.local, port: 7700, profile: rpi3b}
      - {name: pi-b, host: pi-b.local, port: 7700, profile: rpi3b, memory_mb: 600}
      - {name: fast, profile: ./my-board.json, compute_scale: 3.0, threads: 2}
    link: {bandwidth_mbps: 100, latency_ms: 0.5}

``profile`` is a shipped profile name or a JSON path (relative to the
cluster file). ``memory_mb`` overrides the profile's usable memory,
``compute_scale`` multiplies its speed, ``threads`` the kernel threads the
device runs (default: its profile's cores), and ``bandwidth_mbps`` /
``latency_ms`` on a device override the cluster-wide ``link``, which
overrides the profiles' own link figures. The first device is rank 0: it
reads the data and runs the layers after the tiled prefix.

A plan carries its cluster (``Cluster.to_json``: every device with its whole
profile), so that ``tilec simulate`` predicts it for the devices it was
made for.

Every error names the file, the device and the field.
"""
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tilec.errors import TilecError
from tilec.profiles import ProfileError, load_profile, profile_from_dict

LOCAL_ENV = "TILEC_PROFILE"  # a shipped profile name or a path: "this machine" for --devices N

DEVICE_KEYS = ("name", "host", "port", "profile", "memory_mb", "compute_scale", "bandwidth_mbps", "latency_ms",
               "threads")
LINK_KEYS = ("bandwidth_mbps", "latency_ms")


class ClusterError(TilecError):
    """A cluster file is missing, malformed, or names an unusable profile."""


@dataclass(frozen=True)
class Device:
    name: str
    profile: object  # tilec.profiles.Profile
    compute_scale: float
    memory_bytes: int  # what a training process may use, process overhead included
    bandwidth_bps: float  # bytes per second
    latency_s: float
    host: str = None
    port: int = None
    threads: int = 1  # kernel threads
    # a local worker: a process on the machine its profile measured, beside the launcher and the other
    # local workers (``uniform_cluster(shared=True)``)
    shared: bool = False
    # its kernel threads (with the other local workers', where shared) take every core of the board: the
    # transport's threads then run on a core the kernels need, and a message's CPU is theirs
    cores_taken: bool = False

    @property
    def message_cpu(self):
        """(seconds per message, per byte) that sending or receiving a message
        takes from this device's kernels: its profile's where its kernel
        threads take every core, else none (the transport runs on a free one)."""
        if not self.cores_taken:
            return 0.0, 0.0
        return self.profile.message_cpu_s, self.profile.message_cpu_s_per_byte

    @property
    def usable_bytes(self):
        """Memory left for the model after the process's own overhead."""
        return self.memory_bytes - self.profile.process_overhead_bytes

    def to_json(self):
        return {"name": self.name, "profile": self.profile.raw, "compute_scale": self.compute_scale,
                "memory_mb": self.memory_bytes / 1e6, "bandwidth_mbps": self.bandwidth_bps * 8 / 1e6,
                "latency_ms": self.latency_s * 1e3, "threads": self.threads, "host": self.host, "port": self.port,
                "shared": self.shared, "cores_taken": self.cores_taken}


@dataclass(frozen=True)
class Cluster:
    devices: tuple
    source: str = "<cluster>"

    def __len__(self):
        return len(self.devices)

    @property
    def names(self):
        return [d.name for d in self.devices]

    @property
    def threads(self):
        return [d.threads for d in self.devices]

    def to_json(self):
        """The cluster as a plan carries it (profiles included: a plan is self-contained)."""
        return {"source": self.source, "devices": [d.to_json() for d in self.devices]}


def cluster_from_json(data, where="plan cluster"):
    """The :class:`Cluster` a plan carries (``Cluster.to_json``)."""
    try:
        devices = []
        for i, d in enumerate(data["devices"]):
            profile = profile_from_dict(d["profile"], f"{where}: device {i} profile")
            devices.append(Device(d["name"], profile, float(d["compute_scale"]), int(d["memory_mb"] * 1e6),
                                  float(d["bandwidth_mbps"]) * 1e6 / 8, float(d["latency_ms"]) * 1e-3,
                                  d.get("host"), d.get("port"), int(d["threads"]), bool(d.get("shared", False)),
                                  bool(d.get("cores_taken", False))))
        return Cluster(tuple(devices), str(data.get("source", where)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ClusterError(f"{where}: malformed ({exc!r})") from None


def uniform_cluster(profile, n, names=None, threads=None, shared=False):
    """``n`` copies of ``profile`` (named dev0, dev1, ... unless ``names``),
    each running ``threads`` kernel threads (default: the profile's cores).

    ``shared``: the devices are processes on the one machine ``profile``
    measured (local workers). Each then computes at the speed per thread
    that the profile's thread speed-ups measured with all of their threads
    busy (two processes share caches and memory bandwidth as two threads
    do), not at its speed alone: ``compute_scale`` is that ratio for conv,
    the bulk of a step. Where their threads take every core and the
    profile measured local workers side by side (``tilec profile``: each
    kernel kind's in-step factor beside the others), each is priced by
    that instead (``Profile.beside_others``), kind by kind."""
    names = list(names) if names else [f"dev{r}" for r in range(n)]
    threads = threads or profile.cores
    scale = 1.0
    busy = len(names) * threads if shared else threads
    if shared and len(names) > 1:
        if busy >= profile.cores and profile.measured_beside_others:
            profile = profile.beside_others()
        else:
            scale = threads * profile.speedup("conv", busy) / busy / profile.speedup("conv", threads)
    devices = tuple(Device(name, profile, scale, profile.memory_bytes, profile.bandwidth_bps, profile.latency_s,
                           threads=threads, shared=shared, cores_taken=busy >= profile.cores) for name in names)
    return Cluster(devices, f"{len(devices)} x {profile.name}")


def _positive(value, where, key, integer=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value > 0
    if ok and integer:
        ok = isinstance(value, int)
    if not ok:
        raise ClusterError(f"{where}: {key} must be a positive {'integer' if integer else 'number'}, got {value!r}")
    return value


def cluster_from_dict(data, source="<cluster>", base=None):
    """A :class:`Cluster` from the parsed YAML; ``base``: directory for relative profile paths."""
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list) or not data["devices"]:
        raise ClusterError(f"{source}: expected a mapping with a non-empty 'devices' list")
    unknown = set(data) - {"devices", "link"}
    if unknown:
        raise ClusterError(f"{source}: unknown field {sorted(unknown)[0]!r} (expected 'devices' and 'link')")
    link = data.get("link") or {}
    if not isinstance(link, dict):
        raise ClusterError(f"{source}: link must be a mapping with {', '.join(LINK_KEYS)}")
    for key in link:
        if key not in LINK_KEYS:
            raise ClusterError(f"{source}: link: unknown field {key!r} (expected {', '.join(LINK_KEYS)})")
        _positive(link[key], f"{source}: link", key) if key == "bandwidth_mbps" else None
        if key == "latency_ms" and not (isinstance(link[key], (int, float)) and not isinstance(link[key], bool)
                                        and link[key] >= 0):
            raise ClusterError(f"{source}: link: latency_ms must be a number >= 0, got {link[key]!r}")
    devices, seen = [], set()
    for i, entry in enumerate(data["devices"]):
        where = f"{source}: device {i}"
        if not isinstance(entry, dict):
            raise ClusterError(f"{where}: expected a mapping, got {entry!r}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ClusterError(f"{where}: missing field 'name'")
        where = f"{source}: device {i} ({name})"
        if name in seen:
            raise ClusterError(f"{where}: the name is used twice")
        seen.add(name)
        for key in entry:
            if key not in DEVICE_KEYS:
                raise ClusterError(f"{where}: unknown field {key!r} (expected {', '.join(DEVICE_KEYS)})")
        if "profile" not in entry:
            raise ClusterError(f"{where}: missing field 'profile'")
        spec = str(entry["profile"])
        if base is not None and (spec.endswith(".json") or "/" in spec) and not Path(spec).is_absolute():
            spec = str(Path(base) / spec)
        try:
            profile = load_profile(spec)
        except ProfileError as exc:
            raise ClusterError(f"{where}: profile: {exc}") from None
        memory = _positive(entry["memory_mb"], where, "memory_mb") * 1e6 if "memory_mb" in entry else profile.memory_bytes
        scale = _positive(entry["compute_scale"], where, "compute_scale") if "compute_scale" in entry else 1.0
        bw = entry.get("bandwidth_mbps", link.get("bandwidth_mbps"))
        bw = _positive(bw, where, "bandwidth_mbps") * 1e6 / 8 if bw is not None else profile.bandwidth_bps
        lat = entry.get("latency_ms", link.get("latency_ms"))
        if lat is not None and not (isinstance(lat, (int, float)) and not isinstance(lat, bool) and lat >= 0):
            raise ClusterError(f"{where}: latency_ms must be a number >= 0, got {lat!r}")
        lat = lat * 1e-3 if lat is not None else profile.latency_s
        port = entry.get("port")
        if port is not None:
            _positive(port, where, "port", integer=True)
        host = entry.get("host")
        if host is not None and not isinstance(host, str):
            raise ClusterError(f"{where}: host must be a string, got {host!r}")
        threads = _positive(entry["threads"], where, "threads", integer=True) if "threads" in entry else profile.cores
        if memory <= profile.process_overhead_bytes:
            raise ClusterError(f"{where}: memory_mb {memory / 1e6:g} does not even hold the process "
                               f"({profile.process_overhead_bytes / 1e6:g} MB)")
        devices.append(Device(name, profile, float(scale), int(memory), float(bw), float(lat), host, port, threads,
                              cores_taken=threads >= profile.cores))
    return Cluster(tuple(devices), str(source))


def load_cluster(path):
    """A :class:`Cluster` from a YAML cluster file."""
    import yaml
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ClusterError(f"{path}: cannot read cluster file: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ClusterError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    return cluster_from_dict(data, str(path), base=path.parent)


def local_profile_path():
    """Where ``tilec profile`` caches the profile of this machine."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tilec" / "profile-local.json"


def local_profile(measure_if_missing=True):
    """The profile of this machine: ``$TILEC_PROFILE`` (a name or path), else
    the cached result of ``tilec profile``, else a quick measurement (a few
    seconds), cached for next time."""
    chosen = os.environ.get(LOCAL_ENV)
    if chosen:
        return load_profile(chosen)
    path = local_profile_path()
    stale = None
    if path.is_file():
        from tilec.profile_measure import fingerprint
        try:
            profile = load_profile(path)
            if profile.raw.get("measured_with") == fingerprint():
                return profile
            stale = ProfileError(f"{path}: measured with another machine, Python, numpy or kernels")
        except ProfileError as exc:  # written by an older tilec, or damaged: measure again
            stale = exc
    if not measure_if_missing:
        raise stale or ProfileError(f"no profile of this machine at {path}: run `tilec profile`")
    if stale is not None:
        print(f"tilec: re-measuring this machine's profile ({stale})", file=sys.stderr)
    from tilec.profile_measure import measure_profile, write_profile
    data = measure_profile(quick=True)
    write_profile(data, path)
    return profile_from_dict(data, str(path))


def plan_cluster(plan):
    """The cluster a plan was compiled for (plans carry it), else this
    machine's profile for every device (a plan made with --grid/--groups)."""
    if plan.get("cluster"):
        return cluster_from_json(plan["cluster"])
    return local_cluster([d["name"] for d in plan["devices"]])


def local_cluster(names):
    """Devices ``names`` as local workers of this machine: its profile, its
    cores divided between them, the machine shared (``uniform_cluster``)."""
    profile = local_profile()
    return uniform_cluster(profile, len(names), names, threads=max(1, profile.cores // len(names)), shared=True)
