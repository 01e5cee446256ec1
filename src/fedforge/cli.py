"""The ``fedforge`` command line."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from fedforge.core.errors import FedforgeError

app = typer.Typer(
    help="fedforge: federated learning, simulated or deployed.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)


@app.callback()
def main() -> None:
    """fedforge: federated learning, simulated or deployed."""


@app.command()
def run(
    config: Annotated[
        Path | None, typer.Argument(help="TOML run configuration (defaults if omitted).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key, e.g. --set server.rounds=20 (repeatable)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory (default runs/<timestamp>).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Run a federated training simulation and write a run directory."""
    from fedforge.config import load_config

    try:
        cfg = load_config(config, set_)
    except FedforgeError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    out_dir = out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    from fedforge.experiment import run_experiment
    from fedforge.report.progress import ProgressListener

    try:
        if quiet:
            result = run_experiment(cfg, out_dir)
        else:
            progress = ProgressListener.make_progress()
            with progress:
                result = run_experiment(cfg, out_dir, ProgressListener(progress, cfg.server.rounds))
    except FedforgeError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    last = result.history[-1]
    console.print(
        f"done: {len(result.history)} rounds, test accuracy {100 * last.test_accuracy:.2f}%, "
        f"test loss {last.test_loss:.4f}; run directory: {out_dir}",
        soft_wrap=True,
    )


if __name__ == "__main__":
    app()
