"""Runs SecAgg+ sessions in process: every message computed, checked and routed through a
real :class:`SecAggRound`, as the driver does, without training."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedforge.core.params import ArraySpec
from fedforge.core.records import Record, RecordSpec, Task
from fedforge.secagg.client import Identity, SecAggClient, Session, keep
from fedforge.secagg.crypto import SecAggError
from fedforge.secagg.protocol import STEPS, SecAggParams
from fedforge.secagg.records import Layout, SecureSum
from fedforge.secagg.server import SecAggRound

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
) -> Outcome:
    """One session over ``inputs``; ``drop[step]``: clients that vanish at that step (they
    never answer it); a client whose step raises is a dropout too, its error recorded in
    ``errors``; ``clients``: who answers for some clients (a hostile one). With
    ``identities`` the server checks the signatures itself unless not ``server_verifies``
    (then only the neighbours do); their certificates are named ``site<id>``. A reply the
    server rejects excludes its client, as in the driver. Raises SecAggAbort."""
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
    replies: dict[str, dict[int, Record]] = {}
    errors = {} if errors is None else errors  # the caller's dict survives an abort
    for step in STEPS:
        replies[step] = {}
        for task in server.tasks(step, {c: 1000 + c for c in inputs}):
            cid = task.client_id
            if cid in (drop or {}).get(step, set()):
                continue
            if tamper and step in tamper:
                task = tamper[step](task)
            client = (clients or {}).get(cid) or SecAggClient(
                identities[cid] if identities else None
            )
            try:
                reply, sessions[cid] = client.handle(task, sessions[cid])
            except SecAggError as exc:
                errors[cid] = str(exc)
                continue
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
