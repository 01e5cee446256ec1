"""Non-IID algorithms (issue 11): the FedProx paper's straggler experiment, and a table of
ten algorithms on MNIST Dirichlet(0.1).

    python -m bench.bench_noniid fedprox [--rounds N]   # Synthetic(1,1) with stragglers
    python -m bench.bench_noniid mnist [--rounds N]     # the ten-algorithm table
    python -m bench.bench_noniid mnist --only FedPer --only FedRep   # some rows only

1. FedProx (Li et al. 2020, Fig. 1): Synthetic(1,1), 30 devices with power-law sizes
   (``data.dataset = 'synthetic'``, natural partition), multinomial logistic regression,
   10 devices per round, E = 20, B = 10, lr 0.01, seed 0. 0%, 50% and 90% of each round's
   devices are stragglers running a random 1..E epochs (``algorithm.stragglers``). Three
   methods: FedAvg dropping the stragglers (``algorithm.drop_stragglers``), FedProx mu = 0
   keeping their partial work, FedProx mu = 1 keeping it. Per round: the global model's
   training loss over all devices' training data (the paper's curve) and test accuracy.
2. MNIST (mnist5k), 100 clients Dirichlet(0.1), 10 per round, 50 rounds, the 2NN, E = 5,
   B = 10, client lr 0.05, 20% of each client's data held out; after the last round every
   client evaluates the global model and (FedPer, FedRep, Ditto) its personal one on its held-out
   split: final central accuracy, mean client accuracy and the worst decile (mean of the
   10 worst clients).

Runs on the vectorized backend with one torch thread. Output: Markdown tables on stdout,
raw numbers in ``bench/results/noniid_<part>.json``, the FedProx plot in
``bench/results/fedprox_stragglers.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedforge.config import RunConfig, load_config
from fedforge.experiment import (
    backend_options,
    build_algorithm,
    build_dataset,
    build_federated_eval,
    build_model,
    build_sampler,
    build_stragglers,
)
from fedforge.runtime.simulation import SimulationResult, simulate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

FEDPROX = {
    "seed": 0,
    "data.dataset": "synthetic",
    "data.alpha": 1.0,
    "data.beta": 1.0,
    "data.devices": 30,
    "partition.scheme": "natural",
    "model.name": "logistic",
    "client.epochs": 20,
    "client.batch_size": 10,
    "client.lr": 0.01,
    "server.clients_per_round": 10,
    "runtime.backend": "vectorized",
    "runtime.threads": 1,
}
METHODS: dict[str, dict[str, Any]] = {
    "FedAvg (drop stragglers)": {"algorithm.name": "fedavg", "algorithm.drop_stragglers": True},
    "FedProx mu=0 (partial work)": {"algorithm.name": "fedprox", "algorithm.mu": 0.0},
    "FedProx mu=1 (partial work)": {"algorithm.name": "fedprox", "algorithm.mu": 1.0},
}
STRAGGLERS = (0.0, 0.5, 0.9)

MNIST = {
    "seed": 0,
    "data.dataset": "mnist5k",
    "partition.scheme": "dirichlet",
    "partition.num_clients": 100,
    "partition.alpha": 0.1,
    "model.name": "mlp",
    "client.epochs": 5,
    "client.batch_size": 10,
    "client.lr": 0.05,
    "server.clients_per_round": 10,
    "evaluation.fraction": 1.0,
    "evaluation.holdout": 0.2,
    "runtime.backend": "vectorized",
    "runtime.threads": 1,
}
TABLE: dict[str, dict[str, Any]] = {
    "FedAvg": {},
    "FedAvgM": {"server.momentum": 0.9},
    "FedProx": {"algorithm.name": "fedprox", "algorithm.mu": 0.01},
    "SCAFFOLD": {"algorithm.name": "scaffold"},
    "FedNova": {"algorithm.name": "fednova"},
    "FedAdam": {"server.optimizer": "adam", "server.lr": 0.01},
    "FedYogi": {"server.optimizer": "yogi", "server.lr": 0.01},
    "q-FedAvg (q=1)": {"algorithm.name": "qfedavg", "algorithm.q": 1.0},
    "q-FedAvg q=0.1": {"algorithm.name": "qfedavg", "algorithm.q": 0.1},
    "q-FedAvg q=0 (uniform FedAvg)": {"algorithm.name": "qfedavg", "algorithm.q": 0.0},
    "FedPer": {"algorithm.name": "fedper", "algorithm.head_layers": 1},
    # FedRep: 5 head-only epochs (the default, = client.epochs), then the 5 body epochs.
    "FedRep": {"algorithm.name": "fedrep", "algorithm.head_layers": 1},
    # The paper's schedule (Collins et al. 2021): 10 head epochs, 1 body epoch.
    "FedRep (10 head + 1 body epochs)": {
        "algorithm.name": "fedrep",
        "algorithm.head_epochs": 10,
        "client.epochs": 1,
    },
    "Ditto": {"algorithm.name": "ditto", "algorithm.lam": 0.1},
}


def config_of(settings: dict[str, Any]) -> RunConfig:
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()])


def run(config: RunConfig, train_loss: bool = False) -> tuple[SimulationResult, float]:
    """One simulation; with ``train_loss`` the global model's loss on all training data is
    recorded every round (metric ``global_train_loss``)."""
    data = build_dataset(config)
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)

    def global_train_loss(module: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(module(x), y))

    started = time.perf_counter()
    result = simulate(
        build_model(config, data),
        data,
        build_algorithm(config),
        rounds=config.server.rounds,
        sampler=build_sampler(config),
        seed=config.seed,
        backend=config.runtime.backend,
        options=backend_options(config),
        threads=config.runtime.threads,
        federated_eval=build_federated_eval(config),
        stragglers=build_stragglers(config),
        probes={"global_train_loss": global_train_loss} if train_loss else None,
    )
    return result, time.perf_counter() - started


def fedprox(rounds: int) -> None:
    out: dict[str, Any] = {"rounds": rounds, "runs": {}}
    for share in STRAGGLERS:
        for method, settings in METHODS.items():
            cfg = {**FEDPROX, **settings, "server.rounds": rounds, "algorithm.stragglers": share}
            result, seconds = run(config_of(cfg), train_loss=True)
            hist = result.history
            out["runs"][f"{share:.0%} | {method}"] = {
                "stragglers": share,
                "method": method,
                "train_loss": [r.metrics["global_train_loss"] for r in hist],
                "test_accuracy": [r.test_accuracy for r in hist],
                "seconds": seconds,
            }
            print(
                f"{share:.0%} {method}: loss {hist[-1].metrics['global_train_loss']:.3f} "
                f"acc {hist[-1].test_accuracy:.3f} ({seconds:.0f} s)",
                flush=True,
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "noniid_fedprox.json").write_text(json.dumps(out, indent=1) + "\n")
    plot_fedprox(out, RESULTS / "fedprox_stragglers.png")
    print(fedprox_table(out))


def fedprox_table(out: dict[str, Any]) -> str:
    lines = [
        "| stragglers | method | final train loss | min-max train loss, last half | "
        "final test acc. | best test acc. |",
        "|---|---|---|---|---|---|",
    ]
    for run_ in out["runs"].values():
        loss, acc = np.array(run_["train_loss"]), np.array(run_["test_accuracy"])
        tail = loss[len(loss) // 2 :]
        lines.append(
            f"| {run_['stragglers']:.0%} | {run_['method']} | {loss[-1]:.3f} | "
            f"{tail.min():.3f}-{tail.max():.3f} | {100 * acc[-1]:.1f}% | {100 * acc.max():.1f}% |"
        )
    return "\n".join(lines)


def plot_fedprox(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(STRAGGLERS), figsize=(15, 8), sharex=True)
    for col, share in enumerate(STRAGGLERS):
        for run_ in out["runs"].values():
            if run_["stragglers"] != share:
                continue
            axes[0, col].plot(run_["train_loss"], label=run_["method"])
            axes[1, col].plot([100 * a for a in run_["test_accuracy"]], label=run_["method"])
        axes[0, col].set(title=f"Synthetic(1,1), {share:.0%} stragglers", ylabel="training loss")
        axes[1, col].set(xlabel="round", ylabel="test accuracy (%)")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def mnist(rounds: int, only: list[str] | None = None) -> None:
    """The table, or only its rows named in ``only`` (merged into the saved results)."""
    unknown = set(only or ()) - set(TABLE)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; rows: {list(TABLE)}")
    out: dict[str, Any] = {"rounds": rounds, "runs": {}}
    saved = RESULTS / "noniid_mnist.json"
    if only and saved.exists():
        previous = json.loads(saved.read_text())
        if previous.get("rounds") == rounds:
            out = previous
    lines = [
        "| algorithm | central test acc. | mean client acc. (global) | worst decile (global) | "
        "mean client acc. (personal) | worst decile (personal) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, settings in TABLE.items():
        if only and name not in only:
            continue
        cfg = {**MNIST, **settings, "server.rounds": rounds, "evaluation.every": rounds}
        result, seconds = run(config_of(cfg))
        m = result.history[-1].metrics
        row = {
            "central": result.history[-1].test_accuracy,
            "client_mean": m["fed_eval.accuracy.client_mean"],
            "worst10": m["fed_eval.accuracy.worst10"],
            "personal_mean": m.get("fed_eval.personal_accuracy.client_mean"),
            "personal_worst10": m.get("fed_eval.personal_accuracy.worst10"),
            "seconds": seconds,
        }
        out["runs"][name] = row

        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.1f}%"

        lines.append(
            f"| {name} | {pct(row['central'])} | {pct(row['client_mean'])} | "
            f"{pct(row['worst10'])} | {pct(row['personal_mean'])} | "
            f"{pct(row['personal_worst10'])} | {seconds:.0f} |"
        )
        print(lines[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "noniid_mnist.json").write_text(json.dumps(out, indent=1) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["fedprox", "mnist"])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", action="append", help="mnist: run only this row (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    if args.part == "fedprox":
        fedprox(args.rounds or 100)
    else:
        mnist(args.rounds or 50, args.only)


if __name__ == "__main__":
    main()
