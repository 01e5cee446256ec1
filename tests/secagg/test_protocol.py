"""SecAgg+ sessions end to end, with dropouts at every step, tampering and replays."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from scipy.stats import chisquare

from fedforge.core.params import ArraySpec
from fedforge.core.records import Record, RecordSpec, Task
from fedforge.net.keys import ClientCredentials, add_client, init_keys
from fedforge.secagg import crypto, ring
from fedforge.secagg.client import SecAggClient
from fedforge.secagg.graph import _ring
from fedforge.secagg.protocol import (
    ADVERTISE,
    MASK,
    SHARE,
    STEPS,
    UNMASK,
    SecAggAbort,
    SecAggParams,
)
from fedforge.secagg.records import Layout
from fedforge.secagg.server import SecAggRound
from fedforge.secagg.session import Identity, keep, pack_identity
from tests.secagg.harness import Tamper, records, run_session

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


def test_a_tampered_ciphertext_is_refused_and_the_round_goes_on() -> None:
    """Client 0 cannot open the share client 1 sent it: it masks without client 1 and says
    so; the server cannot tell which of the two lies, so it excludes both (they become
    dropouts) and the others' sum is exact."""
    out = run_session(records(12, 30), tamper={MASK: _flip_ciphertext})
    assert out.replies[MASK][0].arrays["refused"].tolist() == [1]
    assert set(out.session.excluded) == {0, 1}
    assert "0 refused its share" in out.session.excluded[1]
    assert out.result.survivors == list(range(2, 12))
    assert out.session.transcript.both_kinds() == set()
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
    assert "shares checked out (refused: [0, 1, 3, 4, 5, 6, 7])" in out.errors[2]


def _credentials(root: Path, count: int) -> dict[int, Identity]:
    """Real site credentials from ``fedforge keys`` (a CA and one client certificate each)."""
    keys = root / "keys"
    init_keys(keys, ["localhost"])
    identities = {}
    for c in range(count):
        add_client(keys, f"site{c}", keys / f"site{c}")
        creds = ClientCredentials.load(keys / f"site{c}")
        identities[c] = Identity.from_pem(
            creds.private_key, creds.certificate, creds.ca_certificate
        )
    return identities


def _replace_identity(victim: int, row: int, identity: np.ndarray, keys: np.ndarray) -> Tamper:
    """The server hands ``victim`` other keys and another identity for its ``row``-th
    neighbour."""

    def tamper(task: Task) -> Task:
        if task.client_id != victim:
            return task
        ids = task.shared["neighbour_identities"].copy()
        new_keys = task.shared["neighbour_keys"].copy()
        ids[row], new_keys[row] = identity, keys
        shared = {**task.shared, "neighbour_identities": ids, "neighbour_keys": new_keys}
        return dataclasses.replace(task, shared=shared)

    return tamper


def _forged_identity(
    key_pem: bytes, cert_pem: bytes, keys: bytes, cid: int, context: bytes
) -> np.ndarray:
    """An identity blob signing ``keys`` for client ``cid`` with the given key/certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    statement = crypto.key_statement(context, 1, cid, crypto.certificate_name(cert), keys)
    return pack_identity(
        crypto.sign(key_pem, statement), cert.public_bytes(serialization.Encoding.DER)
    )


def test_signed_keys_verify_and_substituted_or_misattributed_keys_are_rejected(
    tmp_path: Path,
) -> None:
    identities = _credentials(tmp_path, 6)
    inputs = records(6, 10)
    out = run_session(inputs, COMPLETE, identities=identities)
    assert out.result.survivors == list(range(6)) and not out.errors

    def substitute(task: Task) -> Task:  # the server swaps in a key pair it controls
        if task.client_id != 5:
            return task
        keys = task.shared["neighbour_keys"].copy()
        fake = crypto.KeyPair.generate()
        keys[0] = np.frombuffer(fake.public + crypto.KeyPair.generate().public, np.uint8)
        return dataclasses.replace(task, shared={**task.shared, "neighbour_keys": keys})

    out = run_session(inputs, COMPLETE, identities=identities, tamper={SHARE: substitute})
    assert "substituted" in out.errors[5] and 5 not in out.result.survivors

    # Keys signed by the server's TLS certificate, or by another site for its own slot,
    # presented as client 0's: refused.
    fake = crypto.KeyPair.generate().public + crypto.KeyPair.generate().public
    keys_dir = tmp_path / "keys"
    server_key, server_cert = (
        (keys_dir / "server.key").read_bytes(),
        (keys_dir / "server.crt").read_bytes(),
    )
    site1 = keys_dir / "site1"
    site1_key, site1_cert = (site1 / "client.key").read_bytes(), (site1 / "client.crt").read_bytes()
    captured: dict[str, bytes] = {}
    for key_pem, cert_pem, signed_for, why in (
        (server_key, server_cert, 0, "not a client certificate"),
        (site1_key, site1_cert, 1, "substituted"),  # site1 signed for its own id, not 0
        (site1_key, site1_cert, 0, "two neighbours claim"),  # site1 signing for id 0
    ):

        def capture(task: Task) -> Task:
            captured["context"] = task.shared["context"].tobytes()
            return task

        def forge(task: Task, key_pem=key_pem, cert_pem=cert_pem, signed_for=signed_for) -> Task:  # type: ignore[no-untyped-def]
            blob = _forged_identity(key_pem, cert_pem, fake, signed_for, captured["context"])
            return _replace_identity(3, 0, blob, np.frombuffer(fake, np.uint8))(task)

        out = run_session(
            inputs, COMPLETE, identities=identities, tamper={ADVERTISE: capture, SHARE: forge}
        )
        assert why in out.errors[3], (why, out.errors)


def test_an_expired_certificate_is_refused(tmp_path: Path) -> None:
    identities = _credentials(tmp_path, 4)
    keys_dir = tmp_path / "keys"
    ca_key = serialization.load_pem_private_key((keys_dir / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((keys_dir / "ca.crt").read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    expired = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site0")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(past - dt.timedelta(days=1))
        .not_valid_after(past)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    identities[0] = Identity(
        key_pem, expired.public_bytes(serialization.Encoding.DER), identities[0].ca_pem
    )
    # The server refuses site0's keys at the advertise step; the others go on.
    out = run_session(records(4, 10), COMPLETE, identities=identities)
    assert "expired" in out.session.excluded[0] and out.result.survivors == [1, 2, 3]
    # A server that relays them anyway: every neighbour refuses them (too few clients left).
    errors: dict[int, str] = {}
    with pytest.raises(SecAggAbort):
        run_session(
            records(4, 10), COMPLETE, identities=identities, errors=errors, server_verifies=False
        )
    assert all("expired" in errors[c] for c in (1, 2, 3))


def test_a_client_refuses_a_replayed_or_inconsistent_unmask() -> None:
    client = SecAggClient()
    reply, session = keep(Record(0, 1, {"w": np.zeros(3, np.float32)}), 1)
    assert reply.arrays == {} and "record/w" in session
    with pytest.raises(crypto.SecAggError, match="out of order"):
        client.handle(Task(UNMASK, 1, 0, 0, {}), session)
    with pytest.raises(crypto.SecAggError, match="no secure-aggregation session"):
        client.handle(Task(UNMASK, 1, 0, 0, {}), None)  # after unmask the session is gone


def test_a_client_refuses_a_threshold_below_a_majority() -> None:
    client = SecAggClient()
    _, session = keep(Record(0, 1, {"w": np.zeros(3, np.float32)}), 1)
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
    bad = Record(1, 1, {"masked": np.zeros(3, np.uint32), "refused": np.zeros(0, np.int64)})
    assert "masked input: expected uint32" in (out.session.check(MASK, bad) or "")


def test_a_dropout_no_survivor_masked_with_needs_no_recovery() -> None:
    """A client whose whole neighbourhood vanished holds no mask any survivor added: the
    round completes without its key (regression: it used to abort)."""
    n = 15
    inputs = records(n, 4)
    spec = RecordSpec({"w": ArraySpec((4,), np.float32)}, scalars=("clip.clipped",))
    server = SecAggRound(
        SecAggParams(security=1.0),
        1,
        list(range(n)),
        {c: 1.0 for c in inputs},
        Layout.of(spec),
        10.0,
    )
    assert server.degree == 4
    ring = _ring(list(range(n)), server.degree, server.graph_seed).tolist()
    drop = {ADVERTISE: {ring[0], ring[1], ring[5], ring[6]}, MASK: {ring[2], ring[3], ring[4]}}
    sessions = {c: keep(r, 1)[1] for c, r in inputs.items()}
    for step in STEPS:
        for task in server.tasks(step, {c: c for c in inputs}):
            if task.client_id in drop.get(step, set()):
                continue
            reply, sessions[task.client_id] = SecAggClient().handle(task, sessions[task.client_id])
            assert server.check(step, reply) is None
            server.accept(step, reply)
    result = server.result()
    assert len(result.survivors) == 8
    want = np.sum([inputs[c].arrays["w"] for c in result.survivors], axis=0)
    np.testing.assert_allclose(result.arrays["w"], want, atol=1e-5)


def test_one_client_is_never_unmasked() -> None:
    with pytest.raises(SecAggAbort, match="at least 2 clients"):
        run_session(records(1, 5))


def test_a_session_answers_only_its_own_round() -> None:
    _, session = keep(Record(0, 1, {"w": np.zeros(3, np.float32)}), 4)
    task = Task(ADVERTISE, 5, 0, 0, {}, {})
    with pytest.raises(crypto.SecAggError, match="no secure-aggregation session for this round"):
        SecAggClient().handle(task, session)
