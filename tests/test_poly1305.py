"""Frame MACs: Poly1305 from OpenSSL against a pure-Python ChaCha20-Poly1305
(RFC 8439), itself checked against the RFC's test vectors; and every MAC a
channel may run refuses a changed frame."""
import socket
import struct
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilec_runtime import poly1305
from tilec_runtime.transport import MACS, Channel, FrameError, Kind, Spec, read_frame, send_frame

M32 = 0xFFFFFFFF


def _rotl(v, c):
    return ((v << c) & M32) | (v >> (32 - c))


def _quarter(s, a, b, c, d):
    s[a] = (s[a] + s[b]) & M32
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & M32
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & M32
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & M32
    s[b] = _rotl(s[b] ^ s[c], 7)


def chacha20_block(key, counter, nonce):
    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *struct.unpack("<8I", key), counter,
             *struct.unpack("<3I", nonce)]
    w = list(state)
    for _ in range(10):
        for a, b, c, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                           (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
            _quarter(w, a, b, c, d)
    return struct.pack("<16I", *((x + y) & M32 for x, y in zip(w, state)))


def poly1305_tag(key, message):
    r = int.from_bytes(key[:16], "little") & 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
    s = int.from_bytes(key[16:], "little")
    p, acc = (1 << 130) - 5, 0
    for i in range(0, len(message), 16):
        acc = (acc + int.from_bytes(message[i:i + 16] + b"\x01", "little")) * r % p
    return ((acc + s) & ((1 << 128) - 1)).to_bytes(16, "little")


def aead_tag(key, nonce, aad, ciphertext=b""):
    def pad(b):
        return b + bytes(-len(b) % 16)
    one_time = chacha20_block(key, 0, nonce)[:32]
    return poly1305_tag(one_time, pad(aad) + pad(ciphertext) + struct.pack("<QQ", len(aad), len(ciphertext)))


def chacha20_encrypt(key, counter, nonce, plaintext):
    out = bytearray()
    for j in range(0, len(plaintext), 64):
        stream = chacha20_block(key, counter + j // 64, nonce)
        out += bytes(x ^ y for x, y in zip(plaintext[j:j + 64], stream))
    return bytes(out)


def test_the_reference_matches_rfc_8439():
    # 2.5.2: Poly1305
    key = bytes.fromhex("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")
    assert poly1305_tag(key, b"Cryptographic Forum Research Group").hex() == "a8061dc1305136c6c22b8baf0c0127a9"
    # 2.8.2: the AEAD
    key = bytes(range(0x80, 0xA0))
    nonce = bytes.fromhex("070000004041424344454647")
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    text = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
            b"sunscreen would be it.")
    cipher = chacha20_encrypt(key, 1, nonce, text)
    assert cipher[:16].hex() == "d31a8d34648e60db7b86afbc53ef7ec2"
    assert aead_tag(key, nonce, aad, cipher).hex() == "1ae10b594f09e26a7e902ecbd0600691"


needs_openssl = pytest.mark.skipif(not poly1305.available(), reason="this system's OpenSSL has no ChaCha20-Poly1305")


@needs_openssl
@settings(max_examples=40, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), frames=st.lists(
    st.tuples(st.integers(0, 2 ** 64 - 1), st.lists(st.binary(max_size=300), max_size=4)), min_size=1, max_size=4))
def test_openssl_tags_equal_the_reference(key, frames):
    """Each frame's tag, fed in pieces of any size, and on contexts that the
    key takes back and reuses frame after frame."""
    k = poly1305.Key(key)
    for seq, pieces in frames:
        mac = k.frame(seq)
        for i, piece in enumerate(pieces):
            mac.update(piece if i % 2 else memoryview(np.frombuffer(piece, np.uint8)))
        nonce = bytes(4) + seq.to_bytes(8, "big")
        assert mac.digest() == aead_tag(key, nonce, b"".join(pieces))
    assert len(k.pool) == 1


@needs_openssl
def test_frames_hashed_at_once_take_contexts_of_their_own():
    k = poly1305.Key(bytes(range(32)))
    a, b = k.frame(1), k.frame(2)
    a.update(b"first")
    b.update(b"second")
    assert a.digest() == aead_tag(k.key, bytes(4) + (1).to_bytes(8, "big"), b"first")
    assert b.digest() == aead_tag(k.key, bytes(4) + (2).to_bytes(8, "big"), b"second")
    assert len(k.pool) == 2


def frame_stream(mac, arrays):
    """The bytes a channel of ``mac`` writes for ``arrays``."""
    a, b = socket.socketpair()
    raw = bytearray()

    def drain():
        while chunk := b.recv(1 << 20):
            raw.extend(chunk)
    reader = threading.Thread(target=drain)
    reader.start()
    with a:
        tx = Channel(a, b"k" * 32, b"j" * 32, mac)
        for t, x in enumerate(arrays):
            send_frame(tx, Kind.FWD, 1, t, x)
        a.shutdown(socket.SHUT_WR)
        reader.join(10)
    b.close()
    return raw


@pytest.mark.parametrize("mac", MACS)
@pytest.mark.parametrize("flip", [None, 7, 45, -3])
def test_every_mac_refuses_a_changed_frame(mac, flip):
    """A channel of each MAC this system offers: frames (a long one in
    pieces) arrive whole, and one changed byte of the first (header,
    payload) or of the last (its tag) is refused."""
    arrays = [np.arange(5, dtype=np.float64), np.arange(40000, dtype=np.float32)]
    raw = frame_stream(mac, arrays)
    if flip is not None:
        raw[flip] ^= 1
    a, b = socket.socketpair()
    with a, b:
        rx = Channel(b, b"j" * 32, b"k" * 32, mac)
        writer = threading.Thread(target=a.sendall, args=(bytes(raw),))
        writer.start()

        def spec(kind, step, tensor):
            return Spec(arrays[tensor].dtype, arrays[tensor].shape)
        if flip is None:
            got = [read_frame(rx, spec) for _ in arrays]
            assert all(np.array_equal(f.array, x) for f, x in zip(got, arrays))
        else:
            with pytest.raises(FrameError):
                for _ in arrays:
                    read_frame(rx, spec)
        a.shutdown(socket.SHUT_WR)
        writer.join(10)
