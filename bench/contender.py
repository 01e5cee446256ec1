"""One benchmark contender in its own process: ``python -m bench.contender NAME N K ROUNDS``.

NAME is ``plain`` or a fedforge backend, optionally with a variant: ``vectorized-fedprox``
(FedProx, mu 0.01), ``vectorized-scaffold`` (SCAFFOLD), ``vectorized-custom`` (the same 2NN
written as a custom ``nn.Module`` class instead of ``nn.Sequential``). Prints one JSON line:
start-up seconds (process start to the first round), per-round seconds (training,
aggregation and test evaluation) and final test accuracy.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from bench import workload as wl  # noqa: E402
from bench.plain_loop import plain_fedavg  # noqa: E402
from fedforge.algorithms.base import Algorithm  # noqa: E402
from fedforge.algorithms.fedavg import FedAvg  # noqa: E402
from fedforge.algorithms.fedprox import FedProx  # noqa: E402
from fedforge.algorithms.scaffold import Scaffold  # noqa: E402
from fedforge.report.history import RoundRecord  # noqa: E402
from fedforge.runtime.driver import RoundListener  # noqa: E402
from fedforge.runtime.simulation import simulate  # noqa: E402
from fedforge.train.models import mlp  # noqa: E402
from fedforge.train.program import LocalSGD  # noqa: E402
from fedforge.train.torch_model import TorchModel  # noqa: E402


class CustomMLP(torch.nn.Module):
    """The 2NN as users usually write it: a class with a forward method."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 200)
        self.fc2 = torch.nn.Linear(200, 200)
        self.out = torch.nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.nn.functional.relu(self.fc2(x))
        return self.out(x)


def algorithm(variant: str) -> Algorithm:
    local = LocalSGD(lr=wl.LR, epochs=wl.EPOCHS, batch_size=wl.BATCH)
    if variant == "fedprox":
        return FedProx(local=local, mu=0.01)
    if variant == "scaffold":
        return Scaffold(local=local)
    return FedAvg(local=local)


class Timer(RoundListener):
    def __init__(self) -> None:
        self.first_round_start: float | None = None
        self.rounds: list[float] = []

    def round_started(self, round_number: int, client_ids: list[int]) -> None:
        if self.first_round_start is None:
            self.first_round_start = time.perf_counter()

    def round_finished(self, record: RoundRecord) -> None:
        if record.round > 0:  # round 0 is the initial evaluation
            self.rounds.append(record.wall_seconds)


def main() -> None:
    name, n, k, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    work = wl.build(n)
    backend, _, variant = name.partition("-")
    model = CustomMLP() if variant == "custom" else mlp(784, 10)
    names = [k for k in TorchModel(model).names]
    TorchModel(model).set_params(dict(zip(names, work.init.values(), strict=True)))
    if name == "plain":
        torch.set_num_threads(1)
        times: list[float] = []
        start = time.perf_counter()
        accs = plain_fedavg(
            model,
            work.data,
            rounds=rounds,
            clients_per_round=k,
            epochs=wl.EPOCHS,
            batch_size=wl.BATCH,
            lr=wl.LR,
            seed=wl.SEED,
            round_times=times,
        )
        out = {"startup_s": start - PROCESS_START, "round_s": times, "accuracy": accs[-1]}
    else:
        timer = Timer()
        result = simulate(
            model,
            work.data,
            algorithm(variant),
            rounds=rounds,
            clients_per_round=k,
            seed=wl.SEED,
            backend=backend,  # type: ignore[arg-type]
            listener=timer,
        )
        assert timer.first_round_start is not None
        out = {
            "startup_s": timer.first_round_start - PROCESS_START,
            "round_s": timer.rounds,
            "accuracy": result.history[-1].test_accuracy,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
