"""One benchmark contender in its own process: ``python -m bench.contender NAME N K ROUNDS``.

Prints one JSON line: start-up seconds (process start to the first round), per-round
seconds (training, aggregation and test evaluation) and final test accuracy.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from bench import workload as wl  # noqa: E402
from bench.plain_loop import plain_fedavg  # noqa: E402
from fedforge.algorithms.fedavg import FedAvg  # noqa: E402
from fedforge.report.history import RoundRecord  # noqa: E402
from fedforge.runtime.loop import RoundListener  # noqa: E402
from fedforge.runtime.simulation import simulate  # noqa: E402
from fedforge.train.local_sgd import LocalSGD  # noqa: E402
from fedforge.train.models import mlp  # noqa: E402
from fedforge.train.torch_model import TorchModel  # noqa: E402


class Timer(RoundListener):
    def __init__(self) -> None:
        self.first_round_start: float | None = None
        self.rounds: list[float] = []

    def round_started(self, round_number: int, client_ids: list[int]) -> None:
        if self.first_round_start is None:
            self.first_round_start = time.perf_counter()

    def round_finished(self, record: RoundRecord) -> None:
        self.rounds.append(record.wall_seconds)


def main() -> None:
    name, n, k, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    work = wl.build(n)
    model = mlp(784, 10)
    TorchModel(model).set_params(work.init)
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
        algo = FedAvg(local=LocalSGD(lr=wl.LR, epochs=wl.EPOCHS, batch_size=wl.BATCH))
        result = simulate(
            model,
            work.data,
            algo,
            rounds=rounds,
            clients_per_round=k,
            seed=wl.SEED,
            backend=name,
            listener=timer,
        )  # type: ignore[arg-type]
        assert timer.first_round_start is not None
        out = {
            "startup_s": timer.first_round_start - PROCESS_START,
            "round_s": timer.rounds,
            "accuracy": result.history[-1].test_accuracy,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
