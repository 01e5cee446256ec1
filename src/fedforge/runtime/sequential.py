"""In-process runtime: clients answer one after another in this process (the reference)."""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Sequence

from fedforge.core.records import ClientFailure, Reply, Task
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.client_state import ClientStateStore
from fedforge.train.site_cohort import Trained


def failure(client_id: int, exc: BaseException) -> ClientFailure:
    return ClientFailure(client_id, f"{type(exc).__name__}: {exc}", traceback.format_exc())


def answer(
    app: ClientApp,
    task: Task,
    data: FederatedDataset,
    store: ClientStateStore,
    trained: Trained | None = None,
) -> Reply:
    """Run one task in this process, with the client's state from ``store`` (``trained``:
    a fit whose training its cohort did)."""
    try:
        state = app.stored_state(task, store)
        site = data.client_data(task.client_id)
        if trained is None:
            record, new_state = app.handle(task, site, state)
        else:
            record, new_state = app.handle(task, site, state, trained)
    except Exception as exc:  # a failing client must not stop the round
        return failure(task.client_id, exc)
    if new_state is not None:
        store.put(task.client_id, new_state, task.round)
    return record


class SequentialTransport:
    """Simplest, deterministic, and the baseline every other runtime must match."""

    def __init__(self, app: ClientApp, data: FederatedDataset, store: ClientStateStore) -> None:
        self.app, self.data, self.store = app, data, store

    def exchange(self, tasks: Sequence[Task]) -> Iterator[Reply]:
        for task in tasks:
            yield answer(self.app, task, self.data, self.store)

    def close(self) -> None:
        """Nothing to release."""
