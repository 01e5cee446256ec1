"""A cryptographic pseudo-random generator: the AES-256-CTR keystream of a 256-bit key.

Used for differential-privacy noise (``privacy/noise.py``) and for secure aggregation's masks
(``secagg/crypto.py``). Every key is used once, so the counter starts at zero.

The keystream is written straight into a numpy buffer (``update_into`` over a read-only
zero buffer): several times faster than returning it as ``bytes``, and a
:class:`KeystreamBuffer` reuses its storage across the many masks of one step.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_NONCE = bytes(16)  # every key is fresh, so a zero counter start is safe
_BLOCK = 16  # ``update_into`` wants this much room beyond the data
_zeros = np.zeros(0, np.uint8)  # read only, grown on demand: the plaintext of a keystream


def _zero_bytes(num_bytes: int) -> memoryview:
    global _zeros
    if len(_zeros) < num_bytes:
        _zeros = np.zeros(max(num_bytes, 2 * len(_zeros)), np.uint8)  # calloc: zero pages
        _zeros.setflags(write=False)
    return memoryview(_zeros.data)[:num_bytes]


def _check_key(key: bytes) -> None:
    if len(key) != 32:
        raise ValueError(f"a keystream key must be 32 bytes, got {len(key)}")


def _expand_into(key: bytes, out: np.ndarray, num_bytes: int) -> None:
    """The first ``num_bytes`` keystream bytes of ``key`` into ``out`` (uint8, at least
    ``num_bytes + 16`` long; the bytes after ``num_bytes`` are scratch)."""
    _check_key(key)
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_NONCE)).encryptor()
    encryptor.update_into(_zero_bytes(num_bytes), memoryview(out.data))
    encryptor.finalize()


def keystream(key: bytes, num_bytes: int) -> bytes:
    """The first ``num_bytes`` bytes of the AES-256-CTR keystream of ``key`` (32 bytes)."""
    out = np.empty(num_bytes + _BLOCK, np.uint8)
    _expand_into(key, out, num_bytes)
    return out[:num_bytes].tobytes()


def _word_type(dtype: np.dtype | type) -> np.dtype:
    dt = np.dtype(dtype).newbyteorder("<")
    if dt.kind != "u":
        raise ValueError(f"keystream words are unsigned integers, got {dt}")
    return dt


def keystream_words(key: bytes, count: int, dtype: np.dtype | type = np.uint64) -> np.ndarray:
    """``count`` uniformly random unsigned integers of ``dtype`` (little-endian words)."""
    buffer = KeystreamBuffer(count, dtype)
    return buffer.expand(key)


class KeystreamBuffer:
    """Storage for keystreams of ``count`` words of ``dtype``: each :meth:`expand` writes
    into it, so a result is valid until the next call (copy it to keep it)."""

    def __init__(self, count: int, dtype: np.dtype | type = np.uint64) -> None:
        dt = _word_type(dtype)
        self.num_bytes = count * dt.itemsize
        self._out = np.empty(self.num_bytes + _BLOCK, np.uint8)
        self._words = self._out[: self.num_bytes].view(dt).astype(np.dtype(dtype), copy=False)

    def expand(self, key: bytes) -> np.ndarray:
        """The keystream of ``key`` as words (a view of this buffer)."""
        _expand_into(key, self._out, self.num_bytes)
        return self._words
