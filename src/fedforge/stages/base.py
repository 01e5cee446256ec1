"""The stage seam: what happens to a record between the client's ``finish`` and the sum.

A stage has a client-side ``encode`` and a server-side ``decode`` (both on a
:class:`RecordBatch`, so the vectorized runtime encodes a whole chunk at once), explicit state
kept by the server and saved in checkpoints, a per-round ``broadcast`` of named scalars that
travels to clients with the model (a clip norm, a quantizer scale), the scalars it adds to
every record (summed beside the arrays), and ``commutes_with_sum``: whether its server-side
decode may be applied to a sum instead of to each record, which decides whether secure
aggregation may follow it.

The documented chain order (``POSITIONS``), client side: train, delta (``finish``), clip,
noise, compress, mask; server side the reverse: unmask, decompress, aggregate, noise, server
optimizer. A chain out of this order, or one whose stages cannot precede its aggregation kind,
is refused before training with a message naming the conflict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from fedforge.aggregate.kinds import Aggregate, Aggregation
from fedforge.core.errors import ConfigError
from fedforge.core.records import RecordBatch, RecordSpec

POSITIONS = {"clip": 10, "noise": 20, "compress": 30, "mask": 40}

StageState = dict[str, float]


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

    def encode(self, batch: RecordBatch, broadcast: Mapping[str, float]) -> RecordBatch: ...

    def decode(self, batch: RecordBatch, state: StageState) -> RecordBatch: ...

    def finish_round(
        self, state: StageState, aggregate: Aggregate
    ) -> tuple[StageState, dict[str, float]]: ...


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

    def encode(self, batch: RecordBatch, broadcast: Mapping[str, float]) -> RecordBatch:
        for s in self.stages:
            batch = s.encode(batch, broadcast)
        return batch

    def decode(self, batch: RecordBatch, states: Mapping[str, StageState]) -> RecordBatch:
        for s in reversed(self.stages):
            batch = s.decode(batch, self._state(states, s))
        return batch

    def finish_round(
        self, states: Mapping[str, StageState], aggregate: Aggregate
    ) -> tuple[dict[str, StageState], dict[str, float]]:
        new_states, metrics = {}, {}
        for s in self.stages:
            new_states[s.name], m = s.finish_round(self._state(states, s), aggregate)
            metrics.update(m)
        return new_states, metrics
