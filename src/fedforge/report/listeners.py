"""Several round listeners as one: progress bar, live log, experiment trackers."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fedforge.report.history import RoundRecord
from fedforge.runtime.driver import RoundListener


class ListenerGroup(RoundListener):
    """Forwards every event to each listener in order; ``close`` closes those that can."""

    def __init__(self, listeners: Iterable[RoundListener | None]) -> None:
        self.listeners = [item for item in listeners if item is not None]

    def run_started(self, backend: str, device: str) -> None:
        for item in self.listeners:
            item.run_started(backend, device)

    def round_started(self, round_number: int, client_ids: list[int]) -> None:
        for item in self.listeners:
            item.round_started(round_number, client_ids)

    def round_expects(self, results: int) -> None:
        for item in self.listeners:
            item.round_expects(results)

    def client_done(self, client_id: int, status: str) -> None:
        for item in self.listeners:
            item.client_done(client_id, status)

    def client_reported(
        self, client_id: int, status: str, reason: str, metrics: dict[str, float]
    ) -> None:
        for item in self.listeners:
            item.client_reported(client_id, status, reason, metrics)

    def round_finished(self, record: RoundRecord) -> None:
        for item in self.listeners:
            item.round_finished(record)

    def close(self) -> None:
        for item in self.listeners:
            close = getattr(item, "close", None)
            if callable(close):
                close()


Event = Callable[[RoundListener], None]


class DeferredEvents(RoundListener):
    """Keeps each client's ``client_done`` and ``client_reported`` events, to be replayed to
    another listener later (FedBuff on the virtual clock trains a task before its result
    reaches the server: the listener hears of it when it does)."""

    def __init__(self) -> None:
        self.events: dict[int, list[Event]] = {}

    def client_done(self, client_id: int, status: str) -> None:
        self.events.setdefault(client_id, []).append(
            lambda listener: listener.client_done(client_id, status)
        )

    def client_reported(
        self, client_id: int, status: str, reason: str, metrics: dict[str, float]
    ) -> None:
        self.events.setdefault(client_id, []).append(
            lambda listener: listener.client_reported(client_id, status, reason, metrics)
        )
