"""Simulation speed: fedforge's runtimes vs a plain PyTorch loop vs Flower, side by side.

    python -m bench.bench_simulation [--configs A,B,C,D] [--skip-flower] [--timeout 900]

Workload (``bench/workload.py``): mnist5k, Dirichlet(0.5), 2NN, E=1, B=10, lr=0.05.
Configurations: A N=100, 10/round, 20 rounds; B N=100, all clients, 5 rounds; C N=1,000,
100/round, 3 rounds; D N=10,000, all clients, 1 round. Every contender runs in its own
process; peak memory is the sampled resident size of its whole process tree (Ray's and the
worker pool's processes included). Round time is the median round after the first (the
first round alone when there is one); whole-process time includes start-up. Flower runs
from ``.venv-flwr`` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench import workload as wl
from bench.proc_tree import run_measured

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"A": (100, 10, 20), "B": (100, 100, 5), "C": (1000, 100, 3), "D": (10_000, 10_000, 1)}
CONTENDERS = [
    "sequential",
    "vectorized",
    "vectorized-custom",
    "vectorized-fedprox",
    "vectorized-scaffold",
    "workers",
    "plain",
    "flower",
]
LABEL = {
    "sequential": "fedforge sequential",
    "vectorized": "fedforge vectorized",
    "vectorized-custom": "fedforge vectorized, custom nn.Module 2NN",
    "vectorized-fedprox": "fedforge vectorized FedProx (mu 0.01)",
    "vectorized-scaffold": "fedforge vectorized SCAFFOLD",
    "workers": "fedforge workers (2)",
    "plain": "plain PyTorch loop",
    "flower": "Flower 1.41 (Ray)",
}


def round_time(rounds: list[float]) -> float:
    return statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0]


def run_config(
    key: str, flower_python: Path | None, timeout: float, workdir: Path, contenders: list[str]
) -> list[dict]:  # type: ignore[type-arg]
    n, k, rounds = CONFIGS[key]
    npz = workdir / f"workload_{n}.npz"
    if flower_python and not npz.exists():
        wl.save(wl.build(n), npz)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    rows = []
    for name in contenders:
        if name == "flower":
            if flower_python is None:
                continue
            cmd = [
                str(flower_python),
                str(ROOT / "bench" / "flower_sim.py"),
                str(npz),
                str(n),
                str(k),
                str(rounds),
            ]
        else:
            cmd = [sys.executable, "-m", "bench.contender", name, str(n), str(k), str(rounds)]
        done = run_measured(cmd, timeout, env)
        row = {
            "config": key,
            "N": n,
            "K": k,
            "rounds": rounds,
            "contender": name,
            "whole_s": done.wall_s,
            "peak_mib": done.peak_rss_bytes / 2**20,
        }
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode == 0 and lines:
            result = json.loads(lines[-1])
            row.update(
                startup_s=result["startup_s"],
                round_s=round_time(result["round_s"]),
                rounds_s=result["round_s"],
                accuracy=result["accuracy"],
            )
        else:
            row["error"] = "timeout" if done.returncode is None else done.stderr[-2000:]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "rounds_s"}), flush=True)
    return rows


def table(rows: list[dict]) -> str:  # type: ignore[type-arg]
    out = [
        "| config | contender | round s | whole process s | peak MiB | accuracy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(
                f"| {r['config']} | {LABEL[r['contender']]} | {r['error'][:40]} | "
                f"{r['whole_s']:.1f} | {r['peak_mib']:.0f} | - |"
            )
            continue
        out.append(
            f"| {r['config']} | {LABEL[r['contender']]} | {r['round_s']:.3f} | "
            f"{r['whole_s']:.1f} | {r['peak_mib']:.0f} | {100 * r['accuracy']:.2f}% |"
        )
    return "\n".join(out)


def ratios(rows: list[dict]) -> str:  # type: ignore[type-arg]
    lines = []
    for key in CONFIGS:
        got = {r["contender"]: r for r in rows if r["config"] == key and "error" not in r}
        vec = got.get("vectorized")
        if not vec:
            continue
        parts = []
        if "plain" in got:
            parts.append(f"round vs plain loop {got['plain']['round_s'] / vec['round_s']:.1f}x")
            gap = 100 * abs(got["plain"]["accuracy"] - vec["accuracy"])
            parts.append(f"accuracy gap vs plain {gap:.2f} pts")
        if "flower" in got:
            parts.append(f"round vs Flower {got['flower']['round_s'] / vec['round_s']:.1f}x")
            parts.append(
                f"whole process vs Flower {got['flower']['whole_s'] / vec['whole_s']:.1f}x"
            )
        for variant in ("custom", "fedprox", "scaffold"):
            other = got.get(f"vectorized-{variant}")
            if other:
                parts.append(f"{variant} / FedAvg round {other['round_s'] / vec['round_s']:.2f}x")
        lines.append(f"{key}: vectorized " + ", ".join(parts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", default="A,B,C,D")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--flower-python", type=Path, default=ROOT / ".venv-flwr/bin/python")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/simulation.json")
    args = parser.parse_args()
    flower = None if args.skip_flower or not args.flower_python.exists() else args.flower_python
    if flower is None:
        print("Flower is skipped (no .venv-flwr; see bench/README.md)", file=sys.stderr)
    rows: list[dict] = []  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.configs.split(","):
            rows += run_config(key, flower, args.timeout, Path(tmp), args.contenders.split(","))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    print()
    print(table(rows))
    print()
    print(ratios(rows))


if __name__ == "__main__":
    main()
