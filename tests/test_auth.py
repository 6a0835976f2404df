"""Who may talk to a worker: the HMAC handshake in both directions, replay,
plans that differ, key loading, and a live worker that refuses strangers
(wrong key, garbage, fuzzed bytes) without allocating for them and goes on
serving."""
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tilec_runtime import auth
from tilec_runtime.auth import AuthError, handshake, load_key
from tilec_runtime.transport import FrameError, Kind, as_bytes, read_frame, send_frame, text_spec

KEY = b"k" * 32
OTHER = b"x" * 32


def both_sides(key_a, key_b, plan_a="", plan_b="", role="launcher"):
    """Run a handshake over a socket pair; returns (initiator, acceptor)
    outcomes: the other side's hello, or the exception."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    out = [None, None]

    def side(i, sock, key, plan, initiator):
        try:
            out[i] = handshake(sock, key, role=role if initiator else "worker", ident=str(i), plan=plan,
                               initiator=initiator)
        except Exception as exc:  # noqa: BLE001 - returned to the test
            out[i] = exc
        finally:
            if isinstance(out[i], Exception):
                sock.close()
    t = threading.Thread(target=side, args=(1, b, key_b, plan_b, False))
    t.start()
    side(0, a, key_a, plan_a, True)
    t.join(10)
    a.close()
    b.close()
    return out


def test_same_key_authenticates_both_sides():
    init, acc = both_sides(KEY, KEY)
    assert init["role"] == "worker" and init["id"] == "1"
    assert acc["role"] == "launcher" and acc["id"] == "0"


def test_wrong_key_is_refused_with_a_reason():
    init, acc = both_sides(OTHER, KEY)
    assert isinstance(acc, AuthError) and "wrong cluster key" in str(acc)
    assert isinstance(init, AuthError) and "refused: wrong cluster key" in str(init)


def test_acceptor_without_the_key_is_caught_by_the_initiator():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)

    def impostor():
        read_frame(b, lambda *k: auth._HELLO[Kind.HELLO])
        send_frame(b, Kind.HELLO, 0, 0, as_bytes({"role": "worker", "id": "w", "plan": "", "nonce": "00" * 32,
                                                  "mac": {"blake2b": 1.0}}))
        read_frame(b, lambda *k: auth._PROOF[Kind.PROOF])
        send_frame(b, Kind.PROOF, 0, 0, as_bytes("y" * 32))  # cannot compute the MAC
    t = threading.Thread(target=impostor)
    t.start()
    with pytest.raises(AuthError, match="does not hold the cluster key"):
        handshake(a, KEY, role="launcher", ident="l", initiator=True)
    t.join(5)
    a.close()
    b.close()


def test_a_recorded_proof_does_not_open_a_new_session(monkeypatch):
    """Replay: the acceptor's fresh nonce makes an old PROOF worthless."""
    recorded = {}
    a, b = socket.socketpair()

    def acceptor(sock, result):
        sock.settimeout(5)
        try:
            result.append(handshake(sock, KEY, role="worker", ident="w", initiator=False))
        except Exception as exc:  # noqa: BLE001
            result.append(exc)

    # an honest session, with the initiator's frames recorded on the way
    result = []
    t = threading.Thread(target=acceptor, args=(b, result))
    t.start()
    a.settimeout(5)
    original = send_frame

    def recording(sock, kind, step, tensor, array=None):
        recorded[kind] = array
        original(sock, kind, step, tensor, array)
    with monkeypatch.context() as m:
        m.setattr(auth, "send_frame", recording)
        handshake(a, KEY, role="launcher", ident="l", initiator=True)
    t.join(5)
    assert not isinstance(result[0], Exception)
    # the attacker replays the recorded HELLO and PROOF into a new session
    c, d = socket.socketpair()
    result = []
    t = threading.Thread(target=acceptor, args=(d, result))
    t.start()
    send_frame(c, Kind.HELLO, 0, 0, recorded[Kind.HELLO])
    c.settimeout(5)
    read_frame(c, lambda *k: auth._HELLO[Kind.HELLO])
    send_frame(c, Kind.PROOF, 0, 0, recorded[Kind.PROOF])
    t.join(5)
    assert isinstance(result[0], AuthError) and "wrong cluster key" in str(result[0])
    for s in (a, b, c, d):
        s.close()


def test_devices_with_different_plans_refuse_each_other():
    init, acc = both_sides(KEY, KEY, plan_a="a" * 64, plan_b="b" * 64, role="peer")
    for outcome in (init, acc):
        assert isinstance(outcome, AuthError) and "another plan" in str(outcome)
    init, acc = both_sides(KEY, KEY, plan_a="a" * 64, plan_b="a" * 64, role="peer")
    assert init["plan"] == acc["plan"] == "a" * 64


def test_load_key(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b"  0123456789abcdef0123\n")
    assert load_key(str(path), environ={}) == b"0123456789abcdef0123"
    assert load_key(None, environ={"TILEC_KEY": "fedcba9876543210xx"}) == b"fedcba9876543210xx"
    with pytest.raises(AuthError, match="no cluster key"):
        load_key(None, environ={})
    with pytest.raises(AuthError, match="at least 16"):
        load_key(None, environ={"TILEC_KEY": "short"})
    with pytest.raises(AuthError, match="cannot read key file"):
        load_key(str(tmp_path / "missing"), environ={})


# -- a live worker -------------------------------------------------------------------


def vm_hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_bytes(KEY)
    proc = subprocess.Popen([sys.executable, "-m", "tilec_runtime.worker", "--listen", "127.0.0.1:0",
                             "--key-file", str(key_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    try:
        line = proc.stdout.readline().decode()
        assert line.startswith("tilec worker listening on"), line
        host, _, port = line.split()[-1].rpartition(":")
        yield proc, (host, int(port))
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def connect(address):
    sock = socket.create_connection(address, timeout=5)
    sock.settimeout(5)
    return sock


def assert_dropped(sock):
    """The worker closed the connection without sending anything back."""
    try:
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    except (ConnectionResetError, OSError):
        pass


def assert_serving(proc, address):
    assert proc.poll() is None
    with connect(address) as sock:
        hello = handshake(sock, KEY, role="launcher", ident="test", initiator=True)
    assert hello["role"] == "worker"


def test_worker_refuses_the_wrong_key_and_keeps_serving(worker):
    proc, address = worker
    for _ in range(3):
        with connect(address) as sock, pytest.raises(AuthError, match="refused: wrong cluster key"):
            handshake(sock, OTHER, role="launcher", ident="intruder", initiator=True)
    assert_serving(proc, address)


def test_worker_survives_garbage_and_huge_claims(worker):
    proc, address = worker
    before = vm_hwm(proc.pid)
    from tilec_runtime.transport import HEADER, MAGIC, VERSION
    huge = HEADER.pack(MAGIC, VERSION, Kind.HELLO, 0, 1, 0, 0, 1 << 31, 0, 0, 0, 1 << 31)
    for payload in (b"GET / HTTP/1.0\r\n\r\n", huge, huge + b"x" * 1000, b"\0" * 39):
        with connect(address) as sock:
            sock.sendall(payload)
            assert_dropped(sock)
    # an authenticated client that then sends a job far beyond the limit
    with connect(address) as sock:
        handshake(sock, KEY, role="launcher", ident="test", initiator=True)
        sock.sendall(HEADER.pack(MAGIC, VERSION, Kind.JOB, 0, 1, 0, 0, 1 << 30, 0, 0, 0, 1 << 30))
        assert_dropped(sock)
    assert_serving(proc, address)
    assert vm_hwm(proc.pid) - before < 8 << 20


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), after_auth=st.booleans())
def test_fuzzed_connections_never_take_the_worker_down(worker, data, after_auth):
    proc, address = worker
    with connect(address) as sock:
        if after_auth:
            handshake(sock, KEY, role="launcher", ident="fuzz", initiator=True)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        except OSError:
            pass  # reset by the worker: fine
    assert proc.poll() is None


def test_worker_is_still_healthy_after_fuzzing(worker):
    proc, address = worker
    time.sleep(0.1)
    assert_serving(proc, address)
    assert vm_hwm(proc.pid) < 200 << 20


# -- every frame after the handshake is authenticated ------------------------------------------


def channels():
    """Both ends of an authenticated connection (a real handshake over a socket pair)."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    out = [None, None]

    def side(i, sock, initiator):
        out[i] = handshake(sock, KEY, role="launcher" if initiator else "worker", ident=str(i),
                           initiator=initiator).channel
    threads = [threading.Thread(target=side, args=(0, a, True)), threading.Thread(target=side, args=(1, b, False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def tampered(frames, flip):
    """The bytes a channel writes for ``frames`` (arrays), with byte ``flip``
    (an offset into that stream) changed on the way."""
    sender, receiver = channels()
    raw = []
    with sender.sock, receiver.sock:
        for array in frames:
            send_frame(sender, Kind.METRICS, 1, 0, array)
        sender.sock.shutdown(socket.SHUT_WR)
        while chunk := receiver.sock.recv(1 << 16):
            raw.append(chunk)
    data = bytearray(b"".join(raw))
    if flip is not None:
        data[flip] ^= 0x01
    return bytes(data), receiver


def read_all(data, receiver, n):
    """Feed ``data`` to ``receiver``'s side and read ``n`` frames."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        receiver.sock = b
        return [read_frame(receiver, lambda kind, step, tensor: text_spec(1 << 16)) for _ in range(n)]


FRAMES = [as_bytes({"step": i, "loss": 1.5 * i}) for i in range(3)]


def test_authenticated_frames_arrive_intact():
    data, receiver = tampered(FRAMES, None)
    got = read_all(data, receiver, 3)
    assert [f.json() for f in got] == [{"step": i, "loss": 1.5 * i} for i in range(3)]


@pytest.mark.parametrize("where", ["header", "payload", "tag"])
def test_a_flipped_byte_after_the_handshake_is_refused(where):
    """One byte of the second frame changed on the way: the first frame
    passes, the second is refused before anything reads it."""
    first = 40 + len(FRAMES[0]) + 16
    offset = {"header": first + 9, "payload": first + 40 + 3, "tag": first + 40 + len(FRAMES[1]) + 5}[where]
    data, receiver = tampered(FRAMES, offset)
    with pytest.raises(FrameError, match="failed authentication|frame|shape|claims"):
        read_all(data, receiver, 3)
    data, receiver = tampered(FRAMES, offset)
    assert read_all(data, receiver, 1)[0].json() == {"step": 0, "loss": 0.0}


def test_a_replayed_or_reordered_frame_is_refused():
    data, receiver = tampered(FRAMES, None)
    size = 40 + len(FRAMES[0]) + 16
    replay = data[:size] + data[:size]  # the first frame twice
    with pytest.raises(FrameError, match="failed authentication"):
        read_all(replay, receiver, 2)
    data, receiver = tampered(FRAMES[:2], None)
    second = data[size:]
    with pytest.raises(FrameError, match="failed authentication"):
        read_all(second + data[:size], receiver, 1)  # the second frame first


def test_a_reflected_frame_is_refused():
    """A frame sent back to its sender does not verify: each direction has its own key."""
    sender, receiver = channels()
    with sender.sock, receiver.sock:
        send_frame(sender, Kind.METRICS, 1, 0, FRAMES[0])
        raw = receiver.sock.recv(1 << 16)
        a, b = socket.socketpair()
        with a, b:
            a.sendall(raw)
            sender.sock = b
            with pytest.raises(FrameError, match="failed authentication"):
                read_frame(sender, lambda kind, step, tensor: text_spec(1 << 16))


def test_a_tampered_frame_stops_the_job_with_one_line_naming_the_peer():
    """Over a Link (a device's connection in use): the fault names the peer."""
    from tilec_runtime.transport import Link, Mailbox
    data, receiver = tampered(FRAMES, 40 + len(FRAMES[0]) + 16 + 45)
    a, b = socket.socketpair()
    mailbox = Mailbox()
    with a:
        a.sendall(data)
        receiver.sock = b
        link = Link(receiver, 3, mailbox, lambda kind, step, tensor: text_spec(1 << 16))
        deadline = time.monotonic() + 10
        while mailbox.fault is None and time.monotonic() < deadline:
            time.sleep(0.01)
        link.close(0.5)
    assert mailbox.fault is not None and mailbox.fault.peer == 3
    assert "sent an invalid frame" in mailbox.fault.reason and "\n" not in mailbox.fault.reason


def test_both_ends_agree_on_the_mac_their_slower_end_runs_fastest():
    """Each end says in its HELLO how fast it runs each MAC; both pick the one
    whose slower end is quicker, so a fast x86 and a Pi agree on BLAKE2b."""
    assert auth.choose_mac({"blake2b": 600, "sha256": 1700}, {"blake2b": 120, "sha256": 60}) == "blake2b"
    assert auth.choose_mac({"blake2b": 600, "sha256": 1700}, {"blake2b": 600, "sha256": 1700}) == "sha256"
    assert auth.choose_mac({"blake2b": 600}, {"blake2b": 100, "sha256": 900}) == "blake2b"  # an older end
    init, acc = both_sides(KEY, KEY)
    assert init.channel.mac == acc.channel.mac == auth.choose_mac(auth.mac_speeds(), auth.mac_speeds())
