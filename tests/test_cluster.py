"""Cluster files and device profiles: loading, overrides, and errors that say where."""
import json

import pytest

from tilec.cluster import ClusterError, cluster_from_dict, load_cluster, local_profile, uniform_cluster
from tilec.profiles import DIRECTIONS, KERNEL_KINDS, ProfileError, load_profile, profile_from_dict, shipped_names


def write(tmp_path, text, name="cluster.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_profile_loads_and_cites_its_sources():
    assert {"rpi3b", "rpi3bplus", "rpi4", "rpi5"} <= set(shipped_names())
    for name in shipped_names():
        prof = load_profile(name)
        raw = prof.raw
        for key in ("memory_mb", "link.bandwidth_mbps", "link.latency_ms", "kernels.conv", "threads.conv"):
            assert raw["sources"].get(key), f"{name}: no source for {key}"
        assert 0 < prof.memory_bytes and prof.bandwidth_bps > 0
        for kind in KERNEL_KINDS:
            for d in DIRECTIONS:
                k = prof.cost(kind, d)
                assert min(k.overhead_s, k.s_per_flop, k.s_per_byte) >= 0


def test_shipped_profiles_order_pi_generations_by_speed_and_link():
    from tilec.cost.compute import reference_rate
    rates = [reference_rate(load_profile(n)) for n in ("rpi3b", "rpi3bplus", "rpi4", "rpi5")]
    assert rates == sorted(rates)
    links = [load_profile(n).bandwidth_bps for n in ("rpi3b", "rpi3bplus", "rpi4")]
    assert links == sorted(links) and links[0] < links[1] < links[2]


def test_profile_errors_name_the_file_and_field(tmp_path):
    good = load_profile("rpi3b").raw
    bad = json.loads(json.dumps(good))
    del bad["kernels"]["conv"]["backward"]["s_per_gflop"]
    with pytest.raises(ProfileError, match=r"x\.json: kernels\.conv\.backward: missing field 's_per_gflop'"):
        profile_from_dict(bad, "x.json")
    bad = dict(good, memory_mb="lots")
    with pytest.raises(ProfileError, match="'memory_mb' must be a number"):
        profile_from_dict(bad, "x.json")
    with pytest.raises(ProfileError, match="version"):
        profile_from_dict(dict(good, version=99), "x.json")
    with pytest.raises(ProfileError, match="unknown profile 'rpi9'"):
        load_profile("rpi9")
    assert load_profile("rpi3b").jitter == 0.0 and profile_from_dict(dict(good, jitter=0.1), "x.json").jitter == 0.1
    assert profile_from_dict(dict(good, jitter=0.1, jitter_call_ms=8), "x.json").jitter_call_s == pytest.approx(8e-3)
    assert profile_from_dict(dict(good, jitter=0.1), "x.json").jitter_call_s == 0.0
    with pytest.raises(ProfileError, match="'jitter_call_ms' must be a number > 0"):
        profile_from_dict(dict(good, jitter=0.1, jitter_call_ms=0), "x.json")
    for jitter, message in ((1.5, "'jitter' must be below 1"), (-0.1, "'jitter' must be a number >= 0")):
        with pytest.raises(ProfileError, match=message):
            profile_from_dict(dict(good, jitter=jitter), "x.json")
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="broken.json: not valid JSON"):
        load_profile(path)


def test_cluster_file_with_overrides(tmp_path):
    own = load_profile("rpi4").raw
    (tmp_path / "board.json").write_text(json.dumps(dict(own, name="board")))
    path = write(tmp_path, """
devices:
  - {name: pi-a, host: pi-a.local, port: 7700, profile: rpi3b}
  - {name: pi-b, host: pi-b.local, port: 7700, profile: rpi3b, memory_mb: 600}
  - {name: fast, profile: ./board.json, compute_scale: 3.0, latency_ms: 2}
link: {bandwidth_mbps: 100, latency_ms: 0.5}
""")
    cl = load_cluster(path)
    assert cl.names == ["pi-a", "pi-b", "fast"]
    a, b, fast = cl.devices
    assert (a.host, a.port, a.memory_bytes) == ("pi-a.local", 7700, load_profile("rpi3b").memory_bytes)
    assert b.memory_bytes == 600_000_000
    assert fast.profile.name == "board" and fast.compute_scale == 3.0
    assert a.bandwidth_bps == fast.bandwidth_bps == 100e6 / 8  # the cluster link overrides profiles
    assert a.latency_s == pytest.approx(0.5e-3) and fast.latency_s == pytest.approx(2e-3)  # a device overrides the link


@pytest.mark.parametrize("text, message", [
    ("devices:\n  - {name: a, profile: rpi7}\n", r"device 0 \(a\): profile: unknown profile 'rpi7'"),
    ("devices:\n  - {name: a}\n", r"device 0 \(a\): missing field 'profile'"),
    ("devices:\n  - {profile: rpi3b}\n", r"device 0: missing field 'name'"),
    ("devices:\n  - {name: a, profile: rpi3b}\n  - {name: b, profile: rpi3b, memory_mb: abc}\n",
     r"device 1 \(b\): memory_mb must be a positive number, got 'abc'"),
    ("devices:\n  - {name: a, profile: rpi3b, compute_scale: -2}\n", r"device 0 \(a\): compute_scale must be"),
    ("devices:\n  - {name: a, profile: rpi3b, cores: 4}\n", r"device 0 \(a\): unknown field 'cores'"),
    ("devices:\n  - {name: a, profile: rpi3b}\n  - {name: a, profile: rpi3b}\n", r"device 1 \(a\): the name is used twice"),
    ("devices:\n  - {name: a, profile: rpi3b}\nlink: {bandwidth_mbps: 0}\n", r"link: bandwidth_mbps must be"),
    ("devices:\n  - {name: a, profile: rpi3b, memory_mb: 10}\n", r"does not even hold the process"),
    ("devices: []\n", r"non-empty 'devices' list"),
    ("devices:\n  - {name: a, profile: rpi3b\n", r"cluster.yaml:\d+: not valid YAML"),
])
def test_cluster_errors_name_file_device_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ClusterError, match=message) as info:
        load_cluster(path)
    assert str(path) in str(info.value)


def test_missing_cluster_file(tmp_path):
    with pytest.raises(ClusterError, match="cannot read cluster file"):
        load_cluster(tmp_path / "nope.yaml")


def test_uniform_cluster_and_local_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("TILEC_PROFILE", "rpi4")
    prof = local_profile()
    assert prof.name == "rpi4"
    cl = uniform_cluster(prof, 3)
    assert cl.names == ["dev0", "dev1", "dev2"] and all(d.profile is prof for d in cl.devices)
    monkeypatch.delenv("TILEC_PROFILE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(ProfileError, match="run `tilec profile`"):
        local_profile(measure_if_missing=False)


def test_local_workers_share_the_machine_as_its_threads_do():
    """Processes on one machine compute at the per-thread speed its profile
    measured with all of their threads busy: 2 single-threaded workers of a
    machine whose conv runs 1.7x on 2 threads each run at 0.85 of alone."""
    prof = load_profile("rpi4")  # conv on 1..4 threads: its measured speed-ups
    for n, threads in ((2, 1), (4, 1), (2, 2), (3, 2)):
        busy = n * threads
        want = threads * prof.speedup("conv", busy) / busy / prof.speedup("conv", threads)
        cl = uniform_cluster(prof, n, threads=threads, shared=True)
        assert all(d.compute_scale == pytest.approx(want) and d.threads == threads for d in cl.devices)
        assert want < 1.0
    assert uniform_cluster(prof, 1, threads=4, shared=True).devices[0].compute_scale == 1.0  # one: alone
    assert uniform_cluster(prof, 3, threads=1).devices[0].compute_scale == 1.0  # separate machines


def test_local_workers_are_priced_as_measured_beside_each_other():
    """Where ``tilec profile`` measured local workers side by side (each
    kind's ``beside_others`` factor), workers that take every core are
    priced kind by kind by it, not by conv's thread speed-up; the plan's
    cluster reads that back; one core's baseline and workers with cores
    to spare are priced as before."""
    import copy
    from tilec.cluster import cluster_from_json
    from tilec.cost.compute import layer_seconds
    base = load_profile("rpi4")
    raw = copy.deepcopy(base.raw)
    raw["kernels"]["conv"]["forward"]["beside_others"] = 1.5
    raw["kernels"]["epilogue"]["backward"]["beside_others"] = 2.0
    prof = profile_from_dict(raw, "measured")
    assert prof.measured_beside_others and not base.measured_beside_others
    for n, threads in ((2, 2), (4, 1)):  # every one of the 4 cores busy
        dev = uniform_cluster(prof, n, threads=threads, shared=True).devices[0]
        assert dev.compute_scale == 1.0
        assert dev.profile.cost("conv", "forward").in_step == pytest.approx(1.5 * prof.cost("conv", "forward").in_step)
        assert dev.profile.cost("epilogue", "backward").in_step == pytest.approx(
            2.0 * prof.cost("epilogue", "backward").in_step)
        for kind, direction in (("conv", "backward"), ("epilogue", "forward"), ("maxpool", "forward")):
            assert dev.profile.cost(kind, direction) == prof.cost(kind, direction)
        assert dev.profile.alone().costs == prof.costs
    cluster = uniform_cluster(prof, 2, threads=2, shared=True)
    back = cluster_from_json(json.loads(json.dumps(cluster.to_json())))
    assert [d.profile.costs for d in back.devices] == [d.profile.costs for d in cluster.devices]
    layer = {"kind": "conv", "in_shape": [16, 52, 52], "out_shape": [32, 52, 52], "filters": 32, "size": 3,
             "stride": 1, "pad": 1, "bn": True, "act": "leaky"}
    alone = layer_seconds(prof, layer, 52 * 52, 1, 4, "forward", threads=2)
    assert layer_seconds(cluster.devices[0].profile, layer, 52 * 52, 1, 4, "forward", threads=2) > 1.3 * alone
    spare = uniform_cluster(prof, 2, threads=1, shared=True).devices[0]  # 2 of 4 cores: as before
    assert spare.profile is prof and spare.compute_scale < 1.0
    assert uniform_cluster(prof, 2, threads=2).devices[0].profile is prof  # separate machines


def test_a_stale_cached_profile_is_measured_again(monkeypatch, tmp_path, capsys):
    """A profile cached by an older tilec (another version) is not an error:
    this machine is measured again, and the new profile cached."""
    import json

    from tilec import profile_measure
    from tilec.cluster import local_profile_path
    from tilec.profiles import PROFILES_DIR
    monkeypatch.delenv("TILEC_PROFILE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = local_profile_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": "tilec-profile", "version": 1, "name": "old"}))
    fresh = json.loads((PROFILES_DIR / "rpi4.json").read_text())
    monkeypatch.setattr(profile_measure, "measure_profile", lambda quick: fresh)
    with pytest.raises(ProfileError, match="version 1"):
        local_profile(measure_if_missing=False)
    assert local_profile().name == "rpi4"
    assert "re-measuring this machine's profile" in capsys.readouterr().err
    assert json.loads(path.read_text())["version"] == fresh["version"]


def test_cluster_from_dict_validates_types():
    with pytest.raises(ClusterError, match="expected a mapping"):
        cluster_from_dict({"devices": ["pi"]}, "c.yaml")
    with pytest.raises(ClusterError, match="unknown field 'nodes'"):
        cluster_from_dict({"devices": [{"name": "a", "profile": "rpi3b"}], "nodes": 1}, "c.yaml")


def test_a_profile_measured_with_another_machine_or_kernels_is_measured_again(monkeypatch, tmp_path, capsys):
    import json

    from tilec import profile_measure
    from tilec.cluster import local_profile_path
    from tilec.profiles import PROFILES_DIR
    monkeypatch.delenv("TILEC_PROFILE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = profile_measure.fingerprint()
    old = json.loads((PROFILES_DIR / "rpi4.json").read_text())
    path = local_profile_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(dict(old, measured_with=dict(here, kernels="another"))))
    calls = []
    monkeypatch.setattr(profile_measure, "measure_profile",
                        lambda quick: calls.append(1) or dict(old, name="fresh", measured_with=here))
    assert local_profile().name == "fresh" and len(calls) == 1
    assert "measured with another machine, Python, numpy or kernels" in capsys.readouterr().err
    assert local_profile().name == "fresh" and len(calls) == 1  # now cached, with this machine's fingerprint
