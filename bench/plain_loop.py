"""A plain PyTorch FedAvg loop: the baseline fedforge is measured against.

No fedforge abstractions: a module, ``load_state_dict``, ``torch.optim.SGD`` and a weighted
sum of state dicts. It draws sampling and batch order from the same seeded streams as
fedforge (``RngStreams``, ``batch_order``: pure functions of the seed) so both train on
identical batches, which makes accuracy directly comparable.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fedforge.core.rng import Purpose, RngStreams
from fedforge.data.federated import FederatedDataset
from fedforge.train.program import batch_order


def plain_fedavg(
    model: torch.nn.Module,
    data: FederatedDataset,
    *,
    rounds: int,
    clients_per_round: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    round_times: list[float] | None = None,
    round_cpu: list[float] | None = None,
) -> list[float]:
    """Run FedAvg; return the test accuracy after every round (and append round seconds to
    ``round_times`` if given, and this process's CPU seconds to ``round_cpu``)."""
    streams = RngStreams(seed)
    x_all, y_all = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
    x_test, y_test = torch.from_numpy(data.test.x), torch.from_numpy(data.test.y)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    accuracies = []
    for r in range(1, rounds + 1):
        started, cpu_started = time.perf_counter(), time.process_time()
        sampling = streams.generator(Purpose.SAMPLING, r)
        chosen = sorted(sampling.choice(data.num_clients, clients_per_round, replace=False))
        sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        total = 0
        for cid in chosen:
            idx = torch.from_numpy(data.partition[cid])
            x, y = x_all[idx], y_all[idx]
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            for batch in batch_order(len(y), batch_size, epochs, streams.task_seed(r, int(cid))):
                b = torch.from_numpy(batch)
                opt.zero_grad()
                F.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
            n = len(y)
            for k, v in model.state_dict().items():
                sums[k] += n * v.double()
            total += n
        global_state = {k: (s / total).to(global_state[k].dtype) for k, s in sums.items()}
        model.load_state_dict(global_state)
        with torch.no_grad():
            accuracies.append(float((model(x_test).argmax(1) == y_test).float().mean()))
        if round_times is not None:
            round_times.append(time.perf_counter() - started)
        if round_cpu is not None:
            round_cpu.append(time.process_time() - cpu_started)
    return accuracies
