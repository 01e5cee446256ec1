"""Deployment benchmarks over loopback with real processes and mutual TLS.

    python -m bench.bench_deploy [--parts overhead,throughput,load] [--model-mb 500]

overhead:   10 client processes, a small model: server round wall time minus the slowest
            client's training time (both measured in the run), in milliseconds.
throughput: a ~500 MB model broadcast to 4 client processes over TLS, against the raw
            loopback TCP copy rate measured in the same run.
load:       200 lightweight concurrent clients (asyncio, one process, numpy updates) for 10
            rounds: errors, server peak memory and CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.proc_tree import run_measured
from fedforge.net.keys import add_client, init_keys
from fedforge.runtime.checkpoint import CheckpointStore

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400"}

CONFIG = """
seed = 0
[data]
dataset = "digits"
[partition]
scheme = "iid"
num_clients = {partitions}
[model]
name = "{model}"
hidden = {hidden}
[client]
epochs = {epochs}
batch_size = 16
lr = 0.05
[server]
rounds = {rounds}
clients_per_round = {clients}
[deploy]
address = "127.0.0.1:{port}"
keys = "{keys}"
state_dir = "{state}"
min_clients = {clients}
round_timeout_s = {timeout}
{deploy_extra}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    tmp: Path,
    names: list[str],
    *,
    rounds: int,
    model: str,
    hidden: list[int],
    partitions: int,
    timeout: float = 600,
    deploy_extra: str = "linger_s = 0",
    epochs: int = 1,
) -> tuple[Path, int]:
    """A keys directory for ``names`` and a server configuration on a free port."""
    keys = tmp / "keys"
    init_keys(keys, ["localhost", "127.0.0.1"])
    for n in names:
        add_client(keys, n, keys / n)
    port = free_port()
    cfg = tmp / "server.toml"
    cfg.write_text(
        CONFIG.format(
            partitions=partitions,
            model=model,
            hidden=hidden,
            rounds=rounds,
            clients=len(names),
            port=port,
            keys=keys,
            state=tmp / "state",
            timeout=timeout,
            deploy_extra=deploy_extra,
            epochs=epochs,
        )
    )
    return cfg, port


def setup(
    tmp: Path,
    clients: int,
    rounds: int,
    *,
    model: str = "logistic",
    hidden: list[int] | None = None,
    partitions: int | None = None,
) -> tuple[Path, int, list[str]]:
    names = [f"c{i:03d}" for i in range(clients)]
    cfg, port = write_config(
        tmp,
        names,
        rounds=rounds,
        model=model,
        hidden=hidden or [1],
        partitions=partitions or clients,
    )
    return cfg, port, names


def start_clients(tmp: Path, port: int, names: list[str]) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedforge.cli",
                "client",
                "--server",
                f"127.0.0.1:{port}",
                "--credentials",
                str(tmp / "keys" / n),
            ],
            stdout=open(tmp / f"{n}.log", "wb"),
            stderr=subprocess.STDOUT,
            env=ENV,
        )
        for n in names
    ]


def history(tmp: Path):  # type: ignore[no-untyped-def]
    store = CheckpointStore(tmp / "state")
    checkpoint = store.load()
    store.close()
    assert checkpoint is not None
    return checkpoint.history


def client_lines(tmp: Path, names: list[str], pattern: str) -> list[list[tuple[str, ...]]]:
    return [re.findall(pattern, (tmp / f"{n}.log").read_text()) for n in names]


def overhead() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg, port, names = setup(tmp, clients=10, rounds=20)
        clients = start_clients(tmp, port, names)
        done = run_measured([sys.executable, "-m", "fedforge.cli", "server", str(cfg)], 600, ENV)
        for c in clients:
            c.wait(timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        rounds = [r for r in history(tmp) if r.round > 0]  # round 0: the initial evaluation
        trained = client_lines(tmp, names, r"round (\d+): fit done in ([\d.]+) s")
        slowest = {
            r.round: max(float(t) for lines in trained for (rn, t) in lines if int(rn) == r.round)
            for r in rounds
        }
        # Round 1 includes the clients' first-use imports; report the steady rounds.
        steady = [r for r in rounds if r.round > 1]
        over = [1000 * (r.wall_seconds - slowest[r.round]) for r in steady]
        print(
            f"overhead: 10 client processes, logistic regression on digits, {len(steady)} "
            f"steady rounds: round wall median {1000 * statistics.median(r.wall_seconds for r in steady):.1f} ms, "
            f"slowest client training median {1000 * statistics.median(slowest[r.round] for r in steady):.1f} ms, "
            f"overhead median {statistics.median(over):.1f} ms (max {max(over):.1f} ms; "
            f"includes central evaluation)"
        )


def raw_loopback_rate(total: int) -> float:
    """Bytes per second through a plain loopback TCP socket (one sender, one receiver)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    block = os.urandom(1 << 20)

    def send() -> None:
        with socket.create_connection(server.getsockname()) as s:
            for _ in range(total // len(block)):
                s.sendall(block)

    sender = threading.Thread(target=send)
    start = time.perf_counter()
    sender.start()
    conn, _ = server.accept()
    got = 0
    while chunk := conn.recv(1 << 20):
        got += len(chunk)
    elapsed = time.perf_counter() - start
    sender.join()
    conn.close()
    server.close()
    return got / elapsed


def throughput(model_mb: int, num_clients: int = 4) -> None:
    hidden = int(model_mb * 1e6 / 4 / 75)  # digits: 64 -> hidden -> 10 parameters ~ 75 per unit
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg, port, names = setup(
            tmp, clients=num_clients, rounds=1, model="mlp", hidden=[hidden], partitions=200
        )
        clients = start_clients(tmp, port, names)
        done = run_measured([sys.executable, "-m", "fedforge.cli", "server", str(cfg)], 900, ENV)
        for c in clients:
            c.wait(timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        got = client_lines(
            tmp,
            names,
            r"received a fit task \(([\d.]+) MB\) in ([\d.]+) s \(([\d.]+)-([\d.]+)\)",
        )
        sizes = [float(lines[0][0]) for lines in got]
        starts = [float(lines[0][2]) for lines in got]
        ends = [float(lines[0][3]) for lines in got]
        total_mb = sum(sizes)
        window = max(ends) - min(starts)
        raw = raw_loopback_rate(1 << 30) / 1e6
        print(
            f"throughput: {sizes[0]:.0f} MB model to {num_clients} clients over TLS: {total_mb:.0f} MB in "
            f"{window:.2f} s = {total_mb / window:.0f} MB/s aggregate; raw loopback TCP "
            f"{raw:.0f} MB/s (ratio {total_mb / window / raw:.2f}); server peak "
            f"{done.peak_rss_bytes / 2**20:.0f} MiB; round {history(tmp)[0].wall_seconds:.1f} s "
            f"incl. training and {num_clients} updates back"
        )


async def _light_client(port: int, creds: Path, rounds_done: list[int]) -> None:
    import grpc

    from fedforge.net.codec import Reassembler, decode_params, encode_params, split_payload
    from fedforge.net.proto import fedforge_pb2 as pb
    from fedforge.net.proto import fedforge_pb2_grpc as pb_grpc
    from fedforge.net.service import PROTOCOL_VERSION

    tls = grpc.ssl_channel_credentials(
        (creds / "ca.crt").read_bytes(),
        (creds / "client.key").read_bytes(),
        (creds / "client.crt").read_bytes(),
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", tls) as channel:
        out: asyncio.Queue[pb.ClientMessage | None] = asyncio.Queue()
        hello = pb.Hello(protocol_version=PROTOCOL_VERSION, num_examples=1)
        await out.put(pb.ClientMessage(hello=hello))

        async def requests():  # type: ignore[no-untyped-def]
            while (m := await out.get()) is not None:
                yield m

        call = pb_grpc.FederationStub(channel).Connect(requests())
        run_id, assembler = "", Reassembler(1 << 30)
        beats: list[asyncio.Task[None]] = []
        rng = np.random.default_rng()
        async for message in call:
            kind = message.WhichOneof("body")
            if kind == "welcome":
                run_id = message.envelope.run_id
                await out.put(pb.ClientMessage(hello=hello))  # sizes declared: may be sampled
                beats.append(asyncio.create_task(_heartbeats(out, message.welcome.heartbeat_ms)))
            elif kind == "task":
                if message.task.chunk.index == 0:
                    assembler = Reassembler(1 << 30)
                payload = assembler.add(message.task.chunk)
                if payload is None:
                    continue
                params = decode_params(payload)
                update = {
                    k: (0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
                    for k, v in params.items()
                }
                for chunk in split_payload(encode_params(update)):
                    env = pb.Envelope(
                        run_id=run_id, round=message.envelope.round, nonce=os.urandom(16)
                    )
                    await out.put(
                        pb.ClientMessage(
                            envelope=env,
                            reply=pb.ReplyChunk(
                                stage=message.task.stage,
                                task_id=message.task.task_id,
                                num_examples=1,
                                metrics={"train_loss": 0.1},
                                chunk=chunk,
                            ),
                        )
                    )
                rounds_done.append(1)
            elif kind == "run_complete":
                break
        for beat in beats:
            beat.cancel()
        await out.put(None)


async def _heartbeats(out: asyncio.Queue[Any], every_ms: int) -> None:
    """A client's heartbeats: the server closes the session of a client silent for a few."""
    from fedforge.net.proto import fedforge_pb2 as pb

    while True:
        await asyncio.sleep(every_ms / 1000)
        await out.put(pb.ClientMessage(heartbeat=pb.Heartbeat()))


def load(num_clients: int = 200, rounds: int = 10) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg, port, names = setup(tmp, clients=num_clients, rounds=rounds, partitions=num_clients)
        server = subprocess.Popen(
            [sys.executable, "-m", "fedforge.cli", "server", str(cfg)],
            stdout=open(tmp / "server.log", "wb"),
            stderr=subprocess.STDOUT,
            env=ENV,
        )
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    with open(f"/proc/{server.pid}/statm") as f:
                        peak[0] = max(
                            peak[0], int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                        )
                except OSError:
                    pass
                time.sleep(0.1)

        threading.Thread(target=sample, daemon=True).start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        rounds_done: list[int] = []
        start = time.perf_counter()

        async def main() -> None:
            await asyncio.gather(
                *(_light_client(port, tmp / "keys" / n, rounds_done) for n in names)
            )

        asyncio.run(main())
        elapsed = time.perf_counter() - start
        with open(f"/proc/{server.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        code = server.wait(timeout=60)
        stop.set()
        rows = [r for r in history(tmp) if r.round > 0]  # round 0: the initial evaluation
        errors = sum(r.clients_failed + r.clients_rejected for r in rows)
        complete = all(r.clients_completed == num_clients for r in rows)
        print(
            f"load: {num_clients} concurrent asyncio clients x {len(rows)} rounds in {elapsed:.1f} s "
            f"({elapsed / len(rows):.2f} s/round): server exit {code}, every client accepted "
            f"every round: {complete}, failed+rejected {errors}, client rounds "
            f"{len(rounds_done)}; server peak RSS {peak[0] / 2**20:.0f} MiB, server CPU "
            f"{cpu:.1f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", default="overhead,throughput,load")
    parser.add_argument("--model-mb", type=int, default=500)
    parser.add_argument("--clients", type=int, default=4, help="throughput: client processes")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "overhead" in parts:
        overhead()
    if "throughput" in parts:
        throughput(args.model_mb, args.clients)
    if "load" in parts:
        load()


if __name__ == "__main__":
    main()
