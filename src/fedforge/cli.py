"""The ``fedforge`` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin

import typer
from rich.console import Console
from rich.logging import RichHandler

from fedforge.core.errors import FedforgeError
from fedforge.report.fairness import fairness_text
from fedforge.report.history import privacy_text

if TYPE_CHECKING:
    from fedforge.config import RunConfig
    from fedforge.report.dashboard import Dashboard
    from fedforge.runtime.driver import RoundListener

app = typer.Typer(
    help="fedforge: federated learning, simulated or deployed.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)
DEFAULT_PORT = 8765  # the dashboard's
DashboardFlag = Annotated[
    bool,
    typer.Option(
        "--dashboard",
        help="Serve a live web dashboard of the run on localhost while it runs "
        "(`fedforge dashboard DIR` shows it later, DIR the run or state directory).",
    ),
]
DashboardPort = Annotated[
    int, typer.Option("--dashboard-port", help="Dashboard port (0: any free port).")
]


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
    from rich.markup import escape

    # Escaped: "pip install 'fedforge[ray]'" is not markup.
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
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
    dashboard: DashboardFlag = False,
    dashboard_port: DashboardPort = DEFAULT_PORT,
    tensorboard: Annotated[
        bool,
        typer.Option(
            "--tensorboard", help="Export every round to TensorBoard (RUN_DIR/tensorboard)."
        ),
    ] = False,
    mlflow: Annotated[
        bool,
        typer.Option(
            "--mlflow",
            help="Log the configuration and every round to MLflow (at MLFLOW_TRACKING_URI, "
            "else MLflow's local default).",
        ),
    ] = False,
) -> None:
    """Run a federated training simulation and write a run directory.

    Every configuration key, with its default and allowed values: `fedforge config`.
    """
    from fedforge.config import load_config
    from fedforge.experiment import check_simulation
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
        check_simulation(cfg)
        missing = missing_trackers(tensorboard=tensorboard, mlflow=mlflow)
        if missing:
            raise FedforgeError(missing)
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
    from fedforge.report.listeners import ListenerGroup
    from fedforge.report.progress import ProgressListener

    server = None
    listeners = ListenerGroup([])
    try:
        listeners.listeners.extend(make_trackers(cfg, out_dir, tensorboard, mlflow))
        if dashboard:
            server = _start_dashboard(out_dir, dashboard_port)
        if quiet:
            result = run_experiment(cfg, out_dir, listeners, resume=resume is not None)
        else:
            progress = ProgressListener.make_progress(console)
            with progress:
                listeners.listeners.append(ProgressListener(progress, cfg.server.rounds))
                result = run_experiment(cfg, out_dir, listeners, resume=resume is not None)
    except FedforgeError as exc:
        raise _fail(exc) from None
    finally:
        listeners.close()
        if server is not None:
            server.close()
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


def _start_dashboard(directory: Path, port: int) -> Dashboard:
    """The live dashboard of the run in ``directory``, served while the command runs."""
    from fedforge.report.dashboard import Dashboard

    board = Dashboard(directory, port=port)
    console.print(f"dashboard: {board.url} (while the run lasts)", soft_wrap=True)
    return board


def missing_trackers(*, tensorboard: bool, mlflow: bool) -> str | None:
    """Why an asked-for experiment tracker cannot run here (checked before training)."""
    import importlib.util

    for wanted, module, extra in (
        (tensorboard, "tensorboard", "tensorboard"),
        (mlflow, "mlflow", "mlflow"),
    ):
        if wanted and importlib.util.find_spec(module) is None:
            return (
                f"--{extra} needs {module}, which is not installed: pip install 'fedforge[{extra}]'"
            )
    return None


def make_trackers(
    cfg: RunConfig, out_dir: Path, tensorboard: bool, mlflow: bool
) -> list[RoundListener]:
    """The experiment-tracker listeners asked for on the command line."""
    import sys

    from fedforge import __version__
    from fedforge.report.live import settings_text
    from fedforge.report.trackers import MLflowExport, TensorBoardExport, flat_config

    raw = cfg.model_dump(mode="json", exclude_none=True)
    raw.pop("deploy", None)
    settings = settings_text(raw)
    trackers: list[RoundListener] = []
    if tensorboard:
        trackers.append(TensorBoardExport(out_dir / "tensorboard", settings))
    if mlflow:
        tags = {
            "fedforge.version": __version__,
            "fedforge.run_dir": str(out_dir),
            "fedforge.command": " ".join(sys.argv),
            "mlflow.note.content": settings,
        }
        trackers.append(MLflowExport(flat_config(raw), tags, run_name=out_dir.name))
    return trackers


@app.command()
def dashboard(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (finished or running).")],
    port: Annotated[int, typer.Option("--port", help="Port (0: any free port).")] = DEFAULT_PORT,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help="Address to listen on (default: this machine only; any other needs a token).",
        ),
    ] = "127.0.0.1",
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help="File holding the token requests must carry (default: the "
            "FEDFORGE_DASHBOARD_TOKEN environment variable); required beyond loopback.",
        ),
    ] = None,
) -> None:
    """Serve a run's live dashboard (accuracy, loss, clients, privacy) until Ctrl-C."""
    import threading

    from fedforge.report.dashboard import Dashboard, read_token

    if not (run_dir / "config.toml").is_file():
        raise _fail(FedforgeError(f"{run_dir} is not a run directory (no config.toml)"), 2)
    try:
        token = read_token(token_file)
        server = Dashboard(run_dir, host=host, port=port, token=token)
    except (OSError, FedforgeError) as exc:
        raise _fail(exc, 2) from None
    how = " (open it with ?token=<the token> once)" if token else ""
    console.print(f"dashboard of {run_dir}: {server.url}{how} (Ctrl-C to stop)", soft_wrap=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


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
        summary = _first_sentence(section.__doc__ or "")
        header = f"[{prefix}{name}]" + (f"  # {summary}" if summary else "")
        lines.extend(["", header])
        _describe_model(section, f"{prefix}{name}.", lines)


def _first_sentence(doc: str) -> str:
    """A docstring's first sentence on one line (the whole first paragraph if it has none)."""
    paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


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


@keys_app.command("request")
def keys_request(
    name: Annotated[str, typer.Argument(help="This site's client name (its identity).")],
    out: Annotated[Path, typer.Option("--out", help="This site's credentials directory.")] = Path(
        "credentials"
    ),
) -> None:
    """At a site: make the site's private key and a certificate signing request.

    The key stays in OUT; send OUT/client.csr to the coordinator (`fedforge keys sign`) and
    put the client.crt and ca.crt it returns into OUT."""
    from fedforge.net.keys import request_certificate

    try:
        csr = request_certificate(name, out)
    except FedforgeError as exc:
        raise _fail(exc) from None
    console.print(
        f"private key in {out / 'client.key'} (keep it here); send {csr} to the coordinator"
    )


@keys_app.command("sign")
def keys_sign(
    request: Annotated[Path, typer.Argument(help="A site's client.csr.")],
    keys: Annotated[Path, typer.Option("--keys", help="Keys directory.")] = Path("keys"),
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Where to write client.crt and ca.crt (default: beside the request)."
        ),
    ] = None,
) -> None:
    """At the coordinator: register a site from its signing request and issue its certificate."""
    from fedforge.net.keys import ca_fingerprint, sign_request

    target = out or request.parent
    try:
        name = sign_request(keys, request, target)
    except FedforgeError as exc:
        raise _fail(exc) from None
    console.print(
        f"client {name!r} registered: send {target / 'client.crt'} and {target / 'ca.crt'} to the "
        f"site; CA fingerprint (confirm it with the site) SHA-256 {ca_fingerprint(keys)}",
        soft_wrap=True,
    )


@keys_app.command("revoke")
def keys_revoke(
    name: Annotated[str, typer.Argument(help="Client to revoke.")],
    keys: Annotated[Path, typer.Option("--keys", help="Keys directory.")] = Path("keys"),
) -> None:
    """Revoke a client's certificate (a running server closes its session within a heartbeat)."""
    from fedforge.net.keys import revoke_client

    try:
        serial = revoke_client(keys, name)
    except FedforgeError as exc:
        raise _fail(exc) from None
    console.print(f"revoked {name!r} (serial {serial})")


@keys_app.command("renew")
def keys_renew(
    name: Annotated[str, typer.Argument(help="Client whose certificate to renew.")],
    keys: Annotated[Path, typer.Option("--keys", help="Keys directory.")] = Path("keys"),
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where to write client.crt and ca.crt (default KEYS/NAME)."),
    ] = None,
) -> None:
    """Issue a client a new certificate for the key it already holds (before or after the
    old one expires); the old certificate is refused from then on."""
    from fedforge.net.keys import renew_client

    target = out or keys / name
    try:
        expires = renew_client(keys, name, target)
    except FedforgeError as exc:
        raise _fail(exc) from None
    console.print(
        f"renewed {name!r} until {expires:%Y-%m-%d}: put {target / 'client.crt'} and "
        f"{target / 'ca.crt'} into the site's credentials directory",
        soft_wrap=True,
    )


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
    allow_remote_insecure: Annotated[
        bool,
        typer.Option(
            "--allow-remote-insecure", help="--insecure only: listen beyond loopback anyway."
        ),
    ] = False,
    new_run: Annotated[
        bool,
        typer.Option(
            "--new-run",
            help="Start a new run even though deploy.state_dir holds state it cannot resume "
            "(deletes that state).",
        ),
    ] = False,
    dashboard: DashboardFlag = False,
    dashboard_port: DashboardPort = DEFAULT_PORT,
) -> None:
    """Serve a federated run over gRPC (mutual TLS); resumes from deploy.state_dir."""
    import os
    import sqlite3

    from fedforge.config import load_config

    # gRPC's own log would write a line for every failed TLS handshake (anyone can cause
    # them); GRPC_VERBOSITY=INFO shows them.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    _setup_logging()
    try:
        cfg = load_config(config, set_)
    except FedforgeError as exc:
        raise _fail(exc, 2) from None
    from fedforge.net.server import run_server

    board = None
    if insecure:
        console.print(
            "[bold red]WARNING: --insecure: traffic is unencrypted and clients are "
            "not authenticated. Never use this beyond localhost.[/]"
        )
    try:
        if new_run:
            from fedforge.runtime.checkpoint import CheckpointStore

            CheckpointStore.discard(Path(cfg.deploy.state_dir))
        if dashboard:
            board = _start_dashboard(Path(cfg.deploy.state_dir), dashboard_port)
        result = run_server(
            cfg,
            insecure=insecure,
            client_names=client,
            allow_remote_insecure=allow_remote_insecure,
        )
    except (FedforgeError, OSError, sqlite3.Error) as exc:  # (a full disk: one line)
        raise _fail(exc) from None
    finally:
        if board is not None:
            board.close()
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
    from fedforge.net.keys import ClientCredentials

    _setup_logging()
    try:  # (credentials first: unusable ones are refused before the heavy imports)
        creds = ClientCredentials.load(credentials) if credentials else None
        from fedforge.net.client import FederatedClient, builtin_partition, npz_loader

        loader = npz_loader(str(data)) if data else builtin_partition
        client = FederatedClient(server_address, creds, loader, name=name, state_dir=state_dir)
        rounds = client.run()
    except FedforgeError as exc:
        raise _fail(exc) from None
    console.print(f"done: trained in {rounds} rounds")


if __name__ == "__main__":
    app()
