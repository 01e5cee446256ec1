"""Persistent forked worker processes for client code that cannot be vectorized.

A pool is forked once per run. Each worker inherits the client app (model, algorithm, stages)
and the dataset at fork time, so nothing is pickled, and keeps them warm across rounds. Tasks
and replies cross the pipe as :mod:`~fedforge.runtime.messages` bytes (safetensors arrays and
a JSON header, no pickle). The shared arrays of an exchange (the model and the algorithm's
broadcast) go to each worker at most once per exchange, with its first task; every task
carries only its client's state, which the parent reads from the state store, and the parent
writes the new state the reply brings back. Replies are yielded as they arrive. A client that
raises is a :class:`ClientFailure` with its traceback; a worker that dies (OOM kill, segfault)
fails only the client it was running and is replaced by a fresh fork.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import signal
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import torch

from fedforge.core.params import Params
from fedforge.core.records import ClientFailure, Reply, Task
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.client_state import ClientStateStore
from fedforge.runtime.messages import (
    MessageError,
    decode_reply,
    decode_task,
    encode_failure,
    encode_reply,
    encode_task,
)
from fedforge.runtime.sequential import failure

log = logging.getLogger("fedforge")

_STOP = b""


class TaskServer:
    """The client side of a message transport: decodes a task, runs it with the app and
    answers with reply bytes; never raises for a client's error. Holds the shared arrays of
    the current exchange between tasks."""

    def __init__(self, app: ClientApp, data: FederatedDataset) -> None:
        self.app, self.data = app, data
        self.shared: Params = {}

    def __call__(self, message: bytes) -> bytes:
        client_id = -1
        try:
            decoded = decode_task(message)
            task = decoded.task
            client_id = task.client_id
            if decoded.includes_shared:
                self.shared = dict(task.shared)
            else:
                task = replace(task, shared=self.shared)
            record, new_state = self.app.handle(
                task, self.data.client_data(task.client_id), decoded.state
            )
        except Exception as exc:  # a failing client must not stop its worker
            return encode_failure(client_id, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        try:
            return encode_reply(record, new_state)
        except MessageError as exc:  # an answer that cannot travel is a broken answer
            return encode_failure(client_id, str(exc), traceback.format_exc(), rejected=True)


def message_for(app: ClientApp, store: ClientStateStore, task: Task, include_shared: bool) -> bytes:
    """The bytes of ``task`` with the client's state read from ``store`` exactly as the
    sequential runtime reads it (fit tasks of a stateful algorithm only)."""
    return encode_task(task, include_shared=include_shared, state=app.stored_state(task, store))


def reply_from(data: bytes, task: Task, store: ClientStateStore) -> Reply:
    """Decode a worker's reply to ``task``; store the client's new state if it sent one."""
    try:
        decoded = decode_reply(data)
    except MessageError as exc:
        return ClientFailure(task.client_id, f"undecodable reply: {exc}", rejected=True)
    if isinstance(decoded, ClientFailure):
        return replace(decoded, client_id=task.client_id)
    record, new_state = decoded
    if new_state is not None:
        store.put(task.client_id, new_state, task.round)
    return record


def _worker_main(conn: Connection, app: ClientApp, data: FederatedDataset, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    torch.set_num_threads(threads)
    server = TaskServer(app, data)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if message == _STOP:
            return
        conn.send_bytes(server(message))


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection
    generation: int = -1  # the exchange whose shared arrays it holds
    task: Task | None = None  # the task it is running


class WorkerPoolTransport:
    """Runs tasks on ``num_workers`` forked processes with warm state."""

    def __init__(
        self,
        app: ClientApp,
        data: FederatedDataset,
        store: ClientStateStore,
        *,
        num_workers: int = 2,
        threads_per_worker: int = 1,
    ) -> None:
        if "fork" not in mp.get_all_start_methods():
            raise RuntimeError("the worker pool needs the 'fork' start method (Linux or macOS)")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.app, self.data, self.store = app, data, store
        self._ctx = mp.get_context("fork")
        self._threads = threads_per_worker
        self._generation = 0
        self._shared: object = None  # held, so its id cannot be reused within an exchange
        self.workers = [self._spawn() for _ in range(num_workers)]

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main,
            args=(child, self.app, self.data, self._threads),
            daemon=True,
        )
        process.start()
        child.close()
        return _Worker(process, parent)

    def _replace(self, index: int, reason: str) -> None:
        dead = self.workers[index]
        if dead.process.is_alive():
            dead.process.kill()
        dead.process.join(timeout=5)
        log.warning(
            "worker process %s %s (exit code %s); starting a replacement",
            dead.process.pid,
            reason,
            dead.process.exitcode,
        )
        dead.conn.close()
        self.workers[index] = self._spawn()

    # One exchange ---------------------------------------------------------------------------
    def exchange(self, tasks: Sequence[Task]) -> Iterator[Reply]:
        self._generation += 1
        self._shared = None
        pending = deque(tasks)
        try:
            while True:
                for index in range(len(self.workers)):
                    while pending and self.workers[index].task is None:
                        refused = self._start(index, pending.popleft())
                        if refused is not None:
                            yield refused
                busy = [w for w in self.workers if w.task is not None]
                if not busy:
                    if not pending:
                        return
                    continue
                ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
                for worker in busy:
                    if worker.conn in ready or worker.process.sentinel in ready:
                        yield self._collect(self.workers.index(worker))
        finally:  # an abandoned exchange: workers still running would answer the next one
            for index, worker in enumerate(self.workers):
                if worker.task is not None:
                    worker.task = None
                    self._replace(index, "was stopped with its exchange")

    def _start(self, index: int, task: Task) -> ClientFailure | None:
        """Send ``task`` to worker ``index``; a failure if it could not be sent."""
        if task.shared is not self._shared:  # one generation per exchange's shared arrays
            self._shared = task.shared
            self._generation += 1
        if not self.workers[index].process.is_alive():
            self._replace(index, "died while idle")
        worker = self.workers[index]
        try:
            message = message_for(self.app, self.store, task, worker.generation != self._generation)
        except Exception as exc:
            return failure(task.client_id, exc)
        try:
            worker.conn.send_bytes(message)
        except OSError as exc:
            self._replace(index, f"could not take a task ({exc})")
            return ClientFailure(task.client_id, f"worker process died: {exc}")
        worker.generation, worker.task = self._generation, task
        return None

    def _collect(self, index: int) -> Reply:
        """The reply of worker ``index``'s client; replaces the worker if it died."""
        worker = self.workers[index]
        task = worker.task
        assert task is not None
        worker.task = None
        try:
            data = worker.conn.recv_bytes()
        except (EOFError, OSError):
            worker.process.join(timeout=5)
            code = worker.process.exitcode
            self._replace(index, "died")
            return ClientFailure(task.client_id, f"worker process died (exit code {code})")
        return reply_from(data, task, self.store)

    def close(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.conn.send_bytes(_STOP)
        for worker in self.workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            worker.conn.close()
        self.workers = []
