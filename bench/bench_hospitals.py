"""The README's cross-silo walkthrough in numbers: three hospitals' breast-cancer files
(``fedforge new --template tabular``), federated vs each hospital alone vs pooled.

    python -m bench.bench_hospitals [--seeds 0,1,2] [--rounds 20]

Every contender trains the template's model (30-32-2 MLP) with the template's local settings
(SGD lr 0.05, batch 16, 2 epochs a round) for the same number of rounds, on the same training
rows: each hospital's file less its held-out 20% (drawn from the run seed, as federated
evaluation holds it out). "Alone" and "pooled" are one-client runs (FedAvg with one client is
plain local SGD: 2 x rounds epochs). Every final model is scored on the shared test set
(``data/test.csv``, 114 patients) and on each hospital's held-out patients. Features are
standardized per site, as the template's ``data.py`` does; the last row standardizes every
file with the statistics of all hospitals together, which needs those statistics shared.
Seeds change the initial model, the batch order and the held-out rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import fedforge as ff
from fedforge.config import load_config
from fedforge.data.federated import FederatedDataset
from fedforge.experiment import build_workload
from fedforge.templates import create
from fedforge.train.evaluate import evaluate
from fedforge.train.torch_model import TorchModel
from fedforge.workload.federate import federate

HOSPITALS = ["hospital1", "hospital2", "hospital3"]


def scores(model: torch.nn.Module, data: FederatedDataset) -> dict[str, float]:
    wrapped = TorchModel(model)
    out = {"test": evaluate(wrapped, data.test).accuracy}
    for i, name in enumerate(HOSPITALS):
        assert data.holdout is not None
        idx = data.holdout[i]
        out[name] = evaluate(
            wrapped, ff.ArrayDataset(data.train.x[idx], data.train.y[idx])
        ).accuracy
    out["hospitals_mean"] = float(np.mean([out[h] for h in HOSPITALS]))
    return out


def train(
    workload: ff.Workload,
    data: FederatedDataset,
    parts: list[np.ndarray],
    rounds: int,
    local: ff.LocalSGD,
    seed: int,
) -> torch.nn.Module:
    """FedAvg over ``parts`` (one index array per client, every client every round)."""
    federation = FederatedDataset(data.train, data.test, parts)
    result = ff.simulate(
        workload.model,
        federation,
        ff.FedAvg(local=local),
        rounds=rounds,
        clients_per_round=len(parts),
        seed=seed,
        backend="sequential",
    )
    return result.model


def run(project: Path, seeds: list[int], rounds: int) -> dict[str, dict[str, list[float]]]:
    config = load_config(project / "fedforge.toml", [f"server.rounds={rounds}"])
    c = config.client
    local = ff.LocalSGD(lr=c.lr, epochs=c.epochs, batch_size=c.batch_size)
    results: dict[str, dict[str, list[float]]] = {}

    def record(name: str, got: dict[str, float]) -> None:
        for key, value in got.items():
            results.setdefault(name, {}).setdefault(key, []).append(value)

    scaled = pooled_scaling(project)
    test = project / "data" / "test.csv"
    shared_stats = replace(
        build_workload(config), data=scaled, test=lambda: scaled(ff.Site(-1, test))
    )
    for seed in seeds:
        for scaling in ("site", "all hospitals"):
            workload = build_workload(config) if scaling == "site" else shared_stats
            data = federate(workload, root=project, seed=seed, holdout=config.evaluation.holdout)
            model = build_workload(config, data)
            if scaling == "all hospitals":
                record(
                    "federated, features scaled with all hospitals' statistics",
                    scores(train(model, data, list(data.partition), rounds, local, seed), data),
                )
                continue
            record(
                "federated (FedAvg, 3 hospitals)",
                scores(train(model, data, list(data.partition), rounds, local, seed), data),
            )
            record(
                "pooled (all training rows in one place)",
                scores(
                    train(model, data, [np.concatenate(data.partition)], rounds, local, seed), data
                ),
            )
            for i, name in enumerate(HOSPITALS):
                record(
                    f"{name} alone",
                    scores(train(model, data, [data.partition[i]], rounds, local, seed), data),
                )
        print(f"seed {seed} done", file=sys.stderr, flush=True)
    return results


def pooled_scaling(project: Path):  # type: ignore[no-untyped-def]
    """A data function standardizing with the three hospitals' statistics together."""
    raw = {
        h: ff.read_data(
            project / "data" / f"{h}.csv", label="diagnosis", labels=["B", "M"], scale="none"
        )
        for h in HOSPITALS
    }
    x = np.concatenate([d.x for d in raw.values()])
    mean, std = x.mean(axis=0), x.std(axis=0)

    def data(site: ff.Site) -> ff.ArrayDataset:
        assert site.path is not None
        d = ff.read_data(site.path, label="diagnosis", labels=["B", "M"], scale="none")
        return ff.ArrayDataset(((d.x - mean) / std).astype(np.float32), d.y)

    return data


def table(results: dict[str, dict[str, list[float]]]) -> str:
    columns = ["test", *HOSPITALS, "hospitals_mean"]
    head = [
        "shared test set (114)",
        "hospital1 held out (48)",
        "hospital2 held out (26)",
        "hospital3 held out (17)",
        "mean over hospitals",
    ]
    out = ["| trained on | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for name, got in results.items():
        cells = []
        for column in columns:
            values = got[column]
            spread = (
                f" ({100 * min(values):.1f}-{100 * max(values):.1f})" if len(values) > 1 else ""
            )
            cells.append(f"{100 * statistics.median(values):.1f}%{spread}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).resolve().parent / "results/hospitals.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "hospitals"
        create("tabular", project)
        results = run(project, [int(s) for s in args.seeds.split(",")], args.rounds)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
