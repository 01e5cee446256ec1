"""Flower's simulation on the benchmark workload; runs in the Flower venv (no fedforge there).

    .venv-flwr/bin/python bench/flower_sim.py WORKLOAD.npz N K ROUNDS [2nn|cnn]

Uses flwr 1.41's ``run_simulation`` with the Ray backend, the FedAvg strategy, centralized
evaluation each round, and the same local training as the plain loop (same arrays,
partition, initial weights and per-(round, client) batch-order streams; Flower samples the
clients itself). Prints one JSON line like ``bench/contender.py``; CPU seconds are those of
this process and every process below it (Ray's raylet and its workers).
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from proc_tree import tree_cpu_seconds  # noqa: E402  (bench/, this script's directory)

WORKLOAD, N, K, ROUNDS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
MODEL = sys.argv[5] if len(sys.argv) > 5 else "2nn"  # cnn: the FedAvg paper's CNN
EPOCHS, BATCH, LR, SEED = 1, 10, 0.05, 0


def load() -> dict[str, np.ndarray]:
    with np.load(WORKLOAD, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def make_model() -> torch.nn.Module:
    if MODEL == "cnn":  # fedforge.train.models.fedavg_cnn, layer for layer (same state names)
        return torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, 28, 28)),
            torch.nn.Conv2d(1, 32, 5, padding=2),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 5, padding=2),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(64 * 7 * 7, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 10),
        )
    return torch.nn.Sequential(
        torch.nn.Linear(784, 200),
        torch.nn.ReLU(),
        torch.nn.Linear(200, 200),
        torch.nn.ReLU(),
        torch.nn.Linear(200, 10),
    )


_M = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix(z: int) -> int:
    """SplitMix64's finalizer (fedforge.core.rng.mix64_int)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def task_seed(round_number: int, cid: int) -> int:
    """fedforge's RngStreams(SEED).task_seed(round, client), recomputed without fedforge."""
    seq = np.random.SeedSequence(SEED, spawn_key=(3, round_number))
    k = [int(w) for w in seq.generate_state(4, np.uint64)]
    return _mix(k[0] ^ _mix(cid ^ k[1])) | _mix(k[2] ^ _mix(cid ^ k[3])) << 64


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """fedforge's batch order (train.program.shuffles): one epoch's permutation."""
    lo, hi = seed & _M, (seed >> 64) & _M
    stream = _mix(lo ^ _mix(hi ^ (((epoch + 1) * _GOLDEN) & _M)))
    keys = [_mix((stream + (j + 1) * _GOLDEN) & _M) for j in range(n)]
    return np.array(sorted(range(n), key=keys.__getitem__), np.int64)


def set_weights(model: torch.nn.Module, weights: list[np.ndarray]) -> None:
    state = dict(
        zip(model.state_dict(), (torch.from_numpy(np.copy(w)) for w in weights), strict=True)
    )
    model.load_state_dict(state)


def main() -> None:
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    data = load()
    init = [data[f"init/{k}"] for k in make_model().state_dict()]
    offsets = data["part_offsets"]

    class TorchClient(NumPyClient):  # type: ignore[misc]
        def __init__(self, cid: int) -> None:
            torch.set_num_threads(1)
            idx = data["part_indices"][offsets[cid] : offsets[cid + 1]]
            self.cid = cid
            self.x = torch.from_numpy(data["x_train"][idx])
            self.y = torch.from_numpy(data["y_train"][idx])
            self.model = make_model()

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            set_weights(self.model, parameters)
            opt = torch.optim.SGD(self.model.parameters(), lr=LR)
            seed = task_seed(int(config["round"]), self.cid)
            for epoch in range(EPOCHS):
                perm = torch.from_numpy(epoch_order(len(self.y), epoch, seed))
                for s in range(0, len(self.y), BATCH):
                    b = perm[s : s + BATCH]
                    opt.zero_grad()
                    F.cross_entropy(self.model(self.x[b]), self.y[b]).backward()
                    opt.step()
            weights = [v.detach().numpy() for v in self.model.state_dict().values()]
            return weights, len(self.y), {}

    def client_fn(context: Context):  # type: ignore[no-untyped-def]
        return TorchClient(int(context.node_config["partition-id"])).to_client()

    marks: list[float] = []
    cpu_marks: list[float] = []  # CPU seconds of this process and its Ray processes
    accuracy: list[float] = []
    x_test, y_test = torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"])
    eval_model = make_model()

    def evaluate(server_round, parameters, config):  # type: ignore[no-untyped-def]
        set_weights(eval_model, parameters)
        with torch.no_grad():
            logits = eval_model(x_test)
        accuracy.append(float((logits.argmax(1) == y_test).float().mean()))
        marks.append(time.perf_counter())
        cpu_marks.append(tree_cpu_seconds())
        return float(F.cross_entropy(logits, y_test)), {}

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = FedAvg(
            fraction_fit=K / N,
            min_fit_clients=K,
            min_available_clients=N,
            fraction_evaluate=0.0,
            min_evaluate_clients=0,
            evaluate_fn=evaluate,
            on_fit_config_fn=lambda r: {"round": r},
            initial_parameters=ndarrays_to_parameters(init),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=ROUNDS))

    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=N,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1},
        },
    )
    # marks[0] is the evaluation of the initial model, right before round 1.
    rounds = [b - a for a, b in itertools.pairwise(marks)]
    cpu = [b - a for a, b in itertools.pairwise(cpu_marks)]
    print(
        json.dumps(
            {
                "startup_s": marks[0] - PROCESS_START,
                "round_s": rounds,
                "round_cpu_s": cpu,
                "accuracy": accuracy[-1],
            }
        )
    )


if __name__ == "__main__":
    main()
