"""Ray backend: the same algorithm objects run as Ray actors, on one machine or a cluster.

Install with ``pip install 'fedforge[ray]'``. Each actor holds a warm copy of the model,
algorithm and dataset. Parameters and updates travel as safetensors bytes; Ray itself ships
the actor's constructor arguments (algorithm, model, data) with its own serializer, once per
actor, inside the cluster you started, so use it only on a cluster you trust.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from safetensors.numpy import load as load_params
from safetensors.numpy import save as save_params

from fedforge.algorithms.base import Algorithm
from fedforge.core.params import Params
from fedforge.core.results import ClientFailure, ClientOutcome, ClientResult
from fedforge.core.rng import Purpose, RngStreams
from fedforge.data.federated import FederatedDataset
from fedforge.train.torch_model import TorchModel


class ClientActor:
    """Runs ``algorithm.client_update`` for the clients it is handed."""

    def __init__(
        self,
        algorithm: Algorithm,
        module: torch.nn.Module,
        data: FederatedDataset,
        seed: int,
        threads: int,
    ) -> None:
        torch.set_num_threads(threads)
        self.algorithm, self.model, self.data = algorithm, TorchModel(module), data
        self.streams = RngStreams(seed)

    def fit(self, blob: bytes, round_number: int, cid: int) -> tuple[int, float, bytes]:
        params = load_params(blob)
        rng = self.streams.generator(Purpose.CLIENT, round_number, cid)
        res = self.algorithm.client_update(cid, self.model, params, self.data.client(cid), rng)
        return int(res.num_examples), float(res.train_loss), save_params(res.update)


class RayBackend:
    """Runs clients on ``num_actors`` Ray actors, at most one task in flight per actor."""

    def __init__(
        self,
        algorithm: Algorithm,
        module: torch.nn.Module,
        data: FederatedDataset,
        streams: RngStreams,
        *,
        num_actors: int = 2,
        address: str | None = None,
        cpus_per_actor: float = 1.0,
    ) -> None:
        import ray

        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self._actor_class = ray.remote(num_cpus=cpus_per_actor)(ClientActor)
        self._init_args = (
            algorithm,
            module,
            ray.put(data),
            streams.seed,
            max(1, int(cpus_per_actor)),
        )
        self.actors = [self._new_actor() for _ in range(num_actors)]

    def _new_actor(self) -> Any:
        return self._actor_class.remote(*self._init_args)

    def run(
        self, round_number: int, client_ids: Sequence[int], params: Params
    ) -> Iterator[ClientOutcome]:
        ray = self._ray
        blob = ray.put(save_params(params))
        pending = list(client_ids)[::-1]
        in_flight: dict[Any, tuple[int, int]] = {}  # ref -> (actor index, client id)

        def submit(slot: int) -> None:
            if pending:
                cid = pending.pop()
                in_flight[self.actors[slot].fit.remote(blob, round_number, cid)] = (slot, cid)

        for slot in range(len(self.actors)):
            submit(slot)
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            slot, cid = in_flight.pop(ref)
            try:
                n, loss, update = ray.get(ref)
                yield ClientResult(cid, n, load_params(update), loss)
            except ray.exceptions.RayActorError as exc:
                yield ClientFailure(cid, f"Ray actor died: {exc}", traceback.format_exc())
                self.actors[slot] = self._new_actor()
            except Exception as exc:
                cause = getattr(exc, "cause", exc)
                yield ClientFailure(cid, f"{type(cause).__name__}: {cause}", str(exc))
            submit(slot)

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
