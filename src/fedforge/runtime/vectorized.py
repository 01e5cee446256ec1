"""Vectorized runtime: a round's fit tasks train as one batched program (CPU or CUDA).

Clients are sorted by step count and chunked to a memory budget. Each chunk: the clients'
states are stacked, :class:`~fedforge.train.cohort.CohortTrainer` runs the local program for
all of them, ``vmap(algorithm.finish)`` turns the stack into records, and the stages encode
the whole chunk. The chunk travels to the driver as one :class:`RecordBatch`, which it
validates and sums with array operations. The secure-aggregation steps run once per chunk
(``ClientApp.secure_chunk``); other tasks (federated evaluation) run per client.
"""

from __future__ import annotations

import copy
import logging
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch.func import vmap

from fedforge.compress.downlink import decode_broadcast
from fedforge.core.params import Params
from fedforge.core.records import FIT, ClientFailure, RecordBatch, Reply, Task
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.client_app import ClientApp, to_arrays, to_tensors
from fedforge.runtime.client_state import ClientStateStore
from fedforge.runtime.sequential import answer
from fedforge.runtime.threads import ThreadGovernor
from fedforge.secagg.protocol import MASK, SESSION, STEPS
from fedforge.secagg.session import RECORD
from fedforge.train.cohort import ClientPlan, CohortTrainer
from fedforge.train.program import INITIAL_LOSS, task_epochs

log = logging.getLogger("fedforge")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_memory_budget(device: torch.device) -> int:
    """Bytes per chunk: a quarter of GPU memory on CUDA; on CPU 128 MiB, which keeps each
    chunk's stacked weights near the last-level cache (measured fastest on 2 cores)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory // 4)
    return 128 << 20


class VectorizedTransport:
    """Fit tasks in chunks of one batched program; results equal the sequential runtime's to
    float tolerance (tested)."""

    def __init__(
        self,
        app: ClientApp,
        data: FederatedDataset,
        store: ClientStateStore,
        *,
        device: torch.device | None = None,
        memory_budget: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.app, self.data, self.store = app, data, store
        self.device = device or default_device()
        self.memory_budget = memory_budget or default_memory_budget(self.device)
        self.threads = ThreadGovernor(threads)
        algorithm = app.algorithm
        self.trainer = CohortTrainer(
            copy.deepcopy(app.module), app.program, data.train.x, data.train.y, self.device
        )
        self._finish = vmap(algorithm.finish, in_dims=(0, None, 0, 0))
        log.info("vectorized runtime on %s: %s", self.device, self.trainer.kernel)

    def chunk_size(self, shared: Mapping[str, np.ndarray], largest: int) -> int:
        """Clients per chunk: the budget over one client's stacked model copies, plus its
        state (read and written) when the algorithm keeps client state, and its activations
        at the widest batch a client of ``largest`` examples can take."""
        model = {n: shared[n] for n in self.app.model.names}
        own = sum(shared[n].nbytes for n in self.app.trainable) if self.app.stateful else 0
        per_client = self.trainer.bytes_per_client(model, own, largest)
        return max(1, self.memory_budget // per_client)

    def exchange(self, tasks: Sequence[Task]) -> Iterator[Reply]:
        fit = [t for t in tasks if t.stage == FIT]
        secure = [t for t in tasks if t.stage in STEPS]
        for task in tasks:
            if task.stage != FIT and task.stage not in STEPS:
                yield answer(self.app, task, self.data, self.store)
        if secure:
            yield from self._secure_steps(secure)
        if not fit:
            return
        self.threads.before_round()
        decoded = decode_broadcast(dict(fit[0].shared))  # a compressed broadcast, as float32
        fit = [replace(t, shared=decoded) for t in fit]
        local, program = self.app.algorithm.local, self.app.program

        def steps(t: Task) -> int:
            size = self.data.client_size(t.client_id)
            return program.num_steps(size, task_epochs(t.scalars, local))

        by_steps = sorted(fit, key=lambda t: -steps(t))
        largest = max(self.data.client_size(t.client_id) for t in fit)
        size = self.chunk_size(fit[0].shared, largest)
        shared = to_tensors(dict(fit[0].shared), self.device)
        for start in range(0, len(by_steps), size):
            chunk = by_steps[start : start + size]
            try:
                yield self._train_chunk(chunk, shared)
            except Exception:
                # Isolate the failing client(s): retrain the chunk one client at a time, so
                # only the clients that fail alone are reported failed (as on every runtime).
                for task in chunk:
                    try:
                        yield self._train_chunk([task], shared)
                    except Exception as exc:
                        tb = traceback.format_exc()
                        yield ClientFailure(task.client_id, f"{type(exc).__name__}: {exc}", tb)

    def _secure_steps(self, tasks: Sequence[Task]) -> Iterator[Reply]:
        """Secure-aggregation tasks, each step in chunks: a chunk runs the step once for all
        its clients (``ClientApp.secure_chunk``)."""
        for stage in dict.fromkeys(t.stage for t in tasks):
            step = [t for t in tasks if t.stage == stage]
            states = [self.app.stored_state(t, self.store) for t in step]
            size = self._secure_chunk_size(states) if stage == MASK else len(step)
            for start in range(0, len(step), size):
                chunk = step[start : start + size]
                answers = self.app.secure_chunk(chunk, states[start : start + size])
                for task, done in zip(chunk, answers, strict=True):
                    if isinstance(done, Exception):
                        why = f"{type(done).__name__}: {done}"
                        tb = "".join(traceback.format_exception(done))
                        yield ClientFailure(task.client_id, why, tb)
                        continue
                    reply, state = done
                    self.store.put(task.client_id, state, task.round)
                    yield reply

    def _secure_chunk_size(self, states: Sequence[Params | None]) -> int:
        """Clients per mask-step chunk: their masked inputs (ring words, at most twice the
        float32 record they keep) within the memory budget."""
        kept = SESSION + RECORD
        record = max(
            sum(v.nbytes for k, v in (s or {}).items() if k.startswith(kept)) for s in states
        )
        return max(1, self.memory_budget // max(2 * record, 1))

    def _stored_states(self, chunk: Sequence[Task]) -> list[Params | None]:
        """Each client's stored state, read once per chunk (None: none yet, or stateless)."""
        if not self.app.stateful:
            return [None] * len(chunk)
        return [self.store.get(t.client_id, t.round) for t in chunk]

    def _own_states(
        self, chunk: Sequence[Task], stored: Sequence[Params | None]
    ) -> dict[str, torch.Tensor]:
        """The chunk's algorithm states, stacked into fresh arrays (the algorithm's initial
        state for clients that have none yet)."""
        if not self.app.stateful:
            return {}
        task = chunk[0]
        initial = self.app.algorithm.init_client_state(
            {n: task.shared[n] for n in self.app.trainable}
        )
        stacked = {k: np.empty((len(chunk), *v.shape), dtype=v.dtype) for k, v in initial.items()}
        for row, state in enumerate(stored):
            for k, out in stacked.items():
                out[row] = initial[k] if state is None else state[k]
        return {k: torch.from_numpy(v).to(self.device) for k, v in stacked.items()}

    def _train_chunk(self, chunk: Sequence[Task], shared: dict[str, torch.Tensor]) -> RecordBatch:
        local = self.app.algorithm.local
        plans = [
            ClientPlan(
                t.client_id,
                self.data.partition[t.client_id],
                t.seed,
                task_epochs(t.scalars, local),
            )
            for t in chunk
        ]
        stored = self._stored_states(chunk)
        own = self._own_states(chunk, stored)
        program = self.app.program
        if program.initial_loss:  # q-FedAvg's F_k, before training
            own[INITIAL_LOSS] = self.trainer.initial_losses(shared, plans)
        result = self.trainer.train(shared, own, plans)
        delta = dict(result.params)  # the model has no buffers here (+ Ditto's personal copy)
        if not result.is_delta:  # in the trainer's stacks
            delta = {n: d.sub_(shared[program.base_name(n)]) for n, d in delta.items()}
        steps = torch.from_numpy(result.steps).to(self.device)
        with torch.no_grad():
            arrays, new_own = self._finish(delta, shared, own, steps)
        batch = RecordBatch(
            client_ids=np.array([t.client_id for t in chunk], np.int64),
            num_examples=np.array([len(p.indices) for p in plans], np.int64),
            arrays=to_arrays(arrays),
            metrics={"train_loss": result.train_loss},
        )
        batch, stage_states = self.app.stages.encode(
            batch, chunk[0].scalars, [t.seed for t in chunk], [s or {} for s in stored]
        )
        states = to_arrays(new_own) if new_own else {}
        if self.app.secure is not None:  # each record stays with its client until masked
            for row, task in enumerate(chunk):
                algorithm_state = {k: v[row] for k, v in states.items()}
                _, state = self.app.keep_record(
                    batch.row(row), {**algorithm_state, **stage_states[row]}, task.round
                )
                self.store.put(task.client_id, state, task.round)
            if self.app.secure.withhold_metrics:
                return RecordBatch(batch.client_ids, np.ones(len(batch), np.int64), {})
            return RecordBatch(
                batch.client_ids,
                batch.num_examples,
                {},
                metrics={k: v.copy() for k, v in batch.metrics.items()},
            )
        for row, task in enumerate(chunk):
            if states or stage_states[row]:
                # Rows of this chunk's fresh state arrays: no copy (nothing reuses them).
                algorithm_state = {k: v[row] for k, v in states.items()}
                self.store.put(task.client_id, {**algorithm_state, **stage_states[row]}, task.round)
        return batch

    def close(self) -> None:
        """Nothing to release."""
