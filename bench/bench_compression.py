"""Communication efficiency: accuracy against megabytes for every update codec.

    python -m bench.bench_compression [--rounds 50] [--plot PATH]

The default workload of ``fedforge run`` (mnist5k, 100 clients Dirichlet(0.5), 10 per round,
the 2NN with 199,210 parameters, E=5, B=10, lr 0.05, FedAvg), ``--rounds`` rounds, one
torch thread, sequential backend, the same seed for every contender: only
``[update] codec`` / ``topk_fraction`` / ``downlink`` change. Uplink and downlink megabytes are
the history's (the encoded arrays, the bytes the network runtime sends: a deployment test
checks they equal what the gRPC clients transmit). The ratio is plaintext float32 uplink over
the codec's; the accuracy loss is against the uncompressed run, in points.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedforge.config import load_config
from fedforge.experiment import build_dataset, simulate_config

CONTENDERS: dict[str, list[str]] = {
    "none": [],
    "float16": ['update.codec="float16"'],
    "bfloat16 up + down": ['update.codec="bfloat16"', 'update.downlink="bfloat16"'],
    "q8 (block 256)": ['update.codec="q8"'],
    "q4 (block 256)": ['update.codec="q4"'],
    "rotated q4": ['update.codec="rotated_q4"'],
    "rotated q2": ['update.codec="rotated_q2"'],
    "rotated q2 + bf16 down": ['update.codec="rotated_q2"', 'update.downlink="bfloat16"'],
    "top-3% + EF": ['update.codec="topk"', "update.topk_fraction=0.03"],
    "top-1.5% + EF": ['update.codec="topk"', "update.topk_fraction=0.015"],
    "top-1% + EF": ['update.codec="topk"', "update.topk_fraction=0.01"],
    "top-1%, no EF": [
        'update.codec="topk"',
        "update.topk_fraction=0.01",
        "update.error_feedback=false",
    ],
}


def run(rounds: int) -> dict[str, dict[str, float | list[float]]]:
    torch.set_num_threads(1)
    out: dict[str, dict[str, float | list[float]]] = {}
    for name, overrides in CONTENDERS.items():
        config = load_config(
            None, [f"server.rounds={rounds}", 'runtime.backend="sequential"', *overrides]
        )
        started = time.perf_counter()
        history = simulate_config(config, build_dataset(config)).history
        up = sum(r.bytes_up for r in history) / 1e6
        down = sum(r.bytes_down for r in history) / 1e6
        out[name] = {
            "accuracy": history[-1].test_accuracy,
            "loss": history[-1].test_loss,
            "up_mb": up,
            "down_mb": down,
            "seconds": time.perf_counter() - started,
            "curve": [r.test_accuracy for r in history],
            "mb": [
                sum(h.bytes_up + h.bytes_down for h in history[: i + 1]) / 1e6
                for i in range(len(history))
            ],
        }
        print(f"{name}: {history[-1].test_accuracy:.2%}, up {up:.1f} MB", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--plot", type=Path, default=Path("bench/results/compression.png"))
    args = parser.parse_args()
    results = run(args.rounds)
    base = results["none"]
    print(
        "\n| codec | final accuracy | accuracy loss (points) | test loss | uplink MB "
        "| uplink ratio | downlink MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        loss = 100 * (float(base["accuracy"]) - float(r["accuracy"]))  # type: ignore[arg-type]
        ratio = float(base["up_mb"]) / float(r["up_mb"])  # type: ignore[arg-type]
        print(
            f"| {name} | {float(r['accuracy']):.2%} | {loss:+.2f} | {float(r['loss']):.4f} "  # type: ignore[arg-type]
            f"| {float(r['up_mb']):.1f} "  # type: ignore[arg-type]
            f"| {ratio:.1f}x | {float(r['down_mb']):.1f} |"  # type: ignore[arg-type]
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for name, r in results.items():
        ax.plot(r["mb"], [100 * a for a in r["curve"]], label=name)  # type: ignore[union-attr]
    ax.set(xscale="log", xlabel="cumulative traffic, down + up (MB)", ylabel="test accuracy (%)")
    ax.set_title(f"Accuracy vs megabytes, {args.rounds} rounds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=80)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
