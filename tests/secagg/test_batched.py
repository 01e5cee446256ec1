"""SecAgg+ answered per chunk (the vectorized runtime) is the protocol answered per client:
the same masked inputs from the same sessions, the same sum, aborts and transcript under the
same seeds and dropouts, with each pair's agreement and mask computed once."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedforge.core.keystream import KeystreamBuffer
from fedforge.core.params import ArraySpec
from fedforge.core.records import RecordSpec, Task
from fedforge.secagg import crypto
from fedforge.secagg.client import SecAggClient
from fedforge.secagg.protocol import ADVERTISE, MASK, SHARE, STEPS, SecAggAbort, SecAggParams
from fedforge.secagg.records import Layout
from fedforge.secagg.server import SecAggRound
from fedforge.secagg.session import Session, keep
from tests.secagg.harness import records, run_session
from tests.secagg.hostile import (
    CraftedInput,
    CraftedUnmask,
    FalseAccuser,
    GarbageShares,
    InconsistentDealer,
    ZeroKey,
)
from tests.secagg.test_protocol import _flip_ciphertext

COMPLETE = SecAggParams(complete=True)
N = 16  # a sparse graph: degree 12 of 15
GRAPH = bytes(range(32))  # the graph seed both sessions of a comparison announce


def _sessions_at_mask(n: int) -> tuple[SecAggRound, list[Task], dict[int, Session]]:
    """A session run per client up to the mask step (client 3 vanished at share; client 0
    cannot open its first sender's share): the mask step's tasks and every session."""
    inputs = records(n, 300, seed=4)
    spec = RecordSpec({"w": ArraySpec((300,), np.float32)}, scalars=("clip.clipped",))
    weights = {c: (c + 2) / (n + 1) for c in inputs}
    server = SecAggRound(SecAggParams(), 1, sorted(inputs), weights, Layout.of(spec), 10.0)
    sessions = {c: keep(r, 1)[1] for c, r in inputs.items()}
    for step in (ADVERTISE, SHARE):
        for task in server.tasks(step, {c: 1000 + c for c in inputs}):
            if step == SHARE and task.client_id == 3:
                continue
            reply, sessions[task.client_id] = SecAggClient().handle(task, sessions[task.client_id])
            assert server.check(step, reply) is None
            server.accept(step, reply)
    tasks = [_flip_ciphertext(t) for t in server.tasks(MASK, {c: 1000 + c for c in inputs})]
    return server, tasks, sessions


def _copy(session: Session) -> Session:
    return {k: v.copy() for k, v in session.items()}


def test_a_chunk_masks_exactly_as_each_client_alone() -> None:
    _, tasks, sessions = _sessions_at_mask(N)
    alone = [SecAggClient().handle(t, _copy(sessions[t.client_id])) for t in tasks]
    chunk = SecAggClient().handle_chunk(tasks, [_copy(sessions[t.client_id]) for t in tasks])
    assert len(chunk) == len(alone) == N - 1
    for (record, session), answer in zip(alone, chunk, strict=True):
        assert not isinstance(answer, Exception)
        batched_record, batched_session = answer
        for name in ("masked", "refused"):
            assert np.array_equal(record.arrays[name], batched_record.arrays[name])
        assert session is not None and batched_session is not None
        assert session.keys() == batched_session.keys()
        for key, value in session.items():
            assert np.array_equal(value, batched_session[key]), key
    first_sender = int(tasks[0].shared["senders"][0])
    assert alone[0][0].arrays["refused"].tolist() == [first_sender]  # the tampered share


def test_a_chunk_fails_only_the_clients_whose_task_is_bad() -> None:
    _, tasks, sessions = _sessions_at_mask(N)
    bad = dataclasses.replace(tasks[2], scalars={})  # the mask step without its parameters
    chunk = [_copy(sessions[t.client_id]) for t in tasks[1:5]]
    chunk[2]["record/w"][7] = np.nan  # a record that cannot be encoded
    answers = SecAggClient().handle_chunk([tasks[1], bad, tasks[3], tasks[4]], chunk)
    assert isinstance(answers[1], crypto.SecAggError) and "lacks" in str(answers[1])
    assert isinstance(answers[2], crypto.SecAggError) and "NaN" in str(answers[2])
    for answer, task in zip((answers[0], answers[3]), (tasks[1], tasks[4]), strict=True):
        assert not isinstance(answer, Exception)
        alone, _ = SecAggClient().handle(task, _copy(sessions[task.client_id]))
        assert np.array_equal(answer[0].arrays["masked"], alone.arrays["masked"])
    with pytest.raises(crypto.SecAggError, match="one secure-aggregation step"):
        SecAggClient().handle_chunk([*tasks[:1], dataclasses.replace(tasks[1], stage=SHARE)], [])


def _outcome(batched: bool, **options: Any) -> tuple[object, ...]:
    """What a session ends with: its sum, transcript, exclusions and errors; or its abort
    (the graph fixed, the clients' seeds those of the harness)."""
    errors: dict[int, str] = {}
    params = options.pop("params", SecAggParams())
    try:
        out = run_session(
            records(N, 200, seed=9),
            params,
            batched=batched,
            errors=errors,
            graph_seed=GRAPH,
            **options,
        )
    except SecAggAbort as exc:
        # A wrongly recovered self mask leaves a sum of fresh random words: its norm varies.
        why = re.sub(r"its norm \d+", "its norm N", str(exc))
        return ("abort", why, exc.culprits, exc.impossible, errors)
    result, session = out.result, out.session
    return (
        result.arrays["w"].tobytes(),
        result.scalars,
        result.clipped,
        result.survivors,
        session.transcript.replied,
        session.transcript.shares,
        session.excluded,
        errors,
    )


SCENARIOS: dict[str, dict[str, Any]] = {
    "no dropouts": {},
    "dropouts at every step": {"drop": {SHARE: {3}, MASK: {5, 8}, STEPS[3]: {11}}},
    "a tampered share": {"tamper": {MASK: _flip_ciphertext}},
    "a garbage dealer": {"clients": {4: GarbageShares()}},
    "too many dropouts": {"params": COMPLETE, "drop": {MASK: set(range(8))}},
    "a crafted input": {"params": COMPLETE, "clients": {6: CraftedInput()}},
    "a low-order key": {"clients": {2: ZeroKey()}},
    "a false accuser": {"clients": {5: FalseAccuser()}},
    "crafted seed shares": {"params": COMPLETE, "clients": {2: CraftedUnmask()}},
    "an inconsistent dealer": {"params": COMPLETE, "clients": {6: InconsistentDealer()}},
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_batched_sessions_give_the_same_sum_aborts_and_transcript(scenario: str) -> None:
    alone = _outcome(False, **dict(SCENARIOS[scenario]))
    batched = _outcome(True, **dict(SCENARIOS[scenario]))
    assert batched == alone
    aborts = ("too many dropouts", "a crafted input", "an inconsistent dealer")
    assert (alone[0] == "abort") == (scenario in aborts)


def _counting(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    calls: list[int] = []
    real: Callable[..., Any] = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("batched", [False, True])
def test_a_chunk_agrees_and_expands_once_per_pair(
    monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    n = 8
    pairs = n * (n - 1) // 2
    agreements = _counting(monkeypatch, crypto, "agree")
    expansions = _counting(monkeypatch, KeystreamBuffer, "expand")
    run_session(records(n, 50), COMPLETE, batched=batched)
    ends = 1 if batched else 2  # how many ends of a pair compute its secrets
    # Share keys and mask keys, one X25519 agreement each per pair end.
    assert len(agreements) == 2 * pairs * ends
    # Self masks (each client's, and the server's removal of them) and pairwise masks.
    assert len(expansions) == 2 * n + pairs * ends
