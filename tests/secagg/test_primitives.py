"""Shamir sharing, the neighbour graph, the key derivation, AEAD and the fixed-point ring."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedforge.core.errors import ConfigError
from fedforge.core.keystream import KeystreamBuffer, keystream, keystream_words
from fedforge.secagg import crypto, ring, shamir
from fedforge.secagg.graph import default_degree, neighbours


def test_any_threshold_shares_recover_the_secret_and_fewer_cannot() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [0, 4, 9, 11, 20])
    for chosen in ([0, 4, 9], [9, 11, 20], [0, 20, 11, 4]):
        assert shamir.combine({h: shares[h] for h in chosen}, 3) == secret
    with pytest.raises(shamir.ShareError):
        shamir.combine({h: shares[h] for h in (0, 4)}, 3)
    # Two shares of a 3-of-n secret, interpolated as if 2-of-n, do not give the secret.
    with contextlib.suppress(shamir.ShareError):  # (usually not even a 32-byte value)
        assert shamir.combine({h: shares[h] for h in (0, 4)}, 2) != secret


def test_shares_of_a_degree_one_polynomial_are_collinear_golden() -> None:
    # threshold 1: every share is the secret itself (a constant polynomial)
    secret = bytes(range(32))
    shares = shamir.split(secret, 1, [0, 1, 2])
    assert {int.from_bytes(v, "big") for v in shares.values()} == {int.from_bytes(secret, "big")}


def test_graph_is_symmetric_regular_and_complete_when_dense() -> None:
    ids = list(range(100))
    k = default_degree(100, 3.0)
    assert k == 20  # ceil(3 log2 100) = 20
    graph = neighbours(ids, k, os.urandom(32))
    assert all(len(v) == k and c not in v for c, v in graph.items())
    assert all(c in graph[o] for c, v in graph.items() for o in v)
    small = neighbours(list(range(8)), default_degree(8, 3.0), os.urandom(32))
    assert all(len(v) == 7 for v in small.values())  # degree >= n - 1: complete
    seed = os.urandom(32)
    assert neighbours(ids, k, seed) == neighbours(ids, k, seed)  # clients recompute it


def test_mask_key_uses_all_256_bits_of_the_shared_secret() -> None:
    secret, context = os.urandom(32), os.urandom(32)
    base = crypto.derive_key(secret, "mask", context)
    as_int = int.from_bytes(secret, "big")
    for bit in range(256):
        flipped = (as_int ^ (1 << bit)).to_bytes(32, "big")
        assert crypto.derive_key(flipped, "mask", context) != base, bit
    assert crypto.derive_key(secret, "share", context) != base  # purposes are separated
    assert len(base) == 32
    with pytest.raises(ValueError):
        crypto.derive_key(secret[:4], "mask", context)  # never a fold of the secret


def test_both_sides_agree_on_the_pair_mask() -> None:
    a, b = crypto.KeyPair.generate(), crypto.KeyPair.generate()
    context = os.urandom(32)
    key_ab = crypto.pair_mask_key(a.private, b.public, context)
    assert key_ab == crypto.pair_mask_key(b.private, a.public, context)
    words = crypto.mask(key_ab, 1000, np.dtype(np.uint32))
    assert words.dtype == np.uint32 and len(set(words.tolist())) > 990


def test_aead_rejects_tampering_and_other_associated_data() -> None:
    key, context = os.urandom(32), os.urandom(32)
    aad = crypto.associated_data(context, 3, 1, 2)
    message = crypto.encrypt(key, b"share", aad)
    assert crypto.decrypt(key, message, aad) == b"share"
    tampered = bytearray(message)
    tampered[20] ^= 1
    for bad, bad_aad in (
        (bytes(tampered), aad),
        (message, crypto.associated_data(context, 4, 1, 2)),  # replayed into another round
        (message, crypto.associated_data(context, 3, 5, 2)),  # claimed by another sender
        (message, crypto.associated_data(os.urandom(32), 3, 1, 2)),  # another session
    ):
        with pytest.raises(crypto.SecAggError, match="authentication"):
            crypto.decrypt(key, bad, bad_aad)


def test_ring_headroom_rule_and_refusal() -> None:
    f = ring.frac_bits(32, 10.0, 101)
    assert 101 * (10.0 * 2.0**f + 1) < 2**31 <= 101 * (10.0 * 2.0 ** (f + 1) + 1)
    with pytest.raises(ConfigError, match="ring_bits = 64"):
        ring.frac_bits(32, 1000.0, 10_000, min_frac_bits=8)
    assert ring.frac_bits(64, 1000.0, 10_000, min_frac_bits=8) >= 8


def test_ring_sum_of_extreme_values_does_not_wrap() -> None:
    n, bound = 50, 3.0
    f = ring.frac_bits(32, bound, n)
    rng = np.random.default_rng(0)
    for sign in (1.0, -1.0):
        values = np.full((n, 4), sign * bound)
        total = np.zeros(4, np.uint32)
        for row in values:
            total += ring.encode(row, f, 32, rng)
        np.testing.assert_allclose(ring.decode(total, f, 32), values.sum(0), atol=n * 2.0**-f)


def test_stochastic_rounding_is_unbiased_and_integers_are_exact() -> None:
    rng = np.random.default_rng(1)
    value = np.full(200_000, 0.3)
    decoded = ring.decode(ring.encode(value, 2, 32, rng), 2, 32)  # grid step 0.25
    assert set(np.unique(decoded)) == {0.25, 0.5}
    assert abs(decoded.mean() - 0.3) < 3 * 0.25 / np.sqrt(len(value))
    bits = np.array([0.0, 1.0, 1.0, 0.0, 3.0])
    assert np.array_equal(ring.decode(ring.encode(bits, 0, 64, rng), 0, 64), bits)


def test_keystreams_are_the_aes_256_ctr_keystream_from_a_zero_counter() -> None:
    key = bytes(range(32))
    reference = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    want = reference.update(bytes(4003))  # zeros encrypted: the keystream itself
    assert keystream(key, 4003) == want
    buffer = KeystreamBuffer(1000, np.uint32)
    other = buffer.expand(bytes(32)).copy()
    assert buffer.expand(key).tobytes() == want[:4000]  # the buffer is reused ...
    assert not np.array_equal(other, buffer.expand(key))  # ... for each key in turn
    assert keystream_words(key, 500, np.uint64).tobytes() == want[:4000]
    assert keystream_words(key, 0, np.uint16).size == 0


def test_the_low_order_keys_are_exactly_the_ones_agreement_refuses() -> None:
    """Each listed point makes a real agreement all zero (so OpenSSL refuses it); keys next
    to them, and fresh keys, are accepted by both."""
    own = crypto.KeyPair.generate().private
    for u in sorted(crypto.LOW_ORDER):
        raw = u.to_bytes(32, "little")
        with pytest.raises(crypto.SecAggError, match="bad public key"):
            crypto.agree(own, raw)
        with pytest.raises(crypto.SecAggError, match="low order"):
            crypto.check_public_key(raw)
    for raw in [(2).to_bytes(32, "little"), crypto.KeyPair.generate().public]:
        crypto.check_public_key(raw)
        assert len(crypto.agree(own, raw)) == 32
