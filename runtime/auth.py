"""Mutual authentication at connect: HMAC-SHA256 challenge-response.

Every device of a cluster holds the same secret key (``--key-file`` or the
``TILEC_KEY`` environment variable). On each new connection::

    initiator -> acceptor   HELLO  {role, id, plan hash, 32-byte nonce, MAC speeds}
    acceptor  -> initiator  HELLO  {role, id, plan hash, 32-byte nonce, MAC speeds}
    initiator -> acceptor   PROOF  HMAC(key, "initiator" | transcript)
    acceptor  -> initiator  PROOF  HMAC(key, "acceptor"  | transcript)
                         or REFUSE "wrong cluster key"

where the transcript is the SHA-256 of both HELLO payloads. Fresh nonces
on both sides defeat replay, the role labels defeat reflection, and the
acceptor proves nothing before the initiator has proved the key. Between
two devices of a job the plan hashes (part of the authenticated transcript)
must then agree, so devices with different plans refuse to work together.

The handshake also derives this connection's session key (an HMAC of the
transcript), and from it one key per direction: every later frame carries
a MAC under the sender's key and a sequence number (``transport.Channel``),
so a frame changed, replayed, reordered or reflected on the way is refused.
The MAC is keyed BLAKE2b, HMAC-SHA256 or Poly1305 (``poly1305``, where
OpenSSL has it), whichever both ends run faster (each says how fast in its
HELLO, which the transcript covers).
Every frame is also still validated against the plan.
"""
import hashlib
import hmac
import os
import secrets
import time

import numpy as np

from tilec_runtime.errors import RuntimeFault
from tilec_runtime.transport import (BYTES, MACS, Channel, Kind, Spec, as_bytes, frame_mac, new_mac, read_expected,
                                     send_frame, text_spec)

MIN_KEY_BYTES = 16
NONCE_BYTES = 32
PROTOCOL = b"tilec-auth-1"
ROLES = ("launcher", "peer", "worker")
_SPEEDS = {}
_HELLO = {Kind.HELLO: Spec(BYTES, (512,), True), Kind.REFUSE: text_spec(256)}
_PROOF = {Kind.PROOF: Spec(BYTES, (32,)), Kind.REFUSE: text_spec(256)}


class AuthError(RuntimeFault):
    """The other side does not hold the cluster key, or has another plan."""


def load_key(key_file=None, environ=None):
    """The cluster key: the contents of ``key_file`` (surrounding whitespace
    stripped), else ``$TILEC_KEY``. At least 16 bytes."""
    environ = os.environ if environ is None else environ
    if key_file:
        try:
            with open(key_file, "rb") as f:
                key = f.read().strip()
        except OSError as exc:
            raise AuthError(f"cannot read key file {key_file}: {exc.strerror or exc}") from None
        where = key_file
    elif environ.get("TILEC_KEY"):
        key, where = environ["TILEC_KEY"].strip().encode(), "TILEC_KEY"
    else:
        raise AuthError("no cluster key: pass --key-file FILE or set TILEC_KEY")
    if len(key) < MIN_KEY_BYTES:
        raise AuthError(f"the cluster key in {where} is {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key


def new_key():
    """A fresh random key (hex text), for a cluster made on this machine."""
    return secrets.token_hex(32)


class Hello(dict):
    """What the other side said about itself: role, id, plan (hash or ""),
    and ``channel``: the connection, its frames authenticated from now on."""


def _mac(key, label, transcript):
    return hmac.new(key, PROTOCOL + b" " + label + b" " + transcript, hashlib.sha256).digest()


def _parse_hello(frame):
    if frame.kind == Kind.REFUSE:
        raise AuthError(f"refused: {frame.text()}")
    hello = frame.json()
    if not (isinstance(hello, dict) and hello.get("role") in ROLES and isinstance(hello.get("id"), str)
            and isinstance(hello.get("plan"), str) and isinstance(hello.get("nonce"), str)
            and len(hello["nonce"]) == 2 * NONCE_BYTES and isinstance(hello.get("mac"), dict)
            and all(isinstance(v, (int, float)) for v in hello["mac"].values())):
        raise AuthError("malformed HELLO")
    return Hello(hello)


def handshake(sock, key, *, role, ident, plan="", initiator):
    """Authenticate both ends of ``sock`` (which should have a timeout).
    Returns the other side's ``Hello``; raises AuthError (after telling the
    other side why, where that is safe) or a transport error."""
    # one reading for both the HELLO and the choice below, so this end picks
    # from the very speeds the other end saw
    speeds = mac_speeds()
    mine = as_bytes({"role": role, "id": str(ident), "plan": plan, "nonce": secrets.token_hex(NONCE_BYTES),
                     "mac": speeds})
    if initiator:
        send_frame(sock, Kind.HELLO, 0, 0, mine)
        frame = read_expected(sock, _HELLO)
        theirs = _parse_hello(frame)
        transcript = hashlib.sha256(mine.tobytes() + frame.array.tobytes()).digest()
        send_frame(sock, Kind.PROOF, 0, 0, as_mac(_mac(key, b"initiator", transcript)))
        proof = read_expected(sock, _PROOF)
        if proof.kind == Kind.REFUSE:
            raise AuthError(f"refused: {proof.text()}")
        if not hmac.compare_digest(proof.array.tobytes(), _mac(key, b"acceptor", transcript)):
            raise AuthError("the other side does not hold the cluster key")
    else:
        frame = read_expected(sock, _HELLO)
        theirs = _parse_hello(frame)
        send_frame(sock, Kind.HELLO, 0, 0, mine)
        transcript = hashlib.sha256(frame.array.tobytes() + mine.tobytes()).digest()
        proof = read_expected(sock, _PROOF)
        if proof.kind == Kind.REFUSE:
            raise AuthError(f"refused: {proof.text()}")
        if not hmac.compare_digest(proof.array.tobytes(), _mac(key, b"initiator", transcript)):
            send_frame(sock, Kind.REFUSE, 0, 0, as_bytes("wrong cluster key"))
            raise AuthError("wrong cluster key")
        send_frame(sock, Kind.PROOF, 0, 0, as_mac(_mac(key, b"acceptor", transcript)))
    # a device joining a job (role "peer") must have the acceptor's plan
    if (role if initiator else theirs["role"]) == "peer" and theirs["plan"] != plan:
        raise AuthError(f"{theirs['role']} {theirs['id']} has another plan ({theirs['plan'][:12] or 'none'}, "
                        f"here {plan[:12] or 'none'})")
    session = _mac(key, b"session", transcript)
    keys = {side: hmac.new(session, side, hashlib.sha256).digest() for side in (b"initiator", b"acceptor")}
    mine_key, their_key = (b"initiator", b"acceptor") if initiator else (b"acceptor", b"initiator")
    theirs.channel = Channel(sock, keys[mine_key], keys[their_key], choose_mac(speeds, theirs["mac"]))
    return theirs


def mac_speeds():
    """{algorithm: MB/s} of each frame MAC on this machine (measured once):
    SHA-256 runs on the CPU's SHA instructions where it has them (x86,
    newer Arm), many times faster than BLAKE2b; without them (a Raspberry Pi
    3 or 4) BLAKE2b is the faster. Poly1305, where this system's OpenSSL
    has it, runs on the vector units and is faster than both (5x HMAC-SHA256
    on this project's machine)."""
    global _SPEEDS
    if not _SPEEDS:
        # measured into a local dict and published whole: handshakes run on
        # parallel threads, and one must never read a half-filled table
        data, speeds = bytes(1 << 18), {}
        for name in MACS:
            best = min(_time_mac(name, data) for _ in range(3))
            speeds[name] = round(len(data) / max(best, 1e-9) / 1e6, 1)
        _SPEEDS = speeds
    return dict(_SPEEDS)


def _time_mac(name, data):
    t0 = time.perf_counter()
    h = frame_mac(new_mac(name, bytes(32)), 0)
    h.update(data)
    h.digest()
    return time.perf_counter() - t0


def choose_mac(mine, theirs):
    """The MAC both ends run fastest: the one whose slower end is quicker
    (both ends compute the same answer from the two HELLOs)."""
    return max(MACS, key=lambda name: (min(mine.get(name, 0), theirs.get(name, 0)), name))


def as_mac(digest):
    return np.frombuffer(digest, BYTES)
