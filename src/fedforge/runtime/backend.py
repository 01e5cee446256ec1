"""The seam between the round loop and whatever executes client work."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from fedforge.core.params import Params
from fedforge.core.results import ClientOutcome


class ClientBackend(Protocol):
    """Runs the algorithm's client update for each sampled client.

    Yields one outcome per client, in any order, as soon as it is ready. A client that
    raises must be yielded as a :class:`~fedforge.core.results.ClientFailure`; the backend
    itself never aborts the round because of one client.
    """

    def run(
        self, round_number: int, client_ids: Sequence[int], params: Params
    ) -> Iterator[ClientOutcome]: ...

    def close(self) -> None: ...
