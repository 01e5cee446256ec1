"""One hostile client in a SecAgg+ session: excluded at the step where it cheats, named, and
the honest clients' sum still exact; or, where nobody can be singled out, the sum refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedforge.secagg import crypto
from fedforge.secagg.client import SecAggClient
from fedforge.secagg.protocol import ADVERTISE, MASK, UNMASK, SecAggAbort, SecAggParams
from fedforge.secagg.verify import key_problem, settle_disputes, sum_problem
from tests.secagg.harness import Outcome, records, run_session
from tests.secagg.hostile import (
    BadSignature,
    CraftedInput,
    CraftedUnmask,
    FalseAccuser,
    GarbageShares,
    InconsistentDealer,
    ZeroKey,
)
from tests.secagg.test_protocol import _credentials, survivors_sum, tolerance

COMPLETE = SecAggParams(complete=True)


def _exact(out: Outcome, n: int) -> None:
    np.testing.assert_allclose(
        out.result.arrays["w"], survivors_sum(out, out.result.survivors), atol=tolerance(out, n)
    )
    assert out.session.transcript.both_kinds() == set()


def test_bad_signatures_and_invalid_keys_are_excluded_at_advertise(tmp_path: Path) -> None:
    """The server verifies signed keys itself (the run's CA, the sender's own name) and the
    keys' validity, so the culprits never reach a neighbour: no honest client fails."""
    ids = _credentials(tmp_path, 6)
    hostile = {1: BadSignature(ids[1]), 4: ZeroKey(ids[4])}
    out = run_session(records(6, 20), COMPLETE, identities=ids, clients=hostile)
    assert set(out.session.excluded) == {1, 4}
    assert "not signed by its certificate" in out.session.excluded[1]
    assert out.session.excluded[1].startswith(ADVERTISE)
    assert "public key of low order" in out.session.excluded[4]
    assert out.result.survivors == [0, 2, 3, 5] and set(out.errors) == {1, 4}
    _exact(out, 6)
    # A client signing with another site's certificate is refused by name.
    impostor = {2: BadSignature(ids[3])}  # site3's key and certificate, sent as client 2
    impostor[2].advertise = SecAggClient(ids[3]).advertise  # type: ignore[method-assign]
    out = run_session(records(6, 20), COMPLETE, identities=ids, clients=impostor)
    assert "signed with the certificate of 'site3', not its own" in out.session.excluded[2]


def test_key_checks_refuse_low_order_non_canonical_and_copied_keys() -> None:
    good = crypto.KeyPair.generate().public + crypto.KeyPair.generate().public
    assert key_problem(good, {}) is None
    one = (1).to_bytes(32, "little")  # a point of order 4
    assert "low order" in (key_problem(one + good[32:], {}) or "")
    assert "not a canonical" in (key_problem(bytes([0xFF] * 32) + good[32:], {}) or "")
    assert "same key" in (key_problem(good[:32] * 2, {}) or "")
    assert "public key of client 7" in (key_problem(good, {7: good[32:] + good[:32]}) or "")


def test_garbage_shares_exclude_their_sender_only() -> None:
    """Every neighbour of client 3 refuses its garbage share, masks without it and says so;
    the dispute graph is a star on 3, so 3 alone is excluded and the round completes."""
    out = run_session(records(8, 30), COMPLETE, clients={3: GarbageShares()})
    assert set(out.session.excluded) == {3} and not out.errors
    assert "refused its share" in out.session.excluded[3]
    assert out.result.survivors == [0, 1, 2, 4, 5, 6, 7]
    _exact(out, 8)


def test_a_dispute_with_a_client_that_dropped_out_excludes_nobody() -> None:
    """Client 3 sends garbage shares, then never masks: its neighbours' refusals are moot."""
    out = run_session(records(8, 30), COMPLETE, clients={3: GarbageShares()}, drop={MASK: {3}})
    assert out.session.excluded == {} and not out.errors
    assert out.result.survivors == [0, 1, 2, 4, 5, 6, 7]
    _exact(out, 8)


def test_a_false_accuser_is_excluded_not_the_accused() -> None:
    out = run_session(records(8, 30), COMPLETE, clients={5: FalseAccuser()})
    assert set(out.session.excluded) == {5}
    assert out.result.survivors == [0, 1, 2, 3, 4, 6, 7]
    _exact(out, 8)


def test_disputes_are_settled_by_the_fewest_exclusions_golden() -> None:
    assert set(settle_disputes({0: [3], 1: [3], 2: [3]})) == {3}  # one sender, many victims
    assert set(settle_disputes({3: [0, 1, 2]})) == {3}  # one accuser
    assert set(settle_disputes({0: [1]})) == {0, 1}  # one against one: both
    assert set(settle_disputes({0: [1], 2: [3]})) == {0, 1, 2, 3}
    assert set(settle_disputes({0: [1], 1: [0], 2: [1]})) == {1}  # a chain: its middle
    assert settle_disputes({}) == {}


def test_a_crafted_unmask_share_is_discarded_and_the_sum_stays_exact() -> None:
    """Each revealed share is checked against the digest its dealer committed to: the
    crafted ones are pinned on client 2, whose input already is in the sum."""
    out = run_session(records(8, 30), COMPLETE, clients={2: CraftedUnmask()})
    assert set(out.session.excluded) == {2}
    assert "seed share of 0 is not the one dealt" in out.session.excluded[2]
    assert out.result.survivors == list(range(8))
    _exact(out, 8)


def test_shares_dealt_off_one_polynomial_abort_naming_the_dealer() -> None:
    """Client 6's shares match its digests but not one polynomial: its recovered seed is
    wrong, so the sum is impossible; the server then finds whose shares disagree."""
    with pytest.raises(SecAggAbort, match="6: secagg/unmask: the shares it dealt of its") as info:
        run_session(records(8, 30), COMPLETE, clients={6: InconsistentDealer()})
    assert set(info.value.culprits) == {6} and info.value.impossible


def test_a_crafted_masked_input_makes_the_sum_impossible_and_it_is_refused() -> None:
    with pytest.raises(SecAggAbort, match="unmasked sum is impossible") as info:
        run_session(records(8, 30), COMPLETE, clients={4: CraftedInput()})
    assert info.value.impossible


def test_the_sum_bound_is_tight_enough_to_refuse_one_unclipped_record() -> None:
    """Honest inputs at the clip norm pass; one record of twice the clip norm (skipping
    clipping, at weight 1) pushes the sum past what the others can produce."""
    d, n, clip = 50, 4, 10.0
    row = np.full(d, clip / np.sqrt(d))
    args = dict(total_weight=n, clip_norm=clip, contributors=n, unit=2.0**-20)
    extra = dict(scalar_unit=1.0, scalar_bound=100.0, noise_std=0.0)
    assert sum_problem(n * row, np.zeros(0), 0.0, **args, **extra) is None  # type: ignore[arg-type]
    crafted = (n - 1) * row + 2 * n * row
    assert "exceeds" in (sum_problem(crafted, np.zeros(0), 0.0, **args, **extra) or "")  # type: ignore[arg-type]
    assert "clipped count" in (sum_problem(n * row, np.zeros(0), n + 3.0, **args, **extra) or "")  # type: ignore[arg-type]
    assert "summed scalar" in (
        sum_problem(n * row, np.array([1e6]), 0.0, **args, **extra) or ""  # type: ignore[arg-type]
    )


def test_honest_sessions_at_the_clip_norm_pass_the_bound() -> None:
    """Every record at the clip norm (clipped) and distributed-DP noise: still accepted."""
    inputs = records(6, 400, seed=2)
    for record in inputs.values():
        record.arrays["w"] *= 1000  # far above the clip norm: clipped to it
    out = run_session(inputs, COMPLETE)
    assert out.result.clipped == 6.0
    noisy = run_session(records(6, 400, seed=2, scalars=False), COMPLETE, noise_std=3.0)
    assert len(noisy.result.survivors) == 6
    assert MASK in out.replies and UNMASK in out.replies
