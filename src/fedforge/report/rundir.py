"""The run directory: resolved config, history, final model, report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.numpy import save_file

from fedforge.config import RunConfig, to_toml
from fedforge.data.federated import FederatedDataset
from fedforge.report.plots import plot_report

if TYPE_CHECKING:
    from fedforge.runtime.simulation import SimulationResult


def write_run_dir(
    out_dir: Path, config: RunConfig, result: SimulationResult, data: FederatedDataset
) -> None:
    """Write ``config.toml``, ``history.json``, ``model.safetensors`` and ``report.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.toml").write_text(to_toml(config))
    result.history.save(out_dir / "history.json")
    save_file(result.state.params, str(out_dir / "model.safetensors"))
    c = config
    title = (
        f"{c.algorithm.name} on {c.data.dataset}, {c.partition.scheme} over {data.num_clients} "
        f"clients, {c.server.clients_per_round if c.server.sampler == 'uniform' else 'Poisson'}"
        f" per round, E={c.client.epochs}, B={c.client.batch_size}, seed {c.seed}"
        f" (backend {result.backend})"
    )
    plot_report(result.history, data.label_distribution(), out_dir / "report.png", title)
