"""Frame MACs from the system's OpenSSL: Poly1305 under ChaCha20 one-time keys.

This is the ChaCha20-Poly1305 AEAD of RFC 8439 with the whole frame as its
associated data and nothing to encrypt: the tag is Poly1305 of the frame
under a one-time key that ChaCha20 makes from the direction's key and a
96-bit nonce, here the frame's sequence number (never repeated under one
key: every connection and direction has keys of its own from the
handshake, and numbers its frames from 0). OpenSSL runs it with the CPU's
vector units, about 5x HMAC-SHA256 with SHA instructions and 9x keyed
BLAKE2b on this project's x86 machine, and ahead of both on an Arm core
without crypto extensions (a Raspberry Pi 3 or 4). A frame of a step's
halo or channel exchange is 40-170 KB, so the MAC is a few percent of a
single-core device's step under HMAC-SHA256 and a fraction of one here.

The library is the libcrypto that Python's own ``hashlib`` loaded (found in
``/proc/self/maps``), else whatever ``ctypes.util`` finds; ``available()`` is
false without one that has ChaCha20-Poly1305, and ``auth`` then never offers
this MAC in a handshake. Only ``ctypes`` and numpy: nothing to build.
"""
import ctypes
import functools
import importlib

import numpy as np

NAME = "poly1305"
KEY_BYTES = 32
TAG_BYTES = 16
_GET_TAG = 0x10  # EVP_CTRL_AEAD_GET_TAG


@functools.lru_cache(maxsize=None)
def _library():
    """libcrypto with its EVP functions typed, or None."""
    for path in _candidates():
        try:
            lib = ctypes.PyDLL(path)  # (holds the GIL: a call takes microseconds, a GIL hand-off more)
            cipher = lib.EVP_chacha20_poly1305
        except (OSError, AttributeError):
            continue
        cipher.restype = ctypes.c_void_p
        cipher.argtypes = []
        lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
        lib.EVP_CIPHER_CTX_new.argtypes = []
        lib.EVP_CIPHER_CTX_free.restype = None
        lib.EVP_CIPHER_CTX_free.argtypes = [ctypes.c_void_p]
        lib.EVP_EncryptInit_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p,
                                           ctypes.c_char_p]
        lib.EVP_EncryptUpdate.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                                          ctypes.c_void_p, ctypes.c_int]
        lib.EVP_EncryptFinal_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
        lib.EVP_CIPHER_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        if cipher():
            return lib
    return None


def _candidates():
    """Paths to try, in order: the libcrypto hashlib loaded, the usual
    names, then what ``ctypes.util`` finds (last: it may run ``ldconfig``)."""
    try:
        importlib.import_module("_hashlib")  # (loads the libcrypto that hashlib uses)
        with open("/proc/self/maps") as maps:
            yield from dict.fromkeys(line.split()[-1] for line in maps if "/libcrypto.so" in line)
    except (ImportError, OSError):
        pass
    yield from ("libcrypto.so.3", "libcrypto.so.1.1")
    import ctypes.util  # (here: importing it takes 8 ms, every process of the runtime would pay)
    found = ctypes.util.find_library("crypto")
    if found:
        yield found


def _check(result, what):
    if result != 1:
        raise RuntimeError(f"OpenSSL {what} failed")


def available():
    return _library() is not None


class Key:
    """One direction's key; ``frame(seq)`` starts the MAC of frame ``seq``.

    OpenSSL contexts are kept for reuse (a frame's returns to the pool at
    its ``digest``): making one and setting its cipher and key took most of
    a small frame's MAC (batch-norm statistics: 8 us of 9 here); a kept one
    only takes the next nonce. A pool, not one context: a frame may be
    started while another one's pieces are still being hashed."""

    def __init__(self, key):
        key = bytes(key)
        if len(key) != KEY_BYTES:
            raise ValueError(f"a Poly1305 frame key has {KEY_BYTES} bytes, got {len(key)}")
        self.lib = _library()
        if self.lib is None:
            raise RuntimeError("this system's OpenSSL has no ChaCha20-Poly1305")
        self.key = key
        self.pool = []  # idle contexts, keyed (list.pop and append are atomic)

    def frame(self, seq):
        nonce = bytes(4) + int(seq).to_bytes(8, "big")
        try:
            ctx = self.pool.pop()
        except IndexError:
            ctx = _Context(self.lib)
            _check(self.lib.EVP_EncryptInit_ex(ctx.ctx, self.lib.EVP_chacha20_poly1305(), None, self.key, nonce),
                   "EncryptInit")
        else:
            _check(self.lib.EVP_EncryptInit_ex(ctx.ctx, None, None, None, nonce), "EncryptInit")
        return FrameMac(self, ctx)


class _Context:
    """An OpenSSL cipher context and the buffers its calls fill."""

    def __init__(self, lib):
        self.lib, self.ctx = lib, lib.EVP_CIPHER_CTX_new()
        if not self.ctx:
            raise MemoryError("EVP_CIPHER_CTX_new")
        self.out, self.tag = ctypes.c_int(), ctypes.create_string_buffer(TAG_BYTES)
        self.out_ref = ctypes.byref(self.out)

    def __del__(self):
        if self.ctx:
            self.lib.EVP_CIPHER_CTX_free(self.ctx)
            self.ctx = None


class FrameMac:
    """The tag of one frame, fed like a hashlib object: ``update`` in order,
    then ``digest`` once (which hands the context back to the key's pool)."""

    def __init__(self, key, ctx):
        self.key, self.ctx = key, ctx

    def update(self, data):
        if isinstance(data, bytes):
            address, n = data, len(data)
        else:
            view = memoryview(data)
            n = view.nbytes
            if n and view.readonly:  # (the array holds the buffer through the call)
                address = np.frombuffer(view, np.uint8).__array_interface__["data"][0]
            elif n:  # a tenth of the time of the above, where the buffer allows it
                address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        if n:
            c = self.ctx
            _check(c.lib.EVP_EncryptUpdate(c.ctx, None, c.out_ref, address, n), "EncryptUpdate")

    def digest(self):
        c, self.ctx = self.ctx, None
        _check(c.lib.EVP_EncryptFinal_ex(c.ctx, None, c.out_ref), "EncryptFinal")
        _check(c.lib.EVP_CIPHER_CTX_ctrl(c.ctx, _GET_TAG, TAG_BYTES, c.tag), "get tag")
        tag = c.tag.raw
        self.key.pool.append(c)
        return tag
