"""Differential privacy: the privacy-utility curve and the per-round cost of DP, side by side.

    python -m bench.bench_privacy [--quick] [--json PATH] [--plot PATH]
    python -m bench.bench_privacy --tables-from bench/results/privacy.json [--plot PATH]

Workload (``bench/workload.py``): mnist5k, Dirichlet(0.5) over N clients (tiled when N
exceeds the 4,000 training digits, so each client holds a few examples), the 2NN (199,210
parameters) from the shared initial weights, E=1, B=10, client lr 0.05, FedAdam on the server
(lr 0.003), Poisson client sampling, the vectorized runtime, seed 0.

1. Utility, per setting (N=1,000 at q=0.02 and N=5,000 at q=0.01, 300 rounds): no DP (FedAvg's
   example-weighted mean, no clipping), then central DP (DP-FedAvg: clip on the client,
   Gaussian noise on the server's sum, uniform weights, fixed denominator = expected
   clients) with ``privacy.target_epsilon`` 1, 2, 4, 8 at delta 1e-5, so the noise
   multiplier is calibrated (PLD accountant) for the configured rounds to end at the target;
   fixed clipping (norm 0.05) and adaptive clipping (from 0.05, target quantile 0.5, step 0.2,
   count noise expected clients / 20) for each. Runs are configured through the same
   ``[privacy]``, ``[server]`` and ``[client]`` keys as ``fedforge run``. Noise is *seeded*
   from the run seed (``privacy.seeded_noise``) so a re-run reproduces every number (it costs
   what OS-entropy noise costs). Accuracy is on the 1,000 mnist5k test digits.
2. Cost, at N=1,000, q=0.02: no DP; central DP at the epsilon-4 configuration with fixed and
   with adaptive clipping (OS-entropy noise, the default); local DP with the same noise
   multiplier (timed only: it is no meaningful local guarantee). Each contender runs 22
   rounds per repeat, 5 repeats interleaved in rotating order so load on the shared machine
   affects all alike; one seed samples the same clients in every contender (checked). *Round
   s* is the driver's round (training, clipping, noise, aggregation, accounting, central
   evaluation), *loop s* the time between two rounds' ends (adds the budget check that a
   target epsilon runs before each round); medians over every round but each run's first.
3. Output: tables on stdout, the raw numbers in ``bench/results/privacy.json``, accuracy vs
   epsilon in ``bench/results/privacy_utility.png``. ``--quick`` is a smoke run (one setting,
   6 rounds, epsilon 1 and 8, 2 x 4 cost rounds), written under the temporary folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import workload as wl
from fedforge.config import RunConfig
from fedforge.core.errors import ConfigError
from fedforge.core.records import RecordBatch
from fedforge.experiment import build_algorithm, build_stages
from fedforge.privacy.accounting import SamplingScheme, epsilon
from fedforge.privacy.noise import NoiseSource
from fedforge.report.history import RoundRecord
from fedforge.runtime.driver import RoundListener
from fedforge.runtime.sampling import PoissonSampler
from fedforge.runtime.simulation import SimulationResult, simulate
from fedforge.stages.clip import clip_rows
from fedforge.stages.dp_noise import CentralGaussian
from fedforge.train.models import mlp
from fedforge.train.torch_model import TorchModel

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
EPSILONS = (1.0, 2.0, 4.0, 8.0)
CLIP_NORM = 0.05  # about the median norm of a client's first update (lr 0.05 x gradient ~1.1)
CLIENT = {"epochs": 1, "batch_size": 10, "lr": 0.05}
# FedAdam: its step does not grow with the clip norm, so adaptive clipping cannot feed its
# own noise back into the model (with server SGD at lr 1, adaptive clipping diverged here).
SERVER = {"optimizer": "adam", "lr": 0.003, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
COST_TARGET = 1.3
LAST = 10  # rounds averaged for the "last rounds" accuracy


@dataclass(frozen=True)
class Setting:
    num_clients: int
    rate: float
    rounds: int

    @property
    def expected_clients(self) -> float:
        return self.num_clients * self.rate

    def describe(self) -> str:
        return (
            f"N={self.num_clients:,}, q={self.rate:g} (~{self.expected_clients:g}/round), "
            f"{self.rounds} rounds"
        )


FULL_SETTINGS = (Setting(1000, 0.02, 300), Setting(5000, 0.01, 300))
QUICK_SETTINGS = (Setting(1000, 0.02, 6),)


def run_config(
    setting: Setting, privacy: dict[str, Any], seed: int = wl.SEED, threads: int | None = None
) -> RunConfig:
    """The run as ``fedforge run`` would read it from TOML (data comes from the workload)."""
    return RunConfig.model_validate(
        {
            "seed": seed,
            "partition": {"num_clients": setting.num_clients, "alpha": wl.ALPHA},
            "client": CLIENT,
            "server": {
                **SERVER,
                "rounds": setting.rounds,
                "sampler": "poisson",
                "sampling_rate": setting.rate,
            },
            "privacy": privacy,
            "runtime": {"backend": "vectorized", "threads": threads},
        }
    )


def central(
    target: float | None = None, adaptive: bool = False, z: float | None = None, seeded: bool = True
) -> dict[str, Any]:
    keys: dict[str, Any] = {"mode": "central", "delta": DELTA, "clip_norm": CLIP_NORM}
    keys.update(adaptive_clip=adaptive, target_quantile=0.5, seeded_noise=seeded)
    keys.update({"target_epsilon": target} if z is None else {"noise_multiplier": z})
    return keys


@lru_cache(maxsize=2)
def workload(num_clients: int) -> wl.Workload:
    return wl.build(num_clients)


def simulate_run(
    work: wl.Workload,
    config: RunConfig,
    listener: RoundListener | None = None,
    rounds: int | None = None,
) -> SimulationResult:
    """``config`` on the workload; ``rounds`` stops early (the noise is still calibrated
    for ``config.server.rounds``)."""
    model = mlp(784, 10)
    TorchModel(model).set_params(work.init)
    data = work.data
    return simulate(
        model,
        data,
        build_algorithm(config),
        rounds=rounds or config.server.rounds,
        sampler=PoissonSampler(config.server.sampling_rate),
        stages=build_stages(config, data.num_clients, data.client_sizes()),
        seed=config.seed,
        backend="vectorized",
        threads=config.runtime.threads,
        listener=listener,
    )


# 1. Privacy-utility curve -------------------------------------------------------------------
def utility_row(
    work: wl.Workload, setting: Setting, target: float | None, clip: str | None
) -> dict[str, Any]:
    row: dict[str, Any] = {**asdict(setting), "target_epsilon": target, "clip": clip}
    privacy = {} if target is None else central(target, adaptive=clip == "adaptive")
    started = time.perf_counter()
    try:
        result = simulate_run(work, run_config(setting, privacy))
    except ConfigError as exc:  # e.g. adaptive clipping that cannot reach the noise multiplier
        row["error"] = str(exc)
        return row
    history = result.history
    last: RoundRecord = history[-1]
    m = last.metrics
    row.update(
        seconds=time.perf_counter() - started,
        rounds_run=last.round,
        stop_reason=result.stop_reason,
        accuracy=last.test_accuracy,
        accuracy_last=float(np.mean([r.test_accuracy for r in history[-LAST:]])),
        epsilon=m.get("dp.epsilon"),
        noise_multiplier=m.get("dp.noise_multiplier"),
        value_noise_multiplier=m.get("dp.value_noise_multiplier"),
        clip_norm_final=m.get("clip.norm"),
        noise=last.labels.get("dp.noise"),
        accuracy_curve=[r.test_accuracy for r in history],
    )
    return row


def utility(settings: tuple[Setting, ...], epsilons: tuple[float, ...]) -> list[dict[str, Any]]:
    rows = []
    for setting in settings:
        work = workload(setting.num_clients)
        runs: list[tuple[float | None, str | None]] = [(None, None)]
        runs += [(eps, clip) for eps in epsilons for clip in ("fixed", "adaptive")]
        for target, clip in runs:
            row = utility_row(work, setting, target, clip)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "accuracy_curve"}), flush=True)
    return rows


def uncentred_bit_epsilon(row: dict[str, Any]) -> float | None:
    """The epsilon of an adaptive run if the clipped count is charged at sensitivity 1.

    ``adaptive_value_multiplier`` charges the count at sensitivity 1/2 ("after centring", as
    tensorflow_privacy sums ``bit - 1/2``), but ``stages/clip.py`` sums raw 0/1 bits, whose
    sum moves by 1 when a client is added or removed. The two releases together then cost a
    Gaussian of multiplier ``(z_v^-2 + sigma_b^-2)^-1/2``, not the configured z."""
    if row.get("clip") != "adaptive" or row.get("value_noise_multiplier") is None:
        return None
    sigma_b = row["num_clients"] * row["rate"] / 20  # privacy.count_stddev's default
    joint = (row["value_noise_multiplier"] ** -2 + sigma_b**-2) ** -0.5
    scheme = SamplingScheme("poisson", row["num_clients"], rate=row["rate"])
    return epsilon(scheme, joint, row["rounds_run"], DELTA)


def utility_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| N, q, rounds | target eps | clipping | z (z_v on the update) | final eps (history) | "
        f"eps, count at sensitivity 1 | final accuracy | mean of last {LAST} rounds | "
        "final clip norm |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        setting = f"{r['num_clients']:,}, {r['rate']:g}, {r['rounds']}"
        if r["target_epsilon"] is None:
            head = f"| {setting} | no DP | none |"
        else:
            head = f"| {setting} | {r['target_epsilon']:g} | {r['clip']} |"
        if "error" in r:
            out.append(f"{head} - | - | - | {r['error'][:90]} | - | - |")
            continue
        z = r["noise_multiplier"]
        zv = r["value_noise_multiplier"]
        noise = "-" if z is None else f"{z:.3f}" + (f" ({zv:.3f})" if zv and zv != z else "")
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        true_eps = uncentred_bit_epsilon(r)
        bit = "-" if true_eps is None else f"{true_eps:.2f}"
        clip = "-" if r["clip_norm_final"] is None else f"{r['clip_norm_final']:.4f}"
        stopped = f" (stopped at round {r['rounds_run']})" if r.get("stop_reason") else ""
        out.append(
            f"{head} {noise} | {eps} | {bit} | {100 * r['accuracy']:.1f}%{stopped} | "
            f"{100 * r['accuracy_last']:.1f}% | {clip} |"
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["num_clients"], r["rate"], r["rounds"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        mine = [r for r in rows if (r["num_clients"], r["rate"], r["rounds"]) == key]
        for clip, marker in (("fixed", "o"), ("adaptive", "s")):
            pts = [
                (r["epsilon"], 100 * r["accuracy"])
                for r in mine
                if r["clip"] == clip and "error" not in r
            ]
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, marker=marker, label=f"central DP, {clip} clipping")
        charged = [
            (eps, 100 * r["accuracy"])
            for r in mine
            if (eps := uncentred_bit_epsilon(r)) is not None
        ]
        if charged:
            xs, ys = zip(*sorted(charged), strict=True)
            ax.plot(
                xs,
                ys,
                marker="s",
                markerfacecolor="none",
                linestyle=":",
                color="C1",
                label="adaptive, clipped count at sensitivity 1",
            )
        for r in mine:
            if r["target_epsilon"] is None and "error" not in r:
                ax.axhline(100 * r["accuracy"], color="gray", linestyle="--", label="no DP")
        ax.set_xscale("log", base=2)
        ticks = (*EPSILONS, 16.0)
        ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
        ax.set_xlabel(f"final epsilon at delta = {DELTA:g}")
        ax.set_ylabel("test accuracy after the last round (%)")
        ax.set_title(Setting(*key).describe(), fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("DP-FedAvg on mnist5k (2NN, Dirichlet 0.5): accuracy vs epsilon", fontsize=11)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# 2. Per-round cost --------------------------------------------------------------------------
COST_CONTENDERS = ("no DP", "central, fixed clip", "central, adaptive clip", "local DP")
COST_EPSILON = 4.0  # the central contenders are the epsilon-4 runs of the utility curve


def cost_config(setting: Setting, name: str, z: float, threads: int | None) -> RunConfig:
    if name == "no DP":
        privacy: dict[str, Any] = {}
    elif name == "local DP":  # the same z: no meaningful local guarantee, timed for its cost
        privacy = {"mode": "local", "noise_multiplier": z, "clip_norm": CLIP_NORM, "delta": DELTA}
    else:  # OS-entropy noise, the default
        privacy = central(COST_EPSILON, adaptive=name.endswith("adaptive clip"), seeded=False)
    return run_config(setting, privacy, threads=threads)


class Clock(RoundListener):
    """Who was sampled in each round, and when each round finished."""

    def __init__(self) -> None:
        self.sampled: list[list[int]] = []
        self.finished: list[float] = []

    def round_started(self, round_number: int, client_ids: list[int]) -> None:
        self.sampled.append(list(client_ids))

    def round_finished(self, record: RoundRecord) -> None:
        self.finished.append(time.perf_counter())


def cost(
    setting: Setting, rounds: int, repeats: int, z: float, threads: int | None = None
) -> dict[str, Any]:
    """Each contender ``repeats`` times for ``rounds`` rounds, interleaved in rotating order,
    with ``threads`` torch threads (None: the vectorized default, every core)."""
    work = workload(setting.num_clients)
    fields = ("wall", "loop", "train", "aggregate", "eval")
    times: dict[str, dict[str, list[float]]] = {
        name: {f: [] for f in fields} for name in COST_CONTENDERS
    }
    cohorts: dict[str, list[list[int]]] = {}
    quiet = logging.getLogger("fedforge")  # local DP's "ends above epsilon 10" warning
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for rep in range(repeats):
            shift = rep % len(COST_CONTENDERS)
            for name in COST_CONTENDERS[shift:] + COST_CONTENDERS[:shift]:
                clock = Clock()
                result = simulate_run(work, cost_config(setting, name, z, threads), clock, rounds)
                steady = result.history[2:]  # round 0 is the initial evaluation; skip round 1
                got = times[name]
                got["wall"] += [r.wall_seconds for r in steady]
                got["loop"] += list(np.diff(clock.finished[1:]))  # + the budget check between
                got["train"] += [r.train_seconds for r in steady]
                got["aggregate"] += [r.aggregate_seconds for r in steady]
                got["eval"] += [r.eval_seconds for r in steady]
                if cohorts.setdefault(name, clock.sampled) != clock.sampled:
                    raise AssertionError(f"{name}: the sampled clients changed between repeats")
    finally:
        quiet.setLevel(level)
    if len({json.dumps(c) for c in cohorts.values()}) != 1:
        raise AssertionError("the contenders did not train the same sampled clients")
    base = {f: statistics.median(times["no DP"][f]) for f in fields}
    rows = []
    for name in COST_CONTENDERS:
        row: dict[str, Any] = {"contender": name}
        for f in fields:
            row[f"{f}_s"] = statistics.median(times[name][f])
        row["ratio"] = row["wall_s"] / base["wall"]
        row["loop_ratio"] = row["loop_s"] / base["loop"]
        row["rounds_measured"] = len(times[name]["wall"])
        row["wall_s_all"] = times[name]["wall"]
        rows.append(row)
    sizes = [len(c) for c in next(iter(cohorts.values()))]
    return {
        "setting": asdict(setting),
        "threads": threads or os.cpu_count(),
        "rounds_per_run": rounds,
        "repeats": repeats,
        "noise_multiplier": z,
        "clients_per_round": sizes,
        "rows": rows,
        "components": components(work, setting, z, round(statistics.median(sizes))),
    }


def _median_time(fn: Callable[[], object], repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def components(work: wl.Workload, setting: Setting, z: float, clients: int) -> dict[str, float]:
    """Seconds of the DP pieces alone, for reading the cost table: one round's accounting
    (``dp.epsilon`` in the history; with a target epsilon the budget check before the round
    computes it once more), one central noise draw, a cohort's clipping (done twice: on the
    clients and again on the server), and a cohort's local noise."""
    config = run_config(setting, central(z=z, seeded=False))
    stages = build_stages(config, setting.num_clients)
    noise = next(s for s in stages if isinstance(s, CentralGaussian))
    rng = np.random.default_rng(0)
    stacked = {
        k: rng.normal(0, 0.01, (clients, *np.shape(v))).astype(np.float32)
        for k, v in work.init.items()
    }
    batch = RecordBatch(np.arange(clients), np.ones(clients, np.int64), stacked)
    size = int(sum(np.size(v) for v in work.init.values()))
    source = NoiseSource()
    return {
        "accountant_s": _median_time(lambda: noise.epsilon_after(setting.rounds // 2)),
        "central_noise_s": _median_time(lambda: source.gaussian((size,), 1.0, "central", 1, 0)),
        "clip_cohort_s": _median_time(lambda: clip_rows(batch, CLIP_NORM)),
        "local_noise_cohort_s": clients
        * _median_time(lambda: source.gaussian((size,), 1.0, "local", 1, 0)),
        "parameters": float(size),
        "clients": float(clients),
    }


def cost_table(result: dict[str, Any]) -> str:
    out = [
        "| contender | round s | ratio to no DP | loop s per round | loop ratio | train s | "
        "aggregate s | eval s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        out.append(
            f"| {r['contender']} | {r['wall_s']:.4f} | {r['ratio']:.2f}x | {r['loop_s']:.4f} | "
            f"{r['loop_ratio']:.2f}x | {r['train_s']:.4f} | {r['aggregate_s']:.4f} | "
            f"{r['eval_s']:.4f} |"
        )
    return "\n".join(out)


def cost_noise_multiplier(setting: Setting) -> float:
    """The z that ends ``setting`` at epsilon ``COST_EPSILON`` (calibrated like a run does)."""
    config = run_config(setting, central(COST_EPSILON))
    stages = build_stages(config, setting.num_clients)
    return next(s for s in stages if isinstance(s, CentralGaussian)).noise_multiplier


def print_tables(report: dict[str, Any]) -> None:
    print()
    print(utility_table(report["utility"]))
    for spent in report["cost"]:
        setting = spent["setting"]
        print()
        print(
            f"Per-round cost: N={setting['num_clients']:,}, q={setting['rate']:g}, central at "
            f"epsilon {COST_EPSILON:g} (z = {spent['noise_multiplier']:.3f}), "
            f"{spent['repeats']} x {spent['rounds_per_run']} rounds each, "
            f"{spent['threads']} torch thread(s)"
        )
        print(cost_table(spent))
        worst = max(r["ratio"] for r in spent["rows"] if r["contender"].startswith("central"))
        verdict = "met" if worst < COST_TARGET else "NOT met"
        print(f"central DP: worst round ratio {worst:.2f}x, target < {COST_TARGET}x {verdict}")
        pieces = {k: round(v, 5) for k, v in spent["components"].items()}
        print(f"DP pieces alone (s): {json.dumps(pieces)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (< 1 minute)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument(
        "--parts",
        default="utility,cost",
        help="utility,cost; cost alone re-measures the cost into an existing --json",
    )
    parser.add_argument(
        "--tables-from", type=Path, default=None, help="re-print the tables of a saved JSON"
    )
    args = parser.parse_args()
    if args.tables_from:
        report = json.loads(args.tables_from.read_text())
        print_tables(report)
        if args.plot:
            plot(report["utility"], args.plot)
        return
    out_dir = Path(tempfile.gettempdir()) / "fedforge-bench-privacy" if args.quick else None
    json_path = args.json or (out_dir or ROOT / "bench/results") / "privacy.json"
    plot_path = args.plot or (out_dir or ROOT / "bench/results") / "privacy_utility.png"
    settings = QUICK_SETTINGS if args.quick else FULL_SETTINGS
    epsilons = (1.0, 8.0) if args.quick else EPSILONS
    cost_rounds, cost_repeats = (4, 2) if args.quick else (22, 5)

    parts = args.parts.split(",")
    started = time.perf_counter()
    if "utility" in parts:
        rows = utility(settings, epsilons)
    else:  # keep the saved curve, re-measure the cost (a quieter moment on a shared machine)
        rows = json.loads(json_path.read_text())["utility"]
    cost_setting = settings[0]
    z = cost_noise_multiplier(cost_setting)
    spent = [cost(cost_setting, cost_rounds, cost_repeats, z, t) for t in (None, 1)]
    report = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
        },
        "delta": DELTA,
        "clip_norm": CLIP_NORM,
        "client": CLIENT,
        "server": SERVER,
        "utility": rows,
        "cost": spent,
        "seconds": time.perf_counter() - started,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    plot(rows, plot_path)

    print_tables(report)
    print(f"wrote {json_path} and {plot_path} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
