"""One contender of ``bench/bench_cnn.py`` in its own process:

    python -m bench.cnn_contender NAME N K ROUNDS

NAME is a fedforge backend (``sequential``, ``vectorized``, ``workers``; ``vectorized-1``:
vectorized with one torch thread instead of every core) or ``plain`` (the plain PyTorch loop of
``bench/plain_loop.py``). The model is the FedAvg paper's CNN
(``fedforge.train.models.fedavg_cnn``) on mnist5k; everything else is ``bench/workload.py``'s
(Dirichlet(0.5), E=1, B=10, lr=0.05, the same initial weights for every contender). Prints
one JSON line: start-up seconds, per-round seconds, final test accuracy, process CPU seconds.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from bench import workload as wl  # noqa: E402
from bench.contender import Timer  # noqa: E402
from bench.plain_loop import plain_fedavg  # noqa: E402
from fedforge.algorithms.fedavg import FedAvg  # noqa: E402
from fedforge.runtime.simulation import simulate  # noqa: E402
from fedforge.train.models import fedavg_cnn  # noqa: E402
from fedforge.train.program import LocalSGD  # noqa: E402
from fedforge.train.torch_model import TorchModel  # noqa: E402


def main() -> None:
    name, n, k, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    work = wl.build(n, model="cnn")
    model = fedavg_cnn((1, 28, 28), 10)
    TorchModel(model).set_params(work.init)
    if name == "plain":
        torch.set_num_threads(1)
        times: list[float] = []
        start = time.perf_counter()
        startup_cpu = time.process_time()
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
        out = {
            "startup_s": start - PROCESS_START,
            "round_s": times,
            "accuracy": accs[-1],
            "startup_cpu_s": startup_cpu,
        }
    else:
        timer = Timer()  # every round's start: wall and process-tree CPU seconds
        local = LocalSGD(lr=wl.LR, epochs=wl.EPOCHS, batch_size=wl.BATCH)
        result = simulate(
            model,
            work.data,
            FedAvg(local=local),
            rounds=rounds,
            clients_per_round=k,
            seed=wl.SEED,
            backend=name.removesuffix("-1"),  # type: ignore[arg-type]
            listener=timer,
            threads=1 if name.endswith("-1") else None,
        )
        timer.round_started(rounds + 1, [])  # the end of the last round
        (first_wall, first_cpu), walls = timer.marks[0], [m[0] for m in timer.marks]
        out = {
            "startup_s": first_wall - PROCESS_START,
            "round_s": [b - a for a, b in itertools.pairwise(walls)],
            "accuracy": result.history[-1].test_accuracy,
            "startup_cpu_s": first_cpu,  # the start-up's share of the tree's CPU seconds
        }
    out["cpu_s"] = time.process_time()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
