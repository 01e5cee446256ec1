"""Runs SecAgg+ sessions in process: every message computed, checked and routed through a
real :class:`SecAggRound`, as the driver does, without training."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedforge.core.params import ArraySpec
from fedforge.core.records import Record, RecordSpec, Task
from fedforge.secagg.client import Answer, SecAggClient
from fedforge.secagg.crypto import SecAggError
from fedforge.secagg.graph import neighbours
from fedforge.secagg.protocol import STEPS, SecAggParams
from fedforge.secagg.records import Layout, SecureSum
from fedforge.secagg.server import SecAggRound
from fedforge.secagg.session import Identity, Session, keep

Tamper = Callable[[Task], Task]  # the server's outgoing task, changed in flight


@dataclass
class Outcome:
    session: SecAggRound
    result: SecureSum
    inputs: dict[int, np.ndarray]
    replies: dict[str, dict[int, Record]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


def records(n: int, dim: int, seed: int = 0, *, scalars: bool = True) -> dict[int, Record]:
    rng = np.random.default_rng(seed)
    return {
        c: Record(
            c,
            10 + c,
            {"w": rng.normal(0, 0.1, dim).astype(np.float32)},
            scalars={"clip.clipped": float(c % 2)} if scalars else {},
        )
        for c in range(n)
    }


def run_session(
    inputs: Mapping[int, Record],
    params: SecAggParams = SecAggParams(),  # noqa: B008
    *,
    drop: Mapping[str, set[int]] | None = None,
    tamper: Mapping[str, Tamper] | None = None,
    identities: Mapping[int, Identity] | None = None,
    weights: Mapping[int, float] | None = None,
    round_number: int = 1,
    noise_std: float = 0.0,
    errors: dict[int, str] | None = None,
    clients: Mapping[int, SecAggClient] | None = None,
    server_verifies: bool = True,
    batched: bool = False,
    graph_seed: bytes | None = None,
) -> Outcome:
    """One session over ``inputs``; ``drop[step]``: clients that vanish at that step (they
    never answer it); a client whose step raises is a dropout too, its error recorded in
    ``errors``; ``clients``: who answers for some clients (a hostile one). With
    ``identities`` the server checks the signatures itself unless not ``server_verifies``
    (then only the neighbours do); their certificates are named ``site<id>``. A reply the
    server rejects excludes its client, as in the driver. ``batched``: each step's honest
    clients answer as one chunk (``SecAggClient.handle_chunk``), as in the vectorized
    runtime. ``graph_seed``: the server announces this graph seed instead of a fresh one
    (the same graph in two sessions). Raises SecAggAbort."""
    dim = len(next(iter(inputs.values())).arrays["w"])
    names = tuple(next(iter(inputs.values())).scalars)
    spec = RecordSpec({"w": ArraySpec((dim,), np.float32)}, scalars=names)
    sessions: dict[int, Session | None] = {}
    for cid, record in inputs.items():
        _, sessions[cid] = keep(record, round_number)
    server = SecAggRound(
        params,
        round_number,
        sorted(inputs),
        weights or {c: 1.0 for c in inputs},
        Layout.of(spec),
        params.clip_norm,
        require_identities=identities is not None,
        noise_std=noise_std,
        ca_pem=next(iter(identities.values())).ca_pem if identities and server_verifies else None,
        names={c: f"site{c}" for c in inputs},
    )
    if graph_seed is not None:
        server.graph_seed = graph_seed
        server.graph = neighbours(server.participants, server.degree, graph_seed)
    replies: dict[str, dict[int, Record]] = {}
    errors = {} if errors is None else errors  # the caller's dict survives an abort
    for step in STEPS:
        replies[step] = {}
        tasks = [
            (tamper[step](task) if tamper and step in tamper else task)
            for task in server.tasks(step, {c: 1000 + c for c in inputs})
            if task.client_id not in (drop or {}).get(step, set())
        ]
        answers = _answer(tasks, sessions, clients or {}, identities, batched)
        for task, answer in zip(tasks, answers, strict=True):
            cid = task.client_id
            if isinstance(answer, Exception):
                if not isinstance(answer, SecAggError):
                    raise answer
                errors[cid] = str(answer)
                continue
            reply, sessions[cid] = answer
            problem = server.check(step, reply)
            if problem is not None:
                errors[cid] = problem
                server.exclude(cid, problem)
                continue
            server.accept(step, reply)
            replies[step][cid] = reply
    outcome = Outcome(server, server.result(), {}, replies, errors)
    outcome.inputs = {c: r.arrays["w"] for c, r in inputs.items()}
    return outcome


def _answer(
    tasks: list[Task],
    sessions: Mapping[int, Session | None],
    clients: Mapping[int, SecAggClient],
    identities: Mapping[int, Identity] | None,
    batched: bool,
) -> list[Answer]:
    """Each task's answer: per client, or the honest clients' tasks as one chunk."""

    def honest(cid: int) -> SecAggClient:
        return SecAggClient(identities[cid] if identities else None)

    def alone(task: Task) -> Answer:
        client = clients.get(task.client_id) or honest(task.client_id)
        try:
            return client.handle(task, sessions[task.client_id])
        except SecAggError as exc:
            return exc

    if not batched or identities:  # signed keys: each client holds its own identity
        return [alone(t) for t in tasks]
    chunk = [t for t in tasks if t.client_id not in clients]
    answers = dict(
        zip(
            [t.client_id for t in chunk],
            SecAggClient().handle_chunk(chunk, [sessions[t.client_id] for t in chunk]),
            strict=True,
        )
    )
    return [answers[t.client_id] if t.client_id in answers else alone(t) for t in tasks]
