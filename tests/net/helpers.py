"""Real server and client processes on 127.0.0.1 for the deployment tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedforge.net.keys import add_client, init_keys

BASE_CONFIG = """
seed = 3
[data]
dataset = "digits"
[partition]
scheme = "dirichlet"
num_clients = {num_clients}
alpha = 1.0
[model]
name = "mlp"
hidden = [32]
[client]
epochs = {epochs}
batch_size = 16
lr = 0.1
[server]
rounds = {rounds}
clients_per_round = {per_round}
{server_extra}
[deploy]
address = "127.0.0.1:{port}"
keys = "{keys}"
state_dir = "{state}"
min_clients = {min_clients}
round_timeout_s = {timeout}
heartbeat_s = 1.0
min_completed = {min_completed}
max_retries = {max_retries}
linger_s = {linger}
{extra}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_keys(root: Path, names: list[str]) -> Path:
    keys = root / "keys"
    init_keys(keys, ["localhost", "127.0.0.1"])
    for name in names:
        add_client(keys, name, keys / name)
    return keys


def write_config(
    root: Path,
    keys: Path,
    port: int,
    state: str = "state",
    *,
    rounds: int = 3,
    clients: int = 3,
    per_round: int | None = None,
    min_clients: int | None = None,
    epochs: int = 1,
    timeout: float = 30,
    min_completed: int = 1,
    max_retries: int = 3,
    linger: float = 0,
    server_extra: str = "",
    extra: str = "",
) -> Path:
    """A run configuration; ``server_extra`` adds keys to ``[server]`` and ``extra`` appends
    TOML sections (e.g. ``[algorithm]``)."""
    path = root / f"{state}.toml"
    path.write_text(
        BASE_CONFIG.format(
            num_clients=clients,
            epochs=epochs,
            rounds=rounds,
            per_round=per_round or clients,
            port=port,
            keys=keys,
            state=root / state,
            min_clients=min_clients or clients,
            timeout=timeout,
            min_completed=min_completed,
            max_retries=max_retries,
            linger=linger,
            server_extra=server_extra,
            extra=extra,
        )
    )
    return path


def fedforge(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A ``fedforge`` process run in the log's directory, so a client's default state
    directory (``client-state/<name>``) lands in the test's temporary directory."""
    out = open(log, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
    return subprocess.Popen(
        [sys.executable, "-m", "fedforge.cli", *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=log.parent,
    )


def start_server(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return fedforge(["server", str(config)], log)


def start_client(port: int, credentials: Path, log: Path) -> subprocess.Popen[bytes]:
    return fedforge(
        ["client", "--server", f"127.0.0.1:{port}", "--credentials", str(credentials)], log
    )


def client_state_dir(root: Path, name: str) -> Path:
    """Where a client started by :func:`start_client` in ``root`` keeps its state."""
    return root / "client-state" / name


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def wait_for_port(port: int, timeout: float = 60) -> None:
    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(listening, timeout, f"a server on port {port}")
