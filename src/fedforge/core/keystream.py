"""A cryptographic pseudo-random generator: the AES-256-CTR keystream of a 256-bit key.

Used for differential-privacy noise (``privacy/noise.py``) and for secure aggregation's masks
(``secagg/crypto.py``). Every key is used once, so the counter starts at zero.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_NONCE = bytes(16)  # every key is fresh, so a zero counter start is safe


def keystream(key: bytes, num_bytes: int) -> bytes:
    """The first ``num_bytes`` bytes of the AES-256-CTR keystream of ``key`` (32 bytes)."""
    if len(key) != 32:
        raise ValueError(f"a keystream key must be 32 bytes, got {len(key)}")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_NONCE)).encryptor()
    return encryptor.update(bytes(num_bytes)) + encryptor.finalize()


def keystream_words(key: bytes, count: int, dtype: np.dtype | type = np.uint64) -> np.ndarray:
    """``count`` uniformly random unsigned integers of ``dtype`` (little-endian words)."""
    dt = np.dtype(dtype).newbyteorder("<")
    if dt.kind != "u":
        raise ValueError(f"keystream words are unsigned integers, got {dt}")
    words = np.frombuffer(keystream(key, count * dt.itemsize), dtype=dt)
    return words.astype(np.dtype(dtype), copy=False)
