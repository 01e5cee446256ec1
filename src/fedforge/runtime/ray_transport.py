"""Ray runtime: the same client app runs in Ray actors, on one machine or a cluster.

Install with ``pip install 'fedforge[ray]'``. Each actor holds a warm copy of the client app
(model, algorithm, stages) and of the dataset. Tasks and replies travel as
:mod:`~fedforge.runtime.messages` bytes (safetensors arrays and a JSON header); the shared
arrays of an exchange go to each actor once, with its first task of the exchange. Client state
stays with the parent: it reads a client's state from its store into the task and writes the
new state the reply brings back. Ray itself ships the actor's constructor arguments (the app
and the dataset) with its own serializer (cloudpickle), once per actor, inside the cluster you
started, so use it only on a cluster you trust; your modules loaded from a project directory
(a model factory, a training function) travel by value, so actors need not find them. An
actor that dies fails only the client it was running and is replaced.
"""

from __future__ import annotations

import logging
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fedforge.core.records import ClientFailure, Reply, Task
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.client_state import ClientStateStore
from fedforge.runtime.sequential import failure
from fedforge.runtime.workers import TaskServer, message_for, reply_from
from fedforge.workload.imports import PROJECT_MODULES

log = logging.getLogger("fedforge")


class ClientActor:
    """Answers task messages with reply messages (see :class:`TaskServer`)."""

    def __init__(self, app: ClientApp, data: FederatedDataset, threads: int) -> None:
        torch.set_num_threads(threads)
        self.server = TaskServer(app, data)

    def run(self, message: bytes) -> bytes:
        return self.server(message)


class RayTransport:
    """Runs tasks on ``num_actors`` Ray actors, at most one task in flight per actor."""

    def __init__(
        self,
        app: ClientApp,
        data: FederatedDataset,
        store: ClientStateStore,
        *,
        num_actors: int = 2,
        address: str | None = None,
        cpus_per_actor: float = 1.0,
    ) -> None:
        import ray

        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self.app, self.store = app, store
        for module in PROJECT_MODULES.values():  # your code from a project directory: by value
            ray.cloudpickle.register_pickle_by_value(module)  # type: ignore[no-untyped-call]
        self._actor_class = ray.remote(num_cpus=cpus_per_actor)(ClientActor)
        self._init_args = (app, ray.put(data), max(1, int(cpus_per_actor)))
        self._generation = 0
        self._shared: object = None
        self.actors = [self._new_actor() for _ in range(num_actors)]
        self._generations = [-1] * num_actors  # the exchange whose shared arrays each holds

    def _new_actor(self) -> Any:
        return self._actor_class.remote(*self._init_args)

    def exchange(self, tasks: Sequence[Task]) -> Iterator[Reply]:
        ray = self._ray
        self._generation += 1
        self._shared = None
        pending = deque(tasks)
        in_flight: dict[Any, tuple[int, Task]] = {}  # ref -> (actor slot, task)
        idle = deque(range(len(self.actors)))
        while pending or in_flight:
            while pending and idle:
                slot, task = idle[0], pending.popleft()
                if task.shared is not self._shared:
                    self._shared = task.shared
                    self._generation += 1
                try:
                    include = self._generations[slot] != self._generation
                    message = message_for(self.app, self.store, task, include)
                except Exception as exc:
                    yield failure(task.client_id, exc)
                    continue
                idle.popleft()
                in_flight[self.actors[slot].run.remote(message)] = (slot, task)
                self._generations[slot] = self._generation
            if not in_flight:
                continue
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            slot, task = in_flight.pop(ref)
            idle.append(slot)
            try:
                data = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                log.warning("Ray actor %d died (%s); starting a replacement", slot, exc)
                self.actors[slot] = self._new_actor()
                self._generations[slot] = -1
                yield ClientFailure(
                    task.client_id, f"Ray actor died: {exc}", traceback.format_exc()
                )
                continue
            except Exception as exc:
                cause = getattr(exc, "cause", exc)
                yield ClientFailure(task.client_id, f"{type(cause).__name__}: {cause}", str(exc))
                continue
            yield reply_from(data, task, self.store)

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
