"""Three devices on a real (virtual) network: one network namespace each,
joined by veth pairs to a bridge in a fourth namespace, link-local
169.254.77.x addresses, every device's uplink rate-limited with
`tc qdisc ... tbf`. This kernel has no netem, so latency and loss come
from a small fault-injecting TCP shim in front of each worker (run from
this file: ``python test_netns.py shim ...``): it delays every chunk and
holds back a random few for a retransmission timeout, as a lost segment
would.

- `tilec train --cluster` over that network trains to the weights of one
  device (float64, 1e-10);
- a device whose link goes down mid-training (no FIN, no RST: silence) is
  named by the others within the receive timeout.

Everything is made and removed by the test. It needs root (CI runs as
root); it is skipped, with the reason, only where namespaces are refused.
"""
import os
import random
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = f"tlc{os.getpid() % 100000}"
SUBNET = "169.254.77"
WORKER_PORT, SHIM_PORT = 7700, 7701
KEY = "netns-test-cluster-key-0123456789"
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1")


def sh(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def network():
    """Namespaces ns0..ns2 on a bridge; yields their names."""
    names = [f"{PREFIX}-{i}" for i in range(3)]
    switch = f"{PREFIX}-sw"
    made = []
    try:
        try:
            sh("ip", "netns", "add", switch)
        except (subprocess.CalledProcessError, FileNotFoundError, PermissionError) as exc:
            pytest.skip(f"network namespaces are not allowed here: {getattr(exc, 'stderr', '') or exc}")
        made.append(switch)
        sh("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", switch, "link", "set", "br0", "up")
        for i, ns in enumerate(names):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"port{i}", "netns", switch)
            sh("ip", "-n", switch, "link", "set", f"port{i}", "master", "br0")
            sh("ip", "-n", switch, "link", "set", f"port{i}", "up")
            sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # a 200 Mbit/s uplink per device
            sh("tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "200mbit", "burst", "64kb",
               "latency", "100ms")
        yield names
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def cluster(network, tmp_path):
    """A worker and its shim in each namespace; yields (names, cluster file, key file)."""
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    procs = []
    try:
        for i, ns in enumerate(network):
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "tilec_runtime.worker",
                 "--listen", f"127.0.0.1:{WORKER_PORT}", "--key-file", str(key_file)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV))
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, __file__, "shim", f"{SUBNET}.{i + 1}:{SHIM_PORT}",
                 f"127.0.0.1:{WORKER_PORT}", str(i)], stdout=subprocess.PIPE, text=True, env=ENV))
        for p in procs:
            assert p.stdout.readline().strip(), "a worker or shim did not start"
        lines = ["devices:"] + [f"  - {{name: d{i}, host: {SUBNET}.{i + 1}, port: {SHIM_PORT}, profile: rpi3b}}"
                                for i in range(len(network))]
        path = tmp_path / "cluster.yaml"
        path.write_text("\n".join(lines) + "\n")
        yield network, path, key_file
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()


def train_in(ns, *args, timeout=120):
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tilec.cli", "train", "tiny", *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


COMMON = ["--steps", "3", "--batch", "4", "--dtype", "float64", "--groups", "all"]


def test_cluster_over_rate_limited_lossy_links_equals_one_device(cluster, tmp_path):
    names, path, key_file = cluster
    got = train_in(names[0], *COMMON, "--cluster", str(path), "--key-file", str(key_file), "--timeout", "30",
                   "--save-weights", str(tmp_path / "cluster.npz"))
    assert got.returncode == 0, got.stderr
    one = subprocess.run([sys.executable, "-m", "tilec.cli", "train", "tiny", *COMMON, "--save-weights",
                          str(tmp_path / "one.npz")], capture_output=True, text=True, timeout=120, env=ENV)
    assert one.returncode == 0, one.stderr
    with np.load(tmp_path / "cluster.npz") as a, np.load(tmp_path / "one.npz") as b:
        for key in b.files:
            scale = max(np.abs(b[key]).max(), 1.0)
            assert np.abs(a[key] - b[key]).max() / scale < 1e-10, key


def test_a_device_cut_off_is_named_within_the_timeout(cluster, tmp_path):
    names, path, key_file = cluster
    metrics = tmp_path / "m.jsonl"
    proc = subprocess.Popen(["ip", "netns", "exec", names[0], sys.executable, "-m", "tilec.cli", "train", "tiny",
                             "--steps", "500", "--batch", "4", "--groups", "all", "--cluster", str(path),
                             "--key-file", str(key_file),
                             "--timeout", "3", "--metrics", str(metrics)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 4):
            time.sleep(0.02)
        sh("ip", "-n", names[2], "link", "set", "eth0", "down")
        cut = time.monotonic()
        _, err = proc.communicate(timeout=60)
        seconds = time.monotonic() - cut
    finally:
        proc.kill()
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tilec: error: device 2 (d2) sent nothing for"), err
    assert "at step" in lines[0]
    assert seconds < 3 * 4 + 10  # the receive timeout (plus its deadlock guard), not forever


# -- the fault-injecting shim ------------------------------------------------------------

DELAY = 0.001  # seconds added to every chunk
LOSS = 0.02  # chance that a chunk is held back, as a lost segment would be
RTO = 0.2  # Linux's minimum retransmission timeout


def pump(src, dst, rng):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            time.sleep(DELAY + (RTO if rng.random() < LOSS else 0.0))
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def shim(listen, target, seed):
    """Forward ``listen`` to ``target``, with delay and loss, until killed."""
    host, port = listen.rsplit(":", 1)
    server = socket.create_server((host, int(port)))
    print("shim ready", flush=True)
    rng = random.Random(int(seed))
    while True:
        client, _ = server.accept()
        thost, tport = target.rsplit(":", 1)
        upstream = socket.create_connection((thost, int(tport)))
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b, random.Random(rng.random())), daemon=True).start()


if __name__ == "__main__" and sys.argv[1:2] == ["shim"]:
    shim(*sys.argv[2:5])
