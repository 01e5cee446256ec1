"""Sequential in-process backend: clients run one after another in this process."""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Sequence

from fedforge.algorithms.base import Algorithm
from fedforge.core.params import Params
from fedforge.core.results import ClientFailure, ClientOutcome
from fedforge.core.rng import Purpose, RngStreams
from fedforge.data.federated import FederatedDataset
from fedforge.train.torch_model import TorchModel


class SequentialBackend:
    """The reference runtime: simplest, deterministic, and the baseline others must match."""

    def __init__(
        self,
        algorithm: Algorithm,
        model: TorchModel,
        data: FederatedDataset,
        streams: RngStreams,
    ) -> None:
        self.algorithm = algorithm
        self.model = model
        self.data = data
        self.streams = streams

    def run(
        self, round_number: int, client_ids: Sequence[int], params: Params
    ) -> Iterator[ClientOutcome]:
        for cid in client_ids:
            rng = self.streams.generator(Purpose.CLIENT, round_number, cid)
            try:
                yield self.algorithm.client_update(
                    cid, self.model, params, self.data.client(cid), rng
                )
            except Exception as exc:  # a failing client must not stop the round
                yield ClientFailure(cid, f"{type(exc).__name__}: {exc}", traceback.format_exc())

    def close(self) -> None:
        """Nothing to release."""
