"""What a client sends back: a result, or the reason it failed."""

from __future__ import annotations

from dataclasses import dataclass

from fedforge.core.params import Params


@dataclass(frozen=True)
class ClientResult:
    """A client's update for one round.

    ``update`` is the client's contribution in parameter space (for FedAvg the delta
    ``local - global``); ``num_examples`` is the aggregation weight the client claims.
    """

    client_id: int
    num_examples: int
    update: Params
    train_loss: float


@dataclass(frozen=True)
class ClientFailure:
    """A client that raised, crashed or timed out; the round goes on without it.

    ``rejected`` marks a result that arrived but broke the protocol (bad chunks, digest,
    encoding); the round loop counts it with the rejected results.
    """

    client_id: int
    error: str
    traceback: str = ""
    rejected: bool = False


ClientOutcome = ClientResult | ClientFailure
