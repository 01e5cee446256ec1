"""Time of each Byzantine-robust aggregator at 100 clients x 200,000 parameters.

    python -m bench.bench_robust_aggregators [--n 100] [--d 200000] [--f 20] [--repeats 7]
                                             [--blas-threads 1 2]

Inputs are float32 updates: n - f honest clients around a shared direction plus f attackers
sent far away (so Krum, Bulyan and the geometric median do their real work). The rules are
pure NumPy, so torch's thread setting plays no part; there is one column per
``--blas-threads`` value (``simulate`` limits BLAS to 1 thread while it runs). Each number is
the median of ``--repeats`` calls, interleaved across rules so drift on a shared machine
affects all alike. Issue 10 targets Krum and Bulyan under 200 ms on 2 cores. The last row and
line measure the float32 Gram matrix the rules do not use: what float64 distances cost and
what they buy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from fedforge.aggregate import robust
from fedforge.aggregate.kinds import weighted_mean

TARGET_MS = 200.0


def make_updates(n: int, d: int, f: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shared = rng.normal(0.0, 1e-2, d).astype(np.float32)
    x = shared + rng.normal(0.0, 1e-2, (n, d)).astype(np.float32)
    x[n - f :] = -100.0 * shared  # a scaled, sign-flipped attack
    return x


def gram32(x: np.ndarray) -> np.ndarray:
    """The float32 alternative: per block float32 products, summed in float64."""
    g = np.zeros((len(x), len(x)))
    for start in range(0, x.shape[1], 4096):
        part = x[:, start : start + 4096]
        part = part - part.mean(axis=0)
        g += part @ part.T
    return g


def distances(g: np.ndarray) -> np.ndarray:
    sq = np.diag(g)
    dist: np.ndarray = np.maximum(sq[:, None] + sq[None, :] - 2 * g, 0.0)
    return dist


def time_rules(rules: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Milliseconds per call, after one warm-up call each; repeats interleaved across rules."""
    times: dict[str, list[float]] = {name: [] for name in rules}
    for fn in rules.values():
        fn()
    for _ in range(repeats):
        for name, fn in rules.items():
            start = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--d", type=int, default=200_000)
    parser.add_argument("--f", type=int, default=20, help="Byzantine clients (default 20%%)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--blas-threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    n, d, f = args.n, args.d, args.f
    x = make_updates(n, d, f)
    w = np.ones(n)
    beta = (f + 0.5) / n  # trims exactly f per end
    rules: dict[str, Callable[[], object]] = {
        "mean (reference)": lambda: weighted_mean(x, w),
        "pairwise distances (Gram, float64)": lambda: robust.pairwise_sq_distances(x),
        "coordinate_median": lambda: robust.coordinate_median(x),
        f"trimmed_mean (beta {beta:.3f})": lambda: robust.trimmed_mean(x, beta),
        f"krum (f {f})": lambda: robust.krum(x, f),
        f"multi_krum (f {f}, m {n - f})": lambda: robust.krum(x, f, m=n - f),
        f"bulyan (f {f})": lambda: robust.bulyan(x, f),
        "geometric_median (tol 1e-6)": lambda: robust.geometric_median(x, w),
        "norm_bound (quantile 0.5)": lambda: robust.norm_bound(x, w, quantile=0.5),
        "centered_clipping (1 iteration)": lambda: robust.centered_clipping(
            x, w, np.zeros(d), tau=1.0
        ),
        "(float32 Gram, not used)": lambda: gram32(x),
    }
    times: dict[int, dict[str, list[float]]] = {}
    for threads in args.blas_threads:
        with threadpool_limits(threads, user_api="blas"):
            times[threads] = time_rules(rules, args.repeats)
    iterations = robust.geometric_median(x, w).info["iterations"]
    exact = robust.pairwise_sq_distances(x)
    approx = distances(gram32(x))
    print(
        f"workload: n={n} clients x d={d:,} float32 parameters, f={f} attackers "
        f"(-100 x the honest direction); {os.cpu_count()} CPUs; median of {args.repeats} "
        f"(simulate() runs aggregation with 1 BLAS thread)"
    )
    heads = "".join(f"{f'ms, {t} BLAS thr':>17}" for t in times)
    print(f"{'rule':<38}{heads}  note")
    for name in rules:
        medians = [statistics.median(per_rule[name]) for per_rule in times.values()]
        note = ""
        if name.startswith(("krum", "bulyan")):
            note = f"< {TARGET_MS:.0f} ms: " + "/".join(
                "yes" if ms < TARGET_MS else "NO" for ms in medians
            )
        elif name.startswith("geometric"):
            note = f"{iterations:.0f} Weiszfeld iterations"
        print(f"{name:<38}{''.join(f'{ms:>17.1f}' for ms in medians)}  {note}")
    apart = exact > 0  # the attackers send identical updates
    rel = np.abs(approx - exact)[apart] / exact[apart]
    print(f"float32 Gram: max relative error of the nonzero squared distances {rel.max():.1e}")


if __name__ == "__main__":
    main()
