"""The ``fedforge`` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from rich.console import Console
from rich.logging import RichHandler

from fedforge.core.errors import FedforgeError
from fedforge.report.fairness import fairness_text
from fedforge.report.history import privacy_text

app = typer.Typer(
    help="fedforge: federated learning, simulated or deployed.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from fedforge import __version__

        typer.echo(f"fedforge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the fedforge version and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """fedforge: federated learning, simulated or deployed."""


def _setup_logging(level: int = logging.INFO) -> None:
    """Rich output on a terminal; plain one-line records when logging to a file or pipe."""
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _fail(exc: Exception, code: int = 1) -> typer.Exit:
    console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
    return typer.Exit(code)


@app.command()
def run(
    config: Annotated[
        Path | None, typer.Argument(help="TOML run configuration (defaults if omitted).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a key, e.g. --set server.rounds=20 (repeatable); "
            "`fedforge config` lists every key.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Run directory (default: a new runs/<timestamp>-<random>); "
            "refused if it holds files, unless --overwrite.",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace the previous run directory at --out."),
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the run in this run directory after its last completed round.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Run a federated training simulation and write a run directory.

    Every configuration key, with its default and allowed values: `fedforge config`.
    """
    from fedforge.config import load_config
    from fedforge.report.rundir import new_run_dir, prepare_out_dir

    if resume is not None and (config is not None or out is not None):
        raise _fail(ValueError("--resume takes the run directory's own config.toml"), 2)
    if resume is not None and overwrite:
        raise _fail(ValueError("--overwrite cannot be combined with --resume"), 2)
    try:
        if resume is not None:
            if not (resume / "config.toml").exists():
                raise FedforgeError(f"{resume} is not a run directory (no config.toml)")
            cfg = load_config(resume / "config.toml", set_)
        else:
            cfg = load_config(config, set_)
    except FedforgeError as exc:
        raise _fail(exc, 2) from None
    try:
        if resume is not None:
            out_dir = resume
        elif out is not None:
            prepare_out_dir(out, overwrite=overwrite)
            out_dir = out
        else:
            out_dir = new_run_dir()
    except (FedforgeError, OSError) as exc:
        raise _fail(exc, 2) from None
    _setup_logging()
    from fedforge.experiment import run_experiment
    from fedforge.report.progress import ProgressListener

    try:
        if quiet:
            result = run_experiment(cfg, out_dir, resume=resume is not None)
        else:
            progress = ProgressListener.make_progress(console)
            with progress:
                listener = ProgressListener(progress, cfg.server.rounds)
                result = run_experiment(cfg, out_dir, listener, resume=resume is not None)
    except FedforgeError as exc:
        raise _fail(exc) from None
    last = result.history[-1]
    if result.stop_reason:
        console.print(f"[bold yellow]stopped early[/]: {result.stop_reason}", soft_wrap=True)
    dp = privacy_text(last)
    console.print(
        f"done: {last.round} rounds, test accuracy {100 * last.test_accuracy:.2f}%, "
        f"test loss {last.test_loss:.4f}{', ' + dp if dp else ''}; run directory: {out_dir}",
        soft_wrap=True,
    )
    fairness = fairness_text(last.metrics)
    if fairness:
        console.print(fairness, soft_wrap=True)


@app.command("config")
def config_command() -> None:
    """Print every configuration key with its default, allowed values and meaning.

    Generated from the schema that validates run configurations: set keys in a TOML file
    (``[section]`` then ``key = value``) or with ``--set section.key=value``.
    """
    typer.echo("\n".join(describe_config()))


def describe_config() -> list[str]:
    """One line per configuration key, from :class:`fedforge.config.RunConfig`."""
    from fedforge.config import RunConfig

    lines: list[str] = []
    _describe_model(RunConfig, "", lines)
    return lines


def _describe_model(model: Any, prefix: str, lines: list[str]) -> None:
    from pydantic import BaseModel

    nested: list[tuple[str, Any]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((name, annotation))
            continue
        default = field.get_default(call_default_factory=True)
        parts = [_describe_type(annotation) + _describe_bounds(field.metadata)]
        if field.description:
            parts.append(field.description)
        shown = "unset" if default is None else _toml_value(default)
        lines.append(f"{prefix}{name} = {shown}  # " + "; ".join(parts))
    for name, section in nested:
        doc = (section.__doc__ or "").strip().splitlines()
        header = f"[{prefix}{name}]" + (f"  # {doc[0]}" if doc else "")
        lines.extend(["", header])
        _describe_model(section, f"{prefix}{name}.", lines)


def _describe_type(annotation: Any) -> str:
    import types
    from typing import Union

    origin = get_origin(annotation)
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        inner = " | ".join(_describe_type(a) for a in members)
        return f"{inner}, optional" if len(members) < len(get_args(annotation)) else inner
    if origin is not None:
        inner = ", ".join(_describe_type(a) for a in get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def _describe_bounds(metadata: list[Any]) -> str:
    bounds = []
    for item in metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None:
                bounds.append(f"{symbol} {value}")
    return f" ({', '.join(bounds)})" if bounds else ""


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | list):
        return json.dumps(value)
    return str(value)


keys_app = typer.Typer(help="Create and manage deployment credentials.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
def keys_init(
    directory: Annotated[Path, typer.Argument(help="Keys directory to create.")] = Path("keys"),
    name: Annotated[
        list[str] | None,
        typer.Option("--name", help="Server DNS name or IP (repeatable)."),
    ] = None,
) -> None:
    """Create a CA and a server certificate (default names: localhost, 127.0.0.1)."""
    from fedforge.net.keys import init_keys

    try:
        init_keys(directory, name or ["localhost", "127.0.0.1"])
    except FedforgeError as exc:
        raise _fail(exc) from None
    console.print(f"created CA and server certificate in {directory}")


@keys_app.command("add-client")
def keys_add_client(
    name: Annotated[str, typer.Argument(help="Client name (its identity).")],
    keys: Annotated[Path, typer.Option("--keys", help="Keys directory.")] = Path("keys"),
    out: Annotated[
        Path | None, typer.Option("--out", help="Credentials directory (default KEYS/NAME).")
    ] = None,
) -> None:
    """Issue a client certificate and write the client's credentials directory."""
    from fedforge.net.keys import add_client

    target = out or keys / name
    try:
        add_client(keys, name, target)
    except FedforgeError as exc:
        raise _fail(exc) from None
    console.print(f"client {name!r}: credentials in {target} (hand this directory to the client)")


@keys_app.command("revoke")
def keys_revoke(
    name: Annotated[str, typer.Argument(help="Client to revoke.")],
    keys: Annotated[Path, typer.Option("--keys", help="Keys directory.")] = Path("keys"),
) -> None:
    """Revoke a client's certificate (takes effect when the server next starts)."""
    from fedforge.net.keys import revoke_client

    try:
        serial = revoke_client(keys, name)
    except FedforgeError as exc:
        raise _fail(exc) from None
    console.print(f"revoked {name!r} (serial {serial})")


@app.command()
def server(
    config: Annotated[Path | None, typer.Argument(help="TOML run configuration.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key.")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS or authentication (local demos only).")
    ] = False,
    client: Annotated[
        list[str] | None, typer.Option("--client", help="--insecure only: allowed client names.")
    ] = None,
) -> None:
    """Serve a federated run over gRPC (mutual TLS); resumes from deploy.state_dir."""
    from fedforge.config import load_config

    _setup_logging()
    try:
        cfg = load_config(config, set_)
    except FedforgeError as exc:
        raise _fail(exc, 2) from None
    from fedforge.net.server import run_server

    if insecure:
        console.print(
            "[bold red]WARNING: --insecure: traffic is unencrypted and clients are "
            "not authenticated. Never use this beyond localhost.[/]"
        )
    try:
        result = run_server(cfg, insecure=insecure, client_names=client)
    except FedforgeError as exc:
        raise _fail(exc) from None
    last = result.history[-1]
    if result.stop_reason:
        console.print(f"[bold yellow]stopped early[/]: {result.stop_reason}", soft_wrap=True)
    dp = privacy_text(last)
    console.print(
        f"run {result.run_id} complete: {last.round} rounds, test accuracy "
        f"{100 * last.test_accuracy:.2f}%{', ' + dp if dp else ''}",
        soft_wrap=True,
    )


@app.command("client")
def client_command(
    server_address: Annotated[str, typer.Option("--server", help="Server HOST:PORT.")],
    credentials: Annotated[
        Path | None, typer.Option("--credentials", help="Credentials directory (add-client).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Local data .npz (arrays x, y); default: the run's partition."),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="--insecure servers only: client name.")] = "",
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            help="Where this client keeps its state across rounds and restarts "
            "(default: client-state/<client name>).",
        ),
    ] = None,
) -> None:
    """Join a federated run: train on pushed work until the run completes."""
    from fedforge.net.client import FederatedClient, builtin_partition, npz_loader
    from fedforge.net.keys import ClientCredentials

    _setup_logging()
    try:
        creds = ClientCredentials.load(credentials) if credentials else None
        loader = npz_loader(str(data)) if data else builtin_partition
        client = FederatedClient(server_address, creds, loader, name=name, state_dir=state_dir)
        rounds = client.run()
    except FedforgeError as exc:
        raise _fail(exc) from None
    console.print(f"done: trained in {rounds} rounds")


if __name__ == "__main__":
    app()
