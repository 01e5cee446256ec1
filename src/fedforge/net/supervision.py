"""Keeping a deployed run going: who is alive, when to try a round again, what to log.

:class:`Watchdog` closes the sessions of clients that fell silent or were revoked;
:class:`RetryPolicy` decides how long to wait before another attempt of a failing round (the
server never gives up on its sites); :class:`RoundLog` writes one line per round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from fedforge.net.hub import Hub
from fedforge.net.keys import ServerCredentials
from fedforge.report.history import RoundRecord
from fedforge.runtime.driver import RoundListener

log = logging.getLogger("fedforge")


# The named client lists a round line spells out, in order, with how it says each.
TROUBLE = {
    "failed": "failed",
    "rejected": "rejected",
    "secagg_failed": "failed a secure step",
    "secagg_excluded": "excluded from the secure sum",
    "refused": "refused (the round is retried without them)",
    "clamped": "counted at their size cap",
}


class RoundLog(RoundListener):
    """One INFO line per round, with names of the clients that failed, were rejected,
    excluded from the secure sum, refused as outliers, or clamped to their size cap."""

    def __init__(self, inner: RoundListener, names: Mapping[int, str]) -> None:
        self.inner = inner
        self.names = names  # client id -> name
        self.started = time.monotonic()

    def _name(self, cid: int) -> str:
        return self.names.get(cid, f"client {cid}")

    def round_started(self, round_number: int, client_ids: list[int]) -> None:
        self.started = time.monotonic()
        self.inner.round_started(round_number, client_ids)

    def round_expects(self, results: int) -> None:
        self.inner.round_expects(results)

    def client_done(self, client_id: int, status: str) -> None:
        self.inner.client_done(client_id, status)

    def client_reported(
        self, client_id: int, status: str, reason: str, metrics: dict[str, float]
    ) -> None:
        self.inner.client_reported(client_id, status, reason, metrics)

    def round_finished(self, record: RoundRecord) -> None:
        if record.round > 0:
            trouble = "".join(
                f"; {said}: {', '.join(self._name(c) for c in record.clients[kind])}"
                for kind, said in TROUBLE.items()
                if record.clients.get(kind)
            )
            log.info(
                "round %d: %d sampled, %d accepted, %d rejected, %d failed, accuracy %.4f, "
                "%.1f s%s",
                record.round,
                record.clients_sampled,
                record.clients_completed,
                record.clients_rejected,
                record.clients_failed,
                record.test_accuracy,
                time.monotonic() - self.started,
                trouble,
            )
        self.inner.round_finished(record)


class RetryPolicy:
    """Before each attempt of a round: wait until enough clients are connected; once a
    round has failed ``max_retries`` times, wait for a client to (re)connect or for a round
    deadline before trying again, logging it (the server never gives up on its sites)."""

    def __init__(self, hub: Hub, needed: int, max_retries: int, wait_s: float) -> None:
        self.hub = hub
        self.needed = needed
        self.max_retries = max_retries
        self.wait_s = wait_s
        self.attempts = 0

    def round_done(self, save: Callable[[], None]) -> None:
        """A round completed: ``save`` it, and start counting attempts afresh."""
        save()
        self.attempts = 0

    def before_attempt(self) -> None:
        self.attempts += 1
        if self.attempts > self.max_retries + 1:
            log.warning(
                "%d attempts of this round failed; waiting up to %g s for a client to "
                "connect before trying again",
                self.attempts - 1,
                self.wait_s,
            )
            self.hub.wait_for_change(self.wait_s)
        self.hub.wait_for_clients(self.needed)


class Watchdog:
    """Closes the sessions of clients that fell silent (a frozen process, a network
    partition) within ``silent_heartbeats`` heartbeat intervals, and of clients whose
    certificate was revoked while connected."""

    def __init__(
        self,
        hub: Hub,
        credentials: ServerCredentials | None,
        heartbeat_s: float,
        silent_heartbeats: float,
    ) -> None:
        self.hub = hub
        self.credentials = credentials
        self.silent_s = heartbeat_s * silent_heartbeats
        self.period_s = heartbeat_s / 4
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="watchdog")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.hub.reap(self.silent_s)
            if self.credentials is not None:
                revoked = self.credentials.revoked_names()
                if revoked:
                    self.hub.close_where(revoked.__contains__, "its certificate was revoked")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
