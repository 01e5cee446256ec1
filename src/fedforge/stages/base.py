"""The stage seam: what happens to a record between the client's ``finish`` and the sum.

A stage has a client-side ``encode`` and a server-side ``decode`` (both on a
:class:`RecordBatch`, so the vectorized runtime encodes a whole chunk at once), explicit state
kept by the server and saved in checkpoints, a per-round ``broadcast`` of named scalars that
travels to clients with the model (a clip norm, a quantizer scale), the scalars it adds to
every record (summed beside the arrays), and ``commutes_with_sum``: whether its server-side
decode may be applied to a sum instead of to each record, which decides whether secure
aggregation may follow it.

The documented chain order (``POSITIONS``), client side: train, delta (``finish``), a
simulated attack (attacker clients only), clip, noise, compress, mask; server side the
reverse: unmask, decompress, aggregate, noise, server optimizer. A chain out of this order,
or one whose stages cannot precede its aggregation kind, is refused before training with a
message naming the conflict.

A stage may keep **client state** across rounds (error feedback's residual):
``encode_with_state`` gets and returns each row's own entries, which live in the client's
state under ``stage/<name>/`` beside the algorithm's, in every runtime.

Server-side hooks beyond ``decode``: ``weights`` may bound the aggregation weights (DP needs
bounded ones), ``on_sum`` changes the aggregate after summation (central DP adds its noise
there and divides by a fixed denominator), ``budget_problem`` stops a run before a release it
cannot afford. :class:`StageDefaults` gives every hook its do-nothing form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedforge.aggregate.kinds import Aggregate, Aggregation, Summed
from fedforge.core.errors import ConfigError
from fedforge.core.params import Params
from fedforge.core.records import RecordBatch, RecordSpec

POSITIONS = {"attack": 0, "clip": 10, "noise": 20, "compress": 30, "mask": 40}

StageState = dict[str, float]
STAGE_STATE = "stage/"  # prefix of the stages' entries in a client's state


class Stage(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def position(self) -> str:
        """One of ``POSITIONS``."""
        ...

    @property
    def commutes_with_sum(self) -> bool: ...

    def init_state(self) -> StageState: ...

    def broadcast(self, state: StageState) -> dict[str, float]: ...

    def summed_scalars(self) -> tuple[str, ...]: ...

    def wire_spec(self, spec: RecordSpec) -> RecordSpec: ...

    def encode(
        self, batch: RecordBatch, broadcast: Mapping[str, float], seeds: Sequence[int]
    ) -> RecordBatch:
        """Client side, on a batch of records; ``seeds`` are the rows' 128-bit task seeds."""
        ...

    def decode(self, batch: RecordBatch, state: StageState) -> RecordBatch: ...

    @property
    def keeps_client_state(self) -> bool: ...

    def encode_with_state(
        self,
        batch: RecordBatch,
        broadcast: Mapping[str, float],
        seeds: Sequence[int],
        states: Sequence[Params],
    ) -> tuple[RecordBatch, list[Params]]:
        """``encode`` for a stage that keeps client state: each row's state in, new out."""
        ...

    def weights(self, batch: RecordBatch, weights: np.ndarray) -> np.ndarray:
        """The aggregation weights of the decoded records (given the algorithm's)."""
        ...

    def on_sum(self, aggregate: Aggregate, state: StageState, context: SumContext) -> Aggregate:
        """Server side, after summation and before the server update."""
        ...

    def finish_round(
        self, state: StageState, aggregate: Aggregate
    ) -> tuple[StageState, dict[str, float]]: ...

    def budget_problem(self, state: StageState) -> str | None:
        """Why the next release must not happen (a spent privacy budget), or None."""
        ...

    def labels(self) -> dict[str, str]:
        """Named descriptions recorded with every round (the DP mode and its accounting)."""
        ...


@dataclass(frozen=True)
class SumContext:
    """What ``on_sum`` knows: the round, the attempt, and the broadcast the clients got."""

    round: int
    attempt: int
    broadcast: Mapping[str, float]


class StageDefaults:
    """Do-nothing implementations of every hook; a stage overrides what it uses."""

    commutes_with_sum: bool = True
    releases_when_empty: bool = False  # central DP: noise is released even with no record
    # A privacy ledger (local, distributed DP): its ``finish_round`` runs in a round in which
    # nothing was summed too (with an empty aggregate), to count rejected records and carry
    # its epsilon forward.
    reports_when_empty: bool = False
    keeps_client_state: bool = False

    def init_state(self) -> StageState:
        return {}

    def broadcast(self, state: StageState) -> dict[str, float]:
        return {}

    def summed_scalars(self) -> tuple[str, ...]:
        return ()

    def wire_spec(self, spec: RecordSpec) -> RecordSpec:
        return spec

    def encode(
        self, batch: RecordBatch, broadcast: Mapping[str, float], seeds: Sequence[int]
    ) -> RecordBatch:
        return batch

    def decode(self, batch: RecordBatch, state: StageState) -> RecordBatch:
        return batch

    def encode_with_state(
        self,
        batch: RecordBatch,
        broadcast: Mapping[str, float],
        seeds: Sequence[int],
        states: Sequence[Params],
    ) -> tuple[RecordBatch, list[Params]]:
        return self.encode(batch, broadcast, seeds), [dict(s) for s in states]

    def weights(self, batch: RecordBatch, weights: np.ndarray) -> np.ndarray:
        return weights

    def on_sum(self, aggregate: Aggregate, state: StageState, context: SumContext) -> Aggregate:
        return aggregate

    def finish_round(
        self, state: StageState, aggregate: Aggregate
    ) -> tuple[StageState, dict[str, float]]:
        return state, {}

    def budget_problem(self, state: StageState) -> str | None:
        return None

    def labels(self) -> dict[str, str]:
        return {}


class StageChain:
    """Stages in chain order; ``check`` refuses impossible chains."""

    def __init__(self, stages: Sequence[Stage] = ()) -> None:
        self.stages = tuple(stages)
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"update stages must have distinct names, got {names}")
        for earlier, later in zip(self.stages, self.stages[1:], strict=False):
            if POSITIONS[earlier.position] > POSITIONS[later.position]:
                raise ConfigError(
                    f"stage {later.name!r} ({later.position}) cannot follow stage "
                    f"{earlier.name!r} ({earlier.position}): the chain order is "
                    + " -> ".join(POSITIONS)
                )

    def check(self, aggregation: Aggregation) -> None:
        """Refuse stages whose server-side decode cannot precede ``aggregation``."""
        if aggregation.kind != "secure_sum":
            return
        for stage in self.stages:
            if not stage.commutes_with_sum:
                raise ConfigError(
                    f"stage {stage.name!r} does not commute with summation, so it cannot "
                    f"precede secure aggregation (the server sees only the sum)"
                )

    @staticmethod
    def _state(states: Mapping[str, StageState], stage: Stage) -> StageState:
        """A stage's state; its initial state until the first round has set it."""
        return states[stage.name] if stage.name in states else stage.init_state()

    def broadcast(self, states: Mapping[str, StageState]) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.stages:
            out.update(s.broadcast(self._state(states, s)))
        return out

    def wire_spec(self, spec: RecordSpec) -> RecordSpec:
        for s in self.stages:
            spec = s.wire_spec(spec.with_scalars(s.summed_scalars()))
        return spec

    @property
    def keeps_client_state(self) -> bool:
        return any(s.keeps_client_state for s in self.stages)

    @property
    def decodes(self) -> bool:
        """Whether some stage's server side changes records (a codec, a clip check)."""
        plain = StageDefaults.decode
        return any(getattr(type(s), "decode", None) is not plain for s in self.stages)

    def encode(
        self,
        batch: RecordBatch,
        broadcast: Mapping[str, float],
        seeds: Sequence[int],
        states: Sequence[Params] | None = None,
    ) -> tuple[RecordBatch, list[Params]]:
        """Every stage's client side, in chain order. ``states`` holds each row's client
        state (only the ``stage/`` entries are read); returns the encoded batch and each
        row's new stage entries (empty dicts when no stage keeps client state)."""
        rows: list[Params] = [{} for _ in range(len(batch))]
        for s in self.stages:
            if not s.keeps_client_state:
                batch = s.encode(batch, broadcast, seeds)
                continue
            prefix = f"{STAGE_STATE}{s.name}/"
            own = [
                {k[len(prefix) :]: v for k, v in (state or {}).items() if k.startswith(prefix)}
                for state in (states or [{}] * len(batch))
            ]
            batch, new = s.encode_with_state(batch, broadcast, seeds, own)
            for row, entries in zip(rows, new, strict=True):
                row.update({prefix + k: v for k, v in entries.items()})
        return batch, rows

    def decode(self, batch: RecordBatch, states: Mapping[str, StageState]) -> RecordBatch:
        for s in reversed(self.stages):
            batch = s.decode(batch, self._state(states, s))
        return batch

    def weighted_sum(self, batch: RecordBatch, weights: np.ndarray) -> Summed | None:
        """``weights @ decoded rows`` without decoding each record, when one stage alone
        decodes and it can sum its records so (a codec: ``stages/compress.py``); else None
        (decode the records)."""
        plain = StageDefaults.decode
        decoding = [s for s in self.stages if getattr(type(s), "decode", None) is not plain]
        if len(decoding) != 1 or not hasattr(decoding[0], "weighted_sum"):
            return None
        summed: Summed | None = decoding[0].weighted_sum(batch, weights)
        return summed

    def weights(self, batch: RecordBatch, weights: np.ndarray) -> np.ndarray:
        for s in self.stages:
            weights = s.weights(batch, weights)
        return weights

    def on_sum(
        self, aggregate: Aggregate, states: Mapping[str, StageState], context: SumContext
    ) -> Aggregate:
        for s in reversed(self.stages):
            aggregate = s.on_sum(aggregate, self._state(states, s), context)
        return aggregate

    @property
    def releases_when_empty(self) -> bool:
        return any(getattr(s, "releases_when_empty", False) for s in self.stages)

    def finish_ledgers(
        self, states: Mapping[str, StageState], aggregate: Aggregate
    ) -> tuple[dict[str, StageState], dict[str, float]]:
        """A round in which nothing was summed: only the ledgers (``reports_when_empty``)
        finish it; every other stage keeps its state."""
        new_states, metrics = dict(states), {}
        for s in self.stages:
            if getattr(s, "reports_when_empty", False):
                new_states[s.name], m = s.finish_round(self._state(states, s), aggregate)
                metrics.update(m)
        return new_states, metrics

    def labels(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for s in self.stages:
            out.update(s.labels())
        return out

    def budget_problem(self, states: Mapping[str, StageState]) -> str | None:
        for s in self.stages:
            problem = s.budget_problem(self._state(states, s))
            if problem:
                return problem
        return None

    def finish_round(
        self, states: Mapping[str, StageState], aggregate: Aggregate
    ) -> tuple[dict[str, StageState], dict[str, float]]:
        new_states, metrics = {}, {}
        for s in self.stages:
            new_states[s.name], m = s.finish_round(self._state(states, s), aggregate)
            metrics.update(m)
        return new_states, metrics
