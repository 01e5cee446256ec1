"""Persistent worker processes for client code that cannot be vectorized.

A pool is forked once per run. Each worker inherits the algorithm, model and dataset at fork
time (nothing is pickled) and keeps them warm across rounds. Per round the parent writes the
global parameters once into a shared mapping; each worker writes its client's update into
its own shared result mapping and reports a small fixed-format header over a pipe. A worker
that dies fails only the client it was running and is replaced by a fresh fork.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import struct
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from fedforge.algorithms.base import Algorithm
from fedforge.core.params import Params
from fedforge.core.results import ClientFailure, ClientOutcome, ClientResult
from fedforge.core.rng import Purpose, RngStreams
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.shared_params import ParamLayout
from fedforge.train.torch_model import TorchModel

log = logging.getLogger("fedforge")

_TASK = struct.Struct("<qqq")  # generation (-1 = stop), round, client id
_RESULT = struct.Struct("<qqdB")  # client id, num_examples, train_loss, ok flag


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    result_buffer: Any
    client_id: int | None = None


def _worker_main(
    conn: Connection,
    global_buffer: Any,
    result_buffer: Any,
    layout: ParamLayout,
    algorithm: Algorithm,
    module: torch.nn.Module,
    data: FederatedDataset,
    streams: RngStreams,
    threads: int,
) -> None:
    torch.set_num_threads(threads)
    model = TorchModel(module)
    generation, params = -2, None
    while True:
        gen, round_number, cid = _TASK.unpack(conn.recv_bytes())
        if gen < 0:
            return
        if gen != generation:
            generation, params = gen, layout.read(global_buffer)
        assert params is not None
        try:
            rng = streams.generator(Purpose.CLIENT, round_number, cid)
            res = algorithm.client_update(cid, model, params, data.client(cid), rng)
            layout.write(result_buffer, res.update)
            conn.send_bytes(_RESULT.pack(cid, int(res.num_examples), float(res.train_loss), 1))
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            conn.send_bytes(_RESULT.pack(cid, 0, math.nan, 0) + text.encode())


class WorkerPoolBackend:
    """Runs clients on ``num_workers`` forked processes with warm state."""

    def __init__(
        self,
        algorithm: Algorithm,
        module: torch.nn.Module,
        data: FederatedDataset,
        streams: RngStreams,
        *,
        num_workers: int = 2,
        threads_per_worker: int = 1,
    ) -> None:
        if "fork" not in mp.get_all_start_methods():
            raise RuntimeError("the worker pool needs the 'fork' start method (Linux or macOS)")
        self._ctx = mp.get_context("fork")
        self._args = (algorithm, module, data, streams, threads_per_worker)
        self.layout = ParamLayout(TorchModel(module).get_params())
        self._global = self.layout.allocate()
        self._generation = 0
        self.workers = [self._spawn() for _ in range(num_workers)]

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        buffer = self.layout.allocate()
        process = self._ctx.Process(
            target=_worker_main,
            args=(child, self._global, buffer, self.layout, *self._args),
            daemon=True,
        )
        process.start()
        child.close()
        return _Worker(process, parent, buffer)

    def run(
        self, round_number: int, client_ids: Sequence[int], params: Params
    ) -> Iterator[ClientOutcome]:
        self._generation += 1
        self.layout.write(self._global, params)
        pending = deque(client_ids)
        for worker in list(self.workers):
            self._assign(worker, pending, round_number)
        while busy := [w for w in self.workers if w.client_id is not None]:
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for worker in busy:
                if worker.conn in ready or worker.process.sentinel in ready:
                    outcome, live = self._collect(worker)
                    yield outcome
                    self._assign(live, pending, round_number)

    def _assign(self, worker: _Worker, pending: deque[int], round_number: int) -> None:
        """Give ``worker`` the next pending client; replace it first if it has died."""
        if not pending:
            return
        if not worker.process.is_alive():
            worker = self._replace(worker)
        worker.client_id = pending.popleft()
        worker.conn.send_bytes(_TASK.pack(self._generation, round_number, worker.client_id))

    def _replace(self, dead: _Worker) -> _Worker:
        dead.process.join(timeout=5)
        log.warning(
            "worker process %s died (exit code %s); starting a replacement",
            dead.process.pid,
            dead.process.exitcode,
        )
        dead.conn.close()
        replacement = self._spawn()
        self.workers[self.workers.index(dead)] = replacement
        return replacement

    def _collect(self, worker: _Worker) -> tuple[ClientOutcome, _Worker]:
        """Read the outcome of ``worker``'s client; return it and the worker to reuse."""
        cid = worker.client_id
        assert cid is not None
        worker.client_id = None
        try:
            message = worker.conn.recv_bytes()
        except (EOFError, OSError):
            worker.process.join(timeout=5)
            failure = ClientFailure(
                cid, f"worker process died (exit code {worker.process.exitcode})"
            )
            return failure, self._replace(worker)
        got_cid, n, loss, ok = _RESULT.unpack_from(message)
        if not ok:
            error, _, tb = message[_RESULT.size :].decode(errors="replace").partition("\n")
            return ClientFailure(got_cid, error, tb), worker
        return ClientResult(got_cid, n, self.layout.read(worker.result_buffer), loss), worker

    def close(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.conn.send_bytes(_TASK.pack(-1, 0, 0))
        for worker in self.workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
            worker.conn.close()
        self.workers = []
