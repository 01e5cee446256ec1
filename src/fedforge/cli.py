"""The ``fedforge`` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

from fedforge.core.errors import FedforgeError

if TYPE_CHECKING:
    from fedforge.config import RunConfig
    from fedforge.data.federated import FederatedDataset
    from fedforge.report.dashboard import Dashboard
    from fedforge.report.history import History
    from fedforge.report.runlock import RunLock
    from fedforge.runtime.simulation import SimulationResult

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
            help="Log the configuration, provenance and every round to MLflow (at "
            "MLFLOW_TRACKING_URI, else in RUN_DIR/mlflow.db).",
        ),
    ] = False,
) -> None:
    """Run a federated training simulation and write a run directory.

    Every configuration key, with its default and allowed values: `fedforge config`.
    """
    from fedforge.config import load_config
    from fedforge.experiment import check_simulation, prepare_data
    from fedforge.report.trackers import missing_trackers

    if resume is not None and (config is not None or out is not None):
        raise _fail(ValueError("--resume takes the run directory's own config.toml"), 2)
    if resume is not None and overwrite:
        raise _fail(ValueError("--overwrite cannot be combined with --resume"), 2)
    try:
        if resume is not None:
            if not (resume / "config.toml").is_file():
                raise FedforgeError(f"{resume} is not a run directory (no config.toml)")
            cfg = load_config(resume / "config.toml", set_)
        else:
            cfg = load_config(config, set_)
        check_simulation(cfg)
        missing = missing_trackers(tensorboard=tensorboard, mlflow=mlflow)
        if missing:
            raise FedforgeError(missing)
        data = prepare_data(cfg)
    except FedforgeError as exc:
        raise _fail(exc, 2) from None
    except KeyboardInterrupt:
        console.print("interrupted before training started")
        raise typer.Exit(130) from None
    out_dir, lock = _claim_run_dir(cfg, out, resume, overwrite)
    with lock:
        _setup_logging()
        result = _train(
            cfg,
            data,
            out_dir,
            lock,
            resume is not None,
            quiet,
            dashboard,
            dashboard_port,
            tensorboard,
            mlflow,
        )
    from fedforge.report.fairness import fairness_text

    _print_end("done", result.history, result.stop_reason, f"; run directory: {out_dir}")
    fairness = fairness_text(result.history[-1].metrics)
    if fairness:
        console.print(fairness, soft_wrap=True)


def _print_end(head: str, history: History, stop_reason: str | None, tail: str = "") -> None:
    """The line that ends a run: rounds, accuracy, loss and epsilon (and why it stopped
    early, when it did)."""
    from fedforge.report.history import accuracy_text, privacy_text

    last = history[-1]
    if stop_reason:
        console.print(f"[bold yellow]stopped early[/]: {stop_reason}", soft_wrap=True)
    dp = privacy_text(last)
    console.print(
        f"{head}: {last.round} rounds, {accuracy_text(last)}{', ' + dp if dp else ''}{tail}",
        soft_wrap=True,
    )


def _claim_run_dir(
    cfg: RunConfig, out: Path | None, resume: Path | None, overwrite: bool
) -> tuple[Path, RunLock]:
    """:func:`fedforge.report.rundir.claim_run_dir`, its refusals as one line (exit 2), a
    complete run's message as the command's end (exit 0)."""
    from fedforge.report.rundir import RunComplete, claim_run_dir

    try:
        return claim_run_dir(out, resume, overwrite=overwrite, rounds=cfg.server.rounds)
    except RunComplete as done:
        console.print(str(done), soft_wrap=True)
        raise typer.Exit(0) from None
    except (FedforgeError, OSError) as exc:
        raise _fail(exc, 2) from None


def _train(
    cfg: RunConfig,
    data: FederatedDataset,
    out_dir: Path,
    lock: RunLock,
    resume: bool,
    quiet: bool,
    dashboard: bool,
    dashboard_port: int,
    tensorboard: bool,
    mlflow: bool,
) -> SimulationResult:
    """Run the simulation with the progress display, dashboard and trackers asked for; a
    run that cannot go on ends the command with one line (and how to continue it)."""
    from fedforge.experiment import run_experiment
    from fedforge.report.listeners import ListenerGroup
    from fedforge.report.progress import LineProgress, ProgressListener
    from fedforge.report.runlock import RunDirGone
    from fedforge.report.stops import environment_text, interrupted_text
    from fedforge.report.trackers import run_trackers

    server = None
    listeners = ListenerGroup([])
    try:
        listeners.listeners.extend(run_trackers(cfg, out_dir, tensorboard, mlflow))
        if dashboard:
            server = _start_dashboard(out_dir, dashboard_port)
        if quiet or not console.is_terminal:
            if not quiet:  # off a terminal (nohup, SLURM, CI): plain lines in the log
                listeners.listeners.append(LineProgress(cfg.server.rounds))
            return run_experiment(cfg, out_dir, listeners, resume=resume, data=data)
        progress = ProgressListener.make_progress(console)
        with progress:
            listeners.listeners.append(ProgressListener(progress, cfg.server.rounds))
            return run_experiment(cfg, out_dir, listeners, resume=resume, data=data)
    except KeyboardInterrupt:
        console.print(interrupted_text(out_dir), soft_wrap=True)
        raise typer.Exit(130) from None
    except FedforgeError as exc:
        raise _fail(exc) from None
    except Exception as exc:
        try:
            lock.check()
        except RunDirGone as gone:  # a FileNotFoundError, say, because the directory went
            raise _fail(gone) from None
        text = environment_text(exc, out_dir)
        if text is None:
            raise
        raise _fail(FedforgeError(text)) from None
    finally:
        listeners.close()
        if server is not None:
            server.close()


def _start_dashboard(directory: Path, port: int) -> Dashboard:
    """The live dashboard of the run in ``directory``, served while the command runs."""
    from fedforge.report.dashboard import Dashboard

    board = Dashboard(directory, port=port)
    console.print(f"dashboard: {board.url} (while the run lasts)", soft_wrap=True)
    return board


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
    """Print every configuration key, at its default, as a TOML file `fedforge run` accepts.

    Each key's type, allowed values and meaning are in its comment; keys unset by default
    are commented out. Save the output, edit it, and run it: ``fedforge config > my.toml``,
    ``fedforge run my.toml``; or override keys with ``--set section.key=value``.
    """
    from fedforge.config.describe import describe_config

    typer.echo(describe_config(), nl=False)


@app.command("new")
def new_command(
    name: Annotated[
        Path | None, typer.Argument(help="The project directory to create (its name).")
    ] = None,
    template: Annotated[
        str, typer.Option("--template", help="The project's template (--list shows them).")
    ] = "tabular",
    list_: Annotated[bool, typer.Option("--list", help="List the templates.")] = False,
) -> None:
    """Create a runnable project: configuration, models.py, data.py, sample data, a README
    and a test, ready for `fedforge run fedforge.toml` and a deployment."""
    from fedforge.templates import create, templates

    if list_ or name is None:
        for key, description in templates().items():
            typer.echo(f"{key:10} {description}")
        if name is None and not list_:
            raise _fail(ValueError("give the project's name: fedforge new NAME"), 2)
        return
    try:
        written = create(template, name)
    except FedforgeError as exc:
        raise _fail(exc, 2) from None
    console.print(
        f"created {name} from the {template!r} template ({len(written)} files); next: "
        f"cd {name} && fedforge run fedforge.toml (and python -m pytest -q)",
        soft_wrap=True,
    )


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
    import shlex
    import sqlite3
    import sys

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
        if dashboard:
            board = _start_dashboard(Path(cfg.deploy.state_dir), dashboard_port)
        result = run_server(
            cfg,
            insecure=insecure,
            client_names=client,
            allow_remote_insecure=allow_remote_insecure,
            new_run=new_run,
        )
    except OSError as exc:  # a full disk: one line, and the command that continues
        from fedforge.report.stops import environment_text

        again = [a for a in sys.argv[1:] if a != "--new-run"]
        command = shlex.join(["fedforge", *again])
        text = environment_text(exc, Path(cfg.deploy.state_dir), command)
        raise _fail(FedforgeError(text or str(exc))) from None
    except (FedforgeError, sqlite3.Error) as exc:
        raise _fail(exc) from None
    finally:
        if board is not None:
            board.close()
    _print_end(f"run {result.run_id} complete", result.history, result.stop_reason)


@app.command("client")
def client_command(
    server_address: Annotated[str, typer.Option("--server", help="Server HOST:PORT.")],
    config: Annotated[
        Path | None,
        typer.Argument(
            help="This site's own configuration (its model.factory, data.loader, client.train "
            "or workload, and how to read its data); without it, the run's built-in model."
        ),
    ] = None,
    credentials: Annotated[
        Path | None, typer.Option("--credentials", help="Credentials directory (add-client).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="This site's data: a CSV, Parquet or .npz file, or an image folder (one "
            "subfolder per class); default: its share of the run's built-in dataset.",
        ),
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
    """Join a federated run: train on pushed work until the run completes.

    With CONFIG, the site's model and data come from its own configuration and are read and
    checked before it connects; the run's settings (algorithm, rounds, privacy) from the
    server."""
    from fedforge.net.keys import ClientCredentials

    _setup_logging()
    try:  # (credentials first: unusable ones are refused before the heavy imports)
        creds = ClientCredentials.load(credentials) if credentials else None
        from fedforge.config import load_config
        from fedforge.net.client import FederatedClient
        from fedforge.net.site import LocalSite, prepare

        site = prepare(load_config(config), data) if config is not None else LocalSite(None, data)
        client = FederatedClient(server_address, creds, site, name=name, state_dir=state_dir)
        rounds = client.run()
    except FedforgeError as exc:
        raise _fail(exc) from None
    console.print(f"done: trained in {rounds} rounds")


if __name__ == "__main__":
    app()
