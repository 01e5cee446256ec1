"""The vectorized runtime of an opaque workload: a round's fit tasks trained as one cohort by
``Workload.train_cohort`` (every RL agent's environments stepped as one tensor program), each
result then finished by the client program as any training function's is."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from fedforge.compress.downlink import decode_broadcast
from fedforge.core.records import FIT, Reply, Task
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.client_app import ClientApp, to_tensors, torch_seed
from fedforge.runtime.client_state import ClientStateStore
from fedforge.runtime.sequential import answer, failure
from fedforge.train.program import task_epochs
from fedforge.train.site_cohort import Trained, run_cohort, train_config
from fedforge.train.user_loop import proximal_mu


class SiteCohortTransport:
    """Fit tasks of a round: one cohort call; every other task: one after another."""

    def __init__(self, app: ClientApp, data: FederatedDataset, store: ClientStateStore) -> None:
        if app.loop is None or app.loop.cohort is None or not data.opaque:
            raise ValueError("a site cohort needs an opaque workload with train_cohort")
        self.app, self.data, self.store = app, data, store

    def exchange(self, tasks: Sequence[Task]) -> Iterator[Reply]:
        fits = [t for t in tasks if t.stage == FIT]
        for task in tasks:
            if task.stage != FIT:
                yield answer(self.app, task, self.data, self.store)
        if not fits:
            return
        try:
            trained = self._train(fits)
        except Exception as exc:  # the cohort failed: every client of it did
            for task in fits:
                yield failure(task.client_id, exc)
            return
        for task, result in zip(fits, trained, strict=True):
            yield answer(self.app, task, self.data, self.store, result)

    def _train(self, fits: list[Task]) -> list[Trained]:
        app = self.app
        assert app.loop is not None and app.loop.cohort is not None
        names = set(app.model.names)
        local = app.algorithm.local
        configs = []
        for task in fits:
            shared = to_tensors(decode_broadcast(dict(task.shared)))
            configs.append(
                train_config(
                    local,
                    epochs=task_epochs(task.scalars, local),
                    round_number=task.round,
                    seed=torch_seed(task.seed),
                    mu=proximal_mu(app.program),
                    shared=shared,
                    names=names,
                )
            )
        sites = [self.data.client_data(t.client_id).site for t in fits]
        results = run_cohort(app.loop.cohort, app.loop.metrics, app.module, sites, configs)
        return [
            Trained(r.params, r.metrics, c.epochs) for r, c in zip(results, configs, strict=True)
        ]

    def close(self) -> None:
        """Nothing to release."""
