"""Federated LoRA runs end to end (``fedforge run``'s own path, ``simulate_config``): the
aggregation modes against centralized LoRA on the pooled data and against each client
alone; bytes per round against full-model federated fine-tuning.

Task: the packaged MiniLM's LoRA (``--rank``, targets query/value) with a 10-way head,
classifying Python's docstrings by package; ``--clients`` sites by module (non-IID), at most
``--examples`` training texts each, ``--seq-len`` tokens, every client every round,
``--rounds`` rounds of ``--epochs`` local epochs of SGD (``--lr``, batch ``--batch-size``),
the central test set (the stable 20% split, ``--test`` texts evenly spread) after the last
round. Centralized: one site holding every site's texts (same examples in all), the same
rounds and epochs. Alone: each client trains on its own data only (one client, the same
rounds), scored on the central test set; the mean over clients is reported.

Full-model traffic is what FedAvg of every parameter (base, adapters, head) would send per
client per round at float32. One process, one thread; wall seconds per run.

    python -m bench.bench_lora_run [--rounds 10] [--clients 10] [--examples 32] ...
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from fedforge.config import RunConfig
from fedforge.experiment import build_dataset, simulate_config


def run(lora: dict[str, Any], args: argparse.Namespace, per_round: int) -> dict[str, Any]:
    config = RunConfig.model_validate(
        {
            "seed": args.seed,
            "lora": lora,
            "client": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr},
            "server": {"rounds": args.rounds, "clients_per_round": per_round},
            "runtime": {"backend": "sequential"},
        }
    )
    data = build_dataset(config)
    started = time.perf_counter()
    result = simulate_config(config, data)
    seconds = time.perf_counter() - started
    last = result.history[-1]
    return {
        "test_accuracy": last.test_accuracy,
        "test_loss": last.test_loss,
        "bytes_up_per_client_round": last.bytes_up // max(last.clients_completed, 1),
        "bytes_down_per_client_round": last.bytes_down // max(last.clients_completed, 1),
        "full_model_bytes": 4 * sum(p.numel() for p in result.model.parameters()),
        "residual_norm": last.metrics.get("lora.residual_norm"),
        "seconds": round(seconds, 1),
        "examples": int(sum(data.client_sizes())),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="fedit,ffa,exact,fedsa,centralized,alone")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = {
        "model": "minilm",
        "rank": args.rank,
        "alpha": 2.0 * args.rank,
        "clients": args.clients,
        "seq_len": args.seq_len,
        "examples": args.examples,
        "test_examples": args.test,
    }
    results: dict[str, Any] = {"settings": vars(args)}
    for mode in args.modes.split(","):
        if mode == "centralized":
            pooled = {**base, "clients": 1, "examples": args.examples * args.clients}
            results[mode] = run(pooled, args, 1)
        elif mode == "alone":
            alone = []
            for site in range(args.clients):  # one site: the client's own texts only
                solo = {**base, "aggregation": "fedit"}
                alone.append(run_alone(solo, args, site))
            results[mode] = {
                "test_accuracy": sum(a["test_accuracy"] for a in alone) / len(alone),
                "per_client": [a["test_accuracy"] for a in alone],
            }
        elif mode == "exact_mean":
            lora = {**base, "aggregation": "exact", "exact_factors": "mean"}
            results[mode] = run(lora, args, args.clients)
        else:
            results[mode] = run({**base, "aggregation": mode}, args, args.clients)
        print(mode, json.dumps(results[mode]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def run_alone(lora: dict[str, Any], args: argparse.Namespace, site: int) -> dict[str, Any]:
    """Client ``site`` trained alone: the federation's sites, only ``site`` ever sampled."""
    from fedforge.experiment import build_algorithm, build_workload
    from fedforge.runtime.simulation import simulate

    config = RunConfig.model_validate(
        {
            "seed": args.seed,
            "lora": lora,
            "client": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr},
            "server": {"rounds": args.rounds, "clients_per_round": 1},
        }
    )
    data = build_dataset(config)
    workload = build_workload(config, data)

    def only(population: Any, rng: Any) -> list[int]:
        return [site]

    result = simulate(
        workload,
        data,
        build_algorithm(config),
        rounds=args.rounds,
        sampler=only,
        seed=args.seed,
        verbose=0,
    )
    return {"test_accuracy": result.history[-1].test_accuracy}


if __name__ == "__main__":
    main()
