"""One benchmark contender in its own process: ``python -m bench.contender NAME N K ROUNDS``.

NAME is ``plain`` (a plain PyTorch FedAvg loop), ``floor`` (the round's matrix products, see
below) or a fedforge backend with an optional variant: ``vectorized-fedprox`` (FedProx, mu
0.01), ``vectorized-scaffold`` (SCAFFOLD through the Python API), ``vectorized-scaffold-cli``
(the same with a run directory, as ``fedforge run`` does: client states flushed and the round
checkpointed), ``vectorized-dp`` (central DP: clip 1.0, noise multiplier 1.0),
``vectorized-q8``, ``-q4`` (blocks of 256), ``-rq4`` (rotated 4-bit, blocks of 4096),
``-topk`` (1% with error feedback), ``vectorized-custom`` (the 2NN as a custom
``nn.Module`` class). Prints one JSON line: start-up seconds, per-round wall and CPU seconds,
final test accuracy.

CPU seconds are this process tree's (``bench/proc_tree.py``), so other load on the machine does
not count. A fedforge round is measured from one round's start to the next (its checkpoint
included); torch runs one thread unless ``FEDFORGE_BENCH_THREADS`` says otherwise.

``floor``: the matrix products of one round (forward, input and weight gradients of every
client's examples, the central evaluation's forward), executed as whole-cohort GEMMs at the
same thread count; its CPU seconds (best of 5) are the round's GEMM floor.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import workload as wl  # noqa: E402
from bench.plain_loop import plain_fedavg  # noqa: E402
from bench.proc_tree import tree_cpu_seconds  # noqa: E402
from fedforge.algorithms.base import Algorithm  # noqa: E402
from fedforge.algorithms.fedavg import FedAvg  # noqa: E402
from fedforge.algorithms.fedprox import FedProx  # noqa: E402
from fedforge.algorithms.scaffold import Scaffold  # noqa: E402
from fedforge.config import load_config  # noqa: E402
from fedforge.core.rng import Purpose, RngStreams  # noqa: E402
from fedforge.experiment import build_stages  # noqa: E402
from fedforge.report.history import RoundRecord  # noqa: E402
from fedforge.runtime.driver import RoundListener  # noqa: E402
from fedforge.runtime.sampling import UniformSampler  # noqa: E402
from fedforge.runtime.simulation import simulate  # noqa: E402
from fedforge.stages.base import Stage  # noqa: E402
from fedforge.train.models import mlp  # noqa: E402
from fedforge.train.program import LocalSGD  # noqa: E402
from fedforge.train.torch_model import TorchModel  # noqa: E402

THREADS = int(os.environ.get("FEDFORGE_BENCH_THREADS", "1"))
# Variant -> configuration keys of its update stages (built as ``fedforge run`` builds them).
STAGES = {
    "dp": ["privacy.mode=central", "privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0"],
    "q8": ["update.codec=q8"],
    "q4": ["update.codec=q4"],
    "rq4": ["update.codec=rotated_q4"],
    "topk": ["update.codec=topk"],
}


class CustomMLP(torch.nn.Module):
    """The 2NN as users usually write it: a class with a forward method."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 200)
        self.fc2 = torch.nn.Linear(200, 200)
        self.out = torch.nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.nn.functional.relu(self.fc2(x))
        return self.out(x)


def algorithm(variant: str) -> Algorithm:
    local = LocalSGD(lr=wl.LR, epochs=wl.EPOCHS, batch_size=wl.BATCH)
    if variant == "fedprox":
        return FedProx(local=local, mu=0.01)
    if variant.startswith("scaffold"):
        return Scaffold(local=local)
    return FedAvg(local=local)


def stages(variant: str, work: wl.Workload, k: int, rounds: int) -> list[Stage]:
    if variant not in STAGES:
        return []
    # The run's cohort and length, which central DP's accounting checks against the sampler.
    run = [f"server.clients_per_round={k}", f"server.rounds={rounds}"]
    cfg = load_config(None, [*run, *STAGES[variant]])
    return build_stages(cfg, work.data.num_clients, work.data.client_sizes())


class Timer(RoundListener):
    """Marks every round's start (wall and process-tree CPU seconds)."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []

    def round_started(self, round_number: int, client_ids: list[int]) -> None:
        self.marks.append((time.perf_counter(), tree_cpu_seconds()))

    def round_finished(self, record: RoundRecord) -> None:
        pass


def floor(work: wl.Workload, k: int, rounds: int) -> dict[str, object]:
    """The round's matrix products as whole-cohort GEMMs: median over the rounds' cohorts of
    the best-of-5 CPU seconds."""
    model = mlp(784, 10)
    shapes = [p.shape for n, p in model.named_parameters() if n.endswith("weight")]
    sampler = UniformSampler(k)
    streams = RngStreams(wl.SEED)
    test = len(work.data.test)
    seconds, flops = [], []
    for r in range(1, rounds + 1):
        cohort = sampler(range(work.data.num_clients), streams.generator(Purpose.SAMPLING, r))
        rows = wl.EPOCHS * sum(work.data.client_size(c) for c in cohort)
        tensors = _gemm_operands(rows, test, shapes)
        best = float("inf")
        for _ in range(5):
            start = tree_cpu_seconds()
            _round_products(*tensors)
            best = min(best, tree_cpu_seconds() - start)
        seconds.append(best)
        flops.append(_round_flops(rows, test, shapes))
    return {"round_cpu_s": seconds, "round_s": seconds, "flops": flops, "accuracy": 0.0}


def _gemm_operands(
    rows: int, test: int, shapes: Sequence[torch.Size]
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    weights = [torch.randn(*s) for s in shapes]
    inputs = [torch.randn(rows, s[1]) for s in shapes]
    grads = [torch.randn(rows, s[0]) for s in shapes]
    tests = [torch.randn(test, s[1]) for s in shapes]
    return weights, inputs, grads, tests


def _round_products(
    weights: list[torch.Tensor],
    inputs: list[torch.Tensor],
    grads: list[torch.Tensor],
    tests: list[torch.Tensor],
) -> None:
    for i, (w, h, g, t) in enumerate(zip(weights, inputs, grads, tests, strict=True)):
        h @ w.t()  # forward
        g.t() @ h  # weight gradient
        if i > 0:
            g @ w  # input gradient
        t @ w.t()  # central evaluation


def _round_flops(rows: int, test: int, shapes: Sequence[torch.Size]) -> int:
    total = 0
    for i, (out, inp) in enumerate(shapes):
        total += 2 * out * inp * (2 * rows + test + (rows if i > 0 else 0))
    return total


def main() -> None:
    name, n, k, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(THREADS)
    work = wl.build(n)
    if name == "floor":
        print(json.dumps({"startup_s": 0.0, **floor(work, k, rounds)}))
        return
    backend, _, variant = name.partition("-")
    model = CustomMLP() if variant == "custom" else mlp(784, 10)
    names = list(TorchModel(model).names)
    TorchModel(model).set_params(dict(zip(names, work.init.values(), strict=True)))
    if name == "plain":
        times: list[float] = []
        cpu: list[float] = []
        start = time.perf_counter()
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
            round_cpu=cpu,
        )
        out = {
            "startup_s": start - PROCESS_START,
            "round_s": times,
            "round_cpu_s": cpu,
            "accuracy": accs[-1],
        }
    else:
        timer = Timer()
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            result = simulate(
                model,
                work.data,
                algorithm(variant),
                rounds=rounds,
                clients_per_round=k,
                seed=wl.SEED,
                backend=backend,  # type: ignore[arg-type]
                listener=timer,
                stages=stages(variant, work, k, rounds),
                threads=THREADS,
                state_dir=Path(tmp) if variant.endswith("-cli") else None,
            )
            timer.round_started(rounds + 1, [])  # the end of the last round
        marks = np.array(timer.marks)
        out = {
            "startup_s": float(marks[0, 0]) - PROCESS_START,
            "round_s": np.diff(marks[:, 0]).tolist(),
            "round_cpu_s": np.diff(marks[:, 1]).tolist(),
            "accuracy": result.history[-1].test_accuracy,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
