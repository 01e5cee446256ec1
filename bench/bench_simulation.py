"""Simulation speed: fedforge's runtimes and features vs a plain PyTorch loop, Flower and the
GEMM floor, side by side.

    python -m bench.bench_simulation [--configs A,B,C,D] [--contenders ...] [--repeats 3]
        [--flower-python PATH] [--skip-flower] [--timeout 900] [--src OTHER_CHECKOUT/src]
        [--before OTHER_CHECKOUT/src]

Workload (``bench/workload.py``): mnist5k, Dirichlet(0.5), 2NN, E=1, B=10, lr=0.05.
Configurations: A N=100, 10/round, 20 rounds; B N=100, all clients, 5 rounds; C N=1,000,
100/round, 3 rounds; D N=10,000, all clients, 1 round. Every contender runs in its own
process and session (``bench/contender.py``, ``bench/flower_sim.py``); the repeats are
interleaved (every contender once, then again). A round's time is its process tree's **CPU
seconds** (other load on the machine does not count; torch runs one thread), the median over
rounds after the first (the first alone when there is one) and then over repeats; wall
seconds are reported beside them. Peak memory is the sampled resident size of the whole
process tree. ``floor`` is the round's matrix products run as whole-cohort GEMMs
(``bench/contender.py``). Flower runs from a separate venv (see bench/README.md).
``--before`` also runs every fedforge contender from another checkout's sources, interleaved
with this one's (labelled "before"), for before/after ratios measured in one run.
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
    "floor",
    "vectorized",
    "vectorized-custom",
    "vectorized-fedprox",
    "vectorized-scaffold",
    "vectorized-scaffold-cli",
    "vectorized-dp",
    "vectorized-q8",
    "vectorized-q4",
    "vectorized-rq4",
    "vectorized-topk",
    "sequential",
    "workers",
    "plain",
    "flower",
]
LABEL = {
    "floor": "GEMM floor (the round's matrix products)",
    "vectorized": "fedforge vectorized FedAvg",
    "vectorized-custom": "fedforge vectorized, custom nn.Module 2NN",
    "vectorized-fedprox": "fedforge vectorized FedProx (mu 0.01)",
    "vectorized-scaffold": "fedforge vectorized SCAFFOLD (Python API)",
    "vectorized-scaffold-cli": "fedforge vectorized SCAFFOLD, run directory (as the CLI)",
    "vectorized-dp": "fedforge vectorized central DP",
    "vectorized-q8": "fedforge vectorized q8",
    "vectorized-q4": "fedforge vectorized q4",
    "vectorized-rq4": "fedforge vectorized rotated q4",
    "vectorized-topk": "fedforge vectorized top-1% + EF",
    "sequential": "fedforge sequential",
    "workers": "fedforge workers (2)",
    "plain": "plain PyTorch loop",
    "flower": "Flower 1.41 (Ray)",
}


BEFORE = "@before"


def label(name: str) -> str:
    base = name.removesuffix(BEFORE)
    return LABEL[base] + (" (before)" if name.endswith(BEFORE) else "")


def typical(rounds: list[float]) -> float:
    return statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0]


def command(name: str, key: str, flower: Path | None, workdir: Path) -> list[str] | None:
    n, k, rounds = CONFIGS[key]
    if name != "flower":
        return [sys.executable, "-m", "bench.contender", name, str(n), str(k), str(rounds)]
    if flower is None:
        return None
    npz = workdir / f"workload_{n}.npz"
    if not npz.exists():
        wl.save(wl.build(n), npz)
    script = ROOT / "bench" / "flower_sim.py"
    return [str(flower), str(script), str(npz), str(n), str(k), str(rounds)]


def run_config(
    key: str,
    flower: Path | None,
    timeout: float,
    workdir: Path,
    contenders: list[str],
    repeats: int,
    src: Path = ROOT / "src",
    before: Path | None = None,
) -> list[dict]:  # type: ignore[type-arg]
    def env(sources: Path) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": f"{sources}:{ROOT}", "PYTHONUNBUFFERED": "1"}

    runs: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    plan = [(name, name, src) for name in contenders]
    if before is not None:  # each fedforge contender from the other sources, right after
        plan = [
            step
            for name, _, _ in plan
            for step in [(name, name, src)]
            + ([(name + BEFORE, name, before)] if name not in ("plain", "flower", "floor") else [])
        ]
    for label, _, _ in plan:
        runs[label] = []
    for _ in range(repeats):
        for label, name, sources in plan:
            cmd = command(name, key, flower, workdir)
            if cmd is None:
                continue
            done = run_measured(cmd, timeout, env(sources))
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            run: dict = {"whole_s": done.wall_s, "peak_mib": done.peak_rss_bytes / 2**20}  # type: ignore[type-arg]
            if done.returncode == 0 and lines:
                result = json.loads(lines[-1])
                run.update(
                    cpu_s=typical(result["round_cpu_s"]),
                    wall_s=typical(result["round_s"]),
                    accuracy=result["accuracy"],
                )
            else:
                run["error"] = "timeout" if done.returncode is None else done.stderr[-2000:]
            runs[label].append(run)
            print(json.dumps({"config": key, "contender": label, **run})[:400], flush=True)
    rows = []
    n, k, rounds = CONFIGS[key]
    for name, done_runs in runs.items():
        good = [r for r in done_runs if "error" not in r]
        row = {"config": key, "N": n, "K": k, "rounds": rounds, "contender": name}
        if not good:
            row["error"] = done_runs[0]["error"] if done_runs else "not run"
        else:
            for field in ("cpu_s", "wall_s", "whole_s", "peak_mib"):
                row[field] = statistics.median(r[field] for r in good)
            row["accuracy"] = good[0]["accuracy"]
            row["cpu_all"] = [r["cpu_s"] for r in good]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:  # type: ignore[type-arg]
    out = [
        "| config | contender | round CPU s | round wall s | peak MiB | accuracy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['config']} | {label(r['contender'])} | {r['error'][:40]} | | | |")
            continue
        acc = "-" if r["contender"] == "floor" else f"{100 * r['accuracy']:.2f}%"
        out.append(
            f"| {r['config']} | {label(r['contender'])} | {r['cpu_s']:.3f} | {r['wall_s']:.3f} | "
            f"{r['peak_mib']:.0f} | {acc} |"
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
        if "floor" in got:
            parts.append(f"vectorized / GEMM floor {vec['cpu_s'] / got['floor']['cpu_s']:.2f}x")
        for other, label in (("plain", "plain loop"), ("flower", "Flower"), ("sequential", "")):
            if other in got and label:
                parts.append(f"{label} / vectorized {got[other]['cpu_s'] / vec['cpu_s']:.1f}x")
        if "plain" in got and "sequential" in got:
            seq = got["sequential"]["cpu_s"] / got["plain"]["cpu_s"]
            parts.append(f"sequential / plain loop {seq:.2f}x")
        for name in CONTENDERS:
            if name.startswith("vectorized-") and name in got:
                ratio = got[name]["cpu_s"] / vec["cpu_s"]
                parts.append(f"{name.removeprefix('vectorized-')} / FedAvg {ratio:.2f}x")
        old = got.get("vectorized" + BEFORE)
        for name in CONTENDERS:
            if old and name.startswith("vectorized-") and name + BEFORE in got:
                ratio = got[name + BEFORE]["cpu_s"] / old["cpu_s"]
                parts.append(f"before: {name.removeprefix('vectorized-')} / FedAvg {ratio:.2f}x")
        for name in CONTENDERS:
            if name + BEFORE in got and name in got:
                speedup = got[name + BEFORE]["cpu_s"] / got[name]["cpu_s"]
                parts.append(f"{name} before / after {speedup:.2f}x")
        lines.append(f"{key}: " + ", ".join(parts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", default="A,B,C,D")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--flower-python", type=Path, default=ROOT / ".venv-flwr/bin/python")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/simulation.json")
    parser.add_argument(
        "--src", type=Path, default=ROOT / "src", help="fedforge sources to time (another checkout)"
    )
    parser.add_argument(
        "--before", type=Path, default=None, help="also time these sources, interleaved"
    )
    args = parser.parse_args()
    flower = None if args.skip_flower or not args.flower_python.exists() else args.flower_python
    if flower is None and "flower" in args.contenders:
        print("Flower is skipped (no Flower venv; see bench/README.md)", file=sys.stderr)
    rows: list[dict] = []  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.configs.split(","):
            names = args.contenders.split(",")
            rows += run_config(
                key, flower, args.timeout, Path(tmp), names, args.repeats, args.src, args.before
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    print()
    print(table(rows))
    print()
    print(ratios(rows))


if __name__ == "__main__":
    main()
