"""The FedAvg paper's CNN on mnist5k at 100 clients: fedforge's runtimes vs a plain PyTorch
loop vs Flower 1.41, round time side by side.

    python -m bench.bench_cnn [--rounds 5] [--repeats 3] [--contenders ...] [--skip-flower]

100 clients (Dirichlet(0.5)), 10 per round, E=1, B=10, lr=0.05, the same initial weights
everywhere. Each contender runs in its own process and session (``setsid``); repetitions are
interleaved (every contender once, then again), and a contender's figure is the median over
repetitions of its median round after the first. The CPU seconds are the whole process tree's
(``RUSAGE_CHILDREN``: worker processes included; Ray's daemons are not children and are not
counted, so Flower has no CPU figure per round); a round's CPU seconds are the tree's less the
start-up's (the contender's own CPU time when its first round starts), over the rounds: on a
shared machine they compare the contenders' work better than wall time does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

from bench import workload as wl
from bench.proc_tree import run_measured

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ["sequential", "vectorized", "vectorized-1", "workers", "plain", "flower"]
LABEL = {
    "sequential": "fedforge sequential",
    "vectorized": "fedforge vectorized (vmap, CPU, default threads)",
    "vectorized-1": "fedforge vectorized (vmap, CPU, 1 thread)",
    "workers": "fedforge workers (2 processes)",
    "plain": "plain PyTorch loop",
    "flower": "Flower 1.41 (Ray)",
}
N, K = 100, 10


def run_once(name: str, rounds: int, npz: Path, flower: Path | None, timeout: float) -> dict:  # type: ignore[type-arg]
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT)])  # this checkout's fedforge
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    if name == "flower":
        assert flower is not None
        cmd = [
            str(flower),
            str(ROOT / "bench" / "flower_sim.py"),
            str(npz),
            str(N),
            str(K),
            str(rounds),
            "cnn",
        ]
    else:
        cmd = [sys.executable, "-m", "bench.cnn_contender", name, str(N), str(K), str(rounds)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = run_measured(cmd, timeout, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row = {
        "contender": name,
        "whole_s": done.wall_s,
        "cpu_s": cpu,
        "peak_mib": done.peak_rss_bytes / 2**20,
    }
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode == 0 and lines:
        result = json.loads(lines[-1])
        rounds_s = result["round_s"]
        row.update(
            round_s=statistics.median(rounds_s[1:] or rounds_s),
            rounds_s=rounds_s,
            startup_s=result["startup_s"],
            accuracy=result["accuracy"],
        )
        if "startup_cpu_s" in result:  # the tree's CPU seconds per round, start-up excluded
            row["round_cpu_s"] = (cpu - result["startup_cpu_s"]) / len(rounds_s)
    else:
        row["error"] = "timeout" if done.returncode is None else done.stderr[-1500:]
    print(json.dumps({k: v for k, v in row.items() if k != "rounds_s"}), flush=True)
    return row


def summary(rows: list[dict]) -> list[dict]:  # type: ignore[type-arg]
    out = []
    for name in dict.fromkeys(r["contender"] for r in rows):
        ok = [r for r in rows if r["contender"] == name and "error" not in r]
        if not ok:
            out.append(
                {
                    "contender": name,
                    "error": next(r["error"] for r in rows if r["contender"] == name),
                }
            )
            continue
        out.append(
            {
                "contender": name,
                "round_s": statistics.median(r["round_s"] for r in ok),
                "round_min_s": min(r["round_s"] for r in ok),
                "round_max_s": max(r["round_s"] for r in ok),
                "round_cpu_s": statistics.median(r.get("round_cpu_s", float("nan")) for r in ok),
                "cpu_s": statistics.median(r["cpu_s"] for r in ok),
                "whole_s": statistics.median(r["whole_s"] for r in ok),
                "peak_mib": statistics.median(r["peak_mib"] for r in ok),
                "accuracy": ok[0]["accuracy"],
                "repeats": len(ok),
            }
        )
    return out


def table(rows: list[dict]) -> str:  # type: ignore[type-arg]
    out = [
        "| contender | round s, wall (median, min-max) | round s, CPU | process CPU s | "
        "whole process s | peak MiB | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {LABEL[r['contender']]} | {r['error'][:60]} | - | - | - | - | - |")
            continue
        cpu = "-" if r["round_cpu_s"] != r["round_cpu_s"] else f"{r['round_cpu_s']:.2f}"
        out.append(
            f"| {LABEL[r['contender']]} | {r['round_s']:.2f} ({r['round_min_s']:.2f}-"
            f"{r['round_max_s']:.2f}) | {cpu} | {r['cpu_s']:.0f} | {r['whole_s']:.0f} | "
            f"{r['peak_mib']:.0f} | {100 * r['accuracy']:.1f}% |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument(
        "--flower-python", type=Path, default=ROOT.parent.parent / ".venv-flwr/bin/python"
    )
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/cnn.json")
    args = parser.parse_args()
    flower = None if args.skip_flower or not args.flower_python.exists() else args.flower_python
    contenders = [c for c in args.contenders.split(",") if c != "flower" or flower]
    rows: list[dict] = []  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "cnn_workload.npz"
        if flower:
            wl.save(wl.build(N, model="cnn"), npz)
        for _ in range(args.repeats):
            for name in contenders:
                rows.append(run_once(name, args.rounds, npz, flower, args.timeout))
    result = summary(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"runs": rows, "summary": result}, indent=2))
    print()
    print(table(result))


if __name__ == "__main__":
    main()
