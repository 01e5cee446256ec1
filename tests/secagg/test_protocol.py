"""SecAgg+ sessions end to end, with dropouts at every step, tampering and replays."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from scipy.stats import chisquare

from fedforge.core.records import Record, Task
from fedforge.secagg import crypto, ring
from fedforge.secagg.client import Identity, SecAggClient, keep
from fedforge.secagg.protocol import (
    ADVERTISE,
    MASK,
    SHARE,
    STEPS,
    UNMASK,
    SecAggAbort,
    SecAggParams,
)
from tests.secagg.harness import records, run_session

COMPLETE = SecAggParams(complete=True)


def survivors_sum(outcome: object, ids: list[int]) -> np.ndarray:
    inputs = outcome.inputs  # type: ignore[attr-defined]
    return np.sum([inputs[c].astype(np.float64) for c in ids], axis=0)


def tolerance(outcome: object, n: int) -> float:
    session = outcome.session  # type: ignore[attr-defined]
    bits = session.mask_params(session.participants[0]).array_bits
    return n * 2.0**-bits


def test_exact_sum_without_dropouts() -> None:
    inputs = records(12, 300)
    out = run_session(inputs)
    assert out.result.survivors == list(range(12))
    np.testing.assert_allclose(
        out.result.arrays["w"], survivors_sum(out, list(range(12))), atol=tolerance(out, 12)
    )
    assert out.result.scalars == {"clip.clipped": 6.0}  # integers are exact
    assert out.result.clipped == 0.0 and not out.errors


def test_weighted_sum() -> None:
    inputs = records(8, 50)
    weights = {c: (c + 1) / 8 for c in inputs}
    out = run_session(inputs, weights=weights)
    want = np.sum([weights[c] * inputs[c].arrays["w"].astype(np.float64) for c in inputs], axis=0)
    np.testing.assert_allclose(out.result.arrays["w"], want, atol=tolerance(out, 8))


@pytest.mark.parametrize("step", STEPS)
def test_exact_sum_with_dropouts_at_each_step(step: str) -> None:
    inputs = records(20, 200, seed=3)  # sparse graph: degree 14 of 19
    out = run_session(inputs, drop={step: {2, 7}})
    assert out.session.degree < 19
    expected = list(range(20)) if step == UNMASK else [c for c in range(20) if c not in (2, 7)]
    assert out.result.survivors == expected  # an unmask dropout's masked input still counts
    np.testing.assert_allclose(
        out.result.arrays["w"], survivors_sum(out, expected), atol=tolerance(out, 20)
    )
    assert out.session.transcript.both_kinds() == set()


@pytest.mark.parametrize("step", [MASK, UNMASK])
def test_dropping_n_minus_t_succeeds_and_one_more_aborts(step: str) -> None:
    n = 10
    inputs = records(n, 40)
    t = run_session(inputs, COMPLETE).session.threshold
    assert t == 6  # floor(0.5 * 10) + 1
    ok = run_session(inputs, COMPLETE, drop={step: set(range(n - t))})
    expected = list(range(n - t, n)) if step == MASK else list(range(n))
    np.testing.assert_allclose(
        ok.result.arrays["w"], survivors_sum(ok, expected), atol=tolerance(ok, n)
    )
    with pytest.raises(SecAggAbort, match="threshold 6"):
        run_session(inputs, COMPLETE, drop={step: set(range(n - t + 1))})


def test_a_masked_vector_looks_uniform_to_the_server() -> None:
    inputs = records(10, 50_000, seed=5)
    out = run_session(inputs)
    masked = out.replies[MASK][3].arrays["masked"]
    top_byte = (masked >> np.uint32(24)).astype(np.int64)
    assert chisquare(np.bincount(top_byte, minlength=256)).pvalue > 1e-4
    # ... while the same record encoded but unmasked is far from uniform.
    bits = out.session.mask_params(3).array_bits
    plain = ring.encode(inputs[3].arrays["w"], bits, 32, np.random.default_rng(0))
    plain_top = (plain >> np.uint32(24)).astype(np.int64)
    assert chisquare(np.bincount(plain_top, minlength=256)).pvalue < 1e-10


def test_the_server_never_holds_both_kinds_of_share_for_one_client() -> None:
    out = run_session(records(16, 20), drop={MASK: {1, 4}, UNMASK: {9}})
    shares = out.session.transcript.shares
    assert {1, 4} <= shares["key"] and shares["key"].isdisjoint(out.result.survivors)
    assert set(out.result.survivors) <= shares["seed"]
    assert out.session.transcript.both_kinds() == set()


def _flip_ciphertext(task: Task) -> Task:
    if task.client_id != 0:
        return task
    ciphertexts = task.shared["ciphertexts"].copy()
    ciphertexts[0, 30] ^= 1
    return dataclasses.replace(task, shared={**task.shared, "ciphertexts": ciphertexts})


def test_a_tampered_ciphertext_is_rejected_and_the_round_goes_on() -> None:
    out = run_session(records(12, 30), tamper={MASK: _flip_ciphertext})
    assert "authentication" in out.errors[0]
    assert 0 not in out.result.survivors and len(out.result.survivors) == 11
    np.testing.assert_allclose(
        out.result.arrays["w"], survivors_sum(out, out.result.survivors), atol=tolerance(out, 12)
    )


def test_a_replayed_share_is_rejected() -> None:
    inputs = records(8, 10)
    first = run_session(inputs, COMPLETE)
    old_task_payload: dict[int, np.ndarray] = {}

    def capture(task: Task) -> Task:
        old_task_payload[task.client_id] = task.shared["ciphertexts"].copy()
        return task

    run_session(inputs, COMPLETE, tamper={MASK: capture})
    assert first.result.survivors  # the first session completed

    def replay(task: Task) -> Task:  # client 2 gets last session's ciphertexts again
        if task.client_id != 2:
            return task
        return dataclasses.replace(task, shared={**task.shared, "ciphertexts": old_task_payload[2]})

    out = run_session(inputs, COMPLETE, tamper={MASK: replay}, round_number=2)
    assert "authentication" in out.errors[2]


def _credentials(count: int) -> tuple[dict[int, Identity], ec.EllipticCurvePrivateKey]:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])

    def issue(name: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(ca_key, hashes.SHA256())
        )

    ca_pem = issue(ca_name, ca_key).public_bytes(serialization.Encoding.PEM)
    identities = {}
    for c in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"site{c}")]), key)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        identities[c] = Identity.from_pem(
            key_pem, cert.public_bytes(serialization.Encoding.PEM), ca_pem
        )
    return identities, ca_key


def test_signed_keys_verify_and_a_substituted_key_is_rejected() -> None:
    identities, _ = _credentials(8)
    inputs = records(8, 10)
    out = run_session(inputs, COMPLETE, identities=identities)
    assert out.result.survivors == list(range(8)) and not out.errors

    def substitute(task: Task) -> Task:  # the server swaps in a key pair it controls
        if task.client_id != 5:
            return task
        keys = task.shared["neighbour_keys"].copy()
        fake = crypto.KeyPair.generate()
        keys[0] = np.frombuffer(fake.public + crypto.KeyPair.generate().public, np.uint8)
        return dataclasses.replace(task, shared={**task.shared, "neighbour_keys": keys})

    out = run_session(inputs, COMPLETE, identities=identities, tamper={SHARE: substitute})
    assert "substituted" in out.errors[5]
    assert 5 not in out.result.survivors


def test_a_client_refuses_a_replayed_or_inconsistent_unmask() -> None:
    client = SecAggClient()
    reply, session = keep(Record(0, 1, {"w": np.zeros(3, np.float32)}))
    assert reply.arrays == {} and "record/w" in session
    with pytest.raises(crypto.SecAggError, match="out of order"):
        client.handle(Task(UNMASK, 1, 0, 0, {}), session)
    with pytest.raises(crypto.SecAggError, match="no secure-aggregation session"):
        client.handle(Task(UNMASK, 1, 0, 0, {}), None)  # after unmask the session is gone


def test_a_client_refuses_a_threshold_below_a_majority() -> None:
    client = SecAggClient()
    _, session = keep(Record(0, 1, {"w": np.zeros(3, np.float32)}))
    task = Task(
        ADVERTISE,
        1,
        0,
        0,
        {
            "participants": np.arange(10, dtype=np.int64),
            "graph_seed": np.zeros(32, np.uint8),
            "context": np.frombuffer(os.urandom(32), np.uint8).copy(),
        },
        {"secagg.degree": 9.0, "secagg.t": 2.0},
    )
    with pytest.raises(crypto.SecAggError, match="refusing threshold 2"):
        client.handle(task, session)


def test_the_server_rejects_a_masked_input_of_the_wrong_length() -> None:
    out = run_session(records(6, 10), COMPLETE)
    bad = Record(1, 1, {"masked": np.zeros(3, np.uint32)})
    assert "masked input: expected uint32" in (out.session.check(MASK, bad) or "")
