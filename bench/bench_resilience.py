"""Deployment resilience over loopback with real processes and mutual TLS.

    python -m bench.bench_resilience [--parts memory,restart,partition] [--baseline-src DIR]

memory:    server peak RSS with 10 honest clients (asyncio, one process) and one more that
           answers with a 512 MiB payload announcement and streams it, against the same run
           without the attacker (target: below 2x).
restart:   a client SIGKILLed (or frozen with SIGSTOP) mid-run and started again: seconds
           from the restart to the end of the first round that accepted its result.
partition: a client behind a relay that stops forwarding (a silent partition): seconds until
           the server closes its session, in heartbeat intervals (target: under 3).

``--baseline-src`` (a ``src`` directory of an earlier fedforge, e.g. from ``git archive``)
runs the same parts against that code, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.bench_deploy import _heartbeats, _light_client, write_config
from fedforge.runtime.checkpoint import CheckpointStore
from tests.net.helpers import FreezableProxy

ROOT = Path(__file__).resolve().parents[1]


def env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{src}:{ROOT}", "COLUMNS": "400"}


def setup(
    tmp: Path,
    names: list[str],
    *,
    rounds: int,
    model: str = "mlp",
    hidden: int = 32,
    timeout: float = 60,
    heartbeat: float = 1.0,
    src: Path = ROOT / "src",
) -> tuple[Path, int]:
    # An earlier fedforge (the baseline) knows no linger_s and exits at once anyway.
    linger = "linger_s = 0" if src == ROOT / "src" else ""
    return write_config(
        tmp,
        names,
        rounds=rounds,
        model=model,
        hidden=[hidden],
        partitions=max(len(names), 2),
        timeout=timeout,
        deploy_extra=f"min_completed = 1\nheartbeat_s = {heartbeat}\n{linger}",
    )


def fedforge(args: list[str], log: Path, src: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedforge.cli", *args],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env=env(src),
        cwd=log.parent,
    )


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"no server on {port}")


def wait_log(path: Path, pattern: str, timeout: float) -> re.Match[str] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (m := re.search(pattern, path.read_text(errors="replace"))):
            return m
        time.sleep(0.05)
    return None


def stamp(line_start: str) -> float:
    """Unix time of a log line's ``%(asctime)s`` (local time, milliseconds)."""
    return dt.datetime.strptime(line_start, "%Y-%m-%d %H:%M:%S,%f").timestamp()


class PeakRss:
    """Samples a process's resident memory every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                with open(f"/proc/{self.pid}/statm") as f:
                    rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                self.peak = max(self.peak, rss)
            except OSError:
                return

    def stop(self) -> int:
        self._stop.set()
        return self.peak


async def _oversized_client(port: int, creds: Path, total: int) -> None:
    """Answers its task with a transfer announcing ``total`` bytes, and streams them."""
    import grpc

    from fedforge.net.proto import fedforge_pb2 as pb
    from fedforge.net.proto import fedforge_pb2_grpc as pb_grpc
    from fedforge.net.service import PROTOCOL_VERSION

    tls = grpc.ssl_channel_credentials(
        (creds / "ca.crt").read_bytes(),
        (creds / "client.key").read_bytes(),
        (creds / "client.crt").read_bytes(),
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", tls) as channel:
        out: asyncio.Queue[pb.ClientMessage | None] = asyncio.Queue(maxsize=8)
        hello = pb.Hello(protocol_version=PROTOCOL_VERSION, num_examples=1)
        await out.put(pb.ClientMessage(hello=hello))

        async def requests():  # type: ignore[no-untyped-def]
            while (m := await out.get()) is not None:
                yield m

        call = pb_grpc.FederationStub(channel).Connect(requests())
        run_id, answered = "", set[bytes]()
        beat: asyncio.Task[None] | None = None
        piece = os.urandom(1 << 20)
        try:
            async for message in call:
                kind = message.WhichOneof("body")
                if kind == "welcome":
                    run_id = message.envelope.run_id
                    await out.put(pb.ClientMessage(hello=hello))
                    beat = asyncio.create_task(_heartbeats(out, message.welcome.heartbeat_ms))
                elif kind == "task" and message.task.task_id not in answered:
                    answered.add(message.task.task_id)  # every task: the same attack
                    tid, count = os.urandom(16), total >> 20
                    for index in range(count):
                        chunk = pb.Chunk(
                            transfer_id=tid,
                            index=index,
                            count=count,
                            total_bytes=total,
                            sha256=bytes(32),
                            data=piece,
                        )
                        env_ = pb.Envelope(
                            run_id=run_id, round=message.envelope.round, nonce=os.urandom(16)
                        )
                        reply = pb.ReplyChunk(
                            stage=message.task.stage,
                            task_id=message.task.task_id,
                            num_examples=1,
                            chunk=chunk,
                        )
                        await out.put(pb.ClientMessage(envelope=env_, reply=reply))
                        await asyncio.sleep(0)
                elif kind == "run_complete":
                    break
        except grpc.RpcError:
            pass  # disconnected by the server
        if beat is not None:
            beat.cancel()
        await out.put(None)


def _attack(port: int, creds: Path, total: int) -> None:
    asyncio.run(_oversized_client(port, creds, total))


def memory_run(src: Path, attack: bool, hidden: int, rounds: int = 3) -> tuple[int, int, float]:
    """(server peak RSS, honest results accepted, seconds)."""
    names = [f"c{i:02d}" for i in range(10)] + (["z-attacker"] if attack else [])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # One process runs the 10 honest clients, one task at a time: a 5 s heartbeat keeps
        # its event loop's busy seconds from looking like silence.
        cfg, port = setup(
            tmp, names, rounds=rounds, hidden=hidden, timeout=120, heartbeat=5.0, src=src
        )
        server = fedforge(["server", str(cfg)], tmp / "server.log", src)
        rss = PeakRss(server.pid)
        wait_port(port)
        start = time.perf_counter()
        done: list[int] = []

        async def main() -> None:
            await asyncio.gather(*(_light_client(port, tmp / "keys" / n, done) for n in names[:10]))

        attacker = None
        if attack:  # its own process, so it cannot starve the honest clients' event loop
            attacker = multiprocessing.Process(
                target=_attack, args=(port, tmp / "keys" / "z-attacker", 512 << 20)
            )
            attacker.start()

        try:
            asyncio.run(main())
            code = server.wait(timeout=300)
        finally:
            server.kill()
            server.wait()
        elapsed = time.perf_counter() - start
        if attacker is not None:
            attacker.join(timeout=60)
        if os.environ.get("BENCH_LOG"):
            print((tmp / "server.log").read_text())
        peak = rss.stop()
        assert code == 0, (tmp / "server.log").read_text()[-2000:]
        store = CheckpointStore(tmp / "state")
        checkpoint = store.load()
        store.close()
        assert checkpoint is not None
        accepted = sum(r.clients_completed for r in checkpoint.history)
        return peak, accepted, elapsed


def memory(src: Path, label: str, hidden: int = 50_000) -> None:
    if os.environ.get("BENCH_ATTACK_ONLY"):
        print(memory_run(src, True, hidden))
        return
    base, base_ok, base_s = memory_run(src, False, hidden)
    hit, hit_ok, hit_s = memory_run(src, True, hidden)
    model_mb = (64 * hidden + hidden + hidden * 10 + 10) * 4 / 2**20
    print(
        f"memory [{label}]: {model_mb:.1f} MiB model, 10 honest clients, 3 rounds: server peak "
        f"{base / 2**20:.0f} MiB ({base_ok} results, {base_s:.1f} s); with a client streaming a "
        f"512 MiB answer: {hit / 2**20:.0f} MiB ({hit_ok} honest results, {hit_s:.1f} s); "
        f"ratio {hit / base:.2f}"
    )


def restart(src: Path, label: str, sig: signal.Signals) -> None:
    names = ["c0", "c1", "c2"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg, port = setup(tmp, names, rounds=40, hidden=32, heartbeat=1.0, src=src)
        server = fedforge(["server", str(cfg)], tmp / "server.log", src)
        wait_port(port)
        clients = [
            fedforge(
                ["client", "--server", f"127.0.0.1:{port}", "--credentials", str(tmp / "keys" / n)],
                tmp / f"{n}.log",
                src,
            )
            for n in names
        ]
        again = None
        try:
            assert wait_log(tmp / "c0.log", r"round 3: fit done", 120), "no round 3"
            os.kill(clients[2].pid, sig)
            restarted = time.time()
            again = fedforge(
                [
                    "client",
                    "--server",
                    f"127.0.0.1:{port}",
                    "--credentials",
                    str(tmp / "keys" / "c2"),
                ],
                tmp / "c2-again.log",
                src,
            )
            done = wait_log(tmp / "c2-again.log", r"round (\d+): fit done", 60)
            if done is None or again.poll() is not None:
                print(
                    f"restart [{label}] after {sig.name}: the restarted client never trained "
                    f"(exit {again.poll()}): {(tmp / 'c2-again.log').read_text()[-300:]!r}"
                )
                return
            round_number = int(done.group(1))
            seconds = stamp(_line_time(tmp / "c2-again.log", done)) - restarted
            wait_log(tmp / "c0.log", rf"round {round_number + 1}: fit done", 60)
            server.kill()
            server.wait()
            accepted = {r.round: r.clients_completed for r in _history(tmp)}
            print(
                f"restart [{label}] after {sig.name}: {seconds:.2f} s from the restart to its "
                f"result of round {round_number} (accepted results that round: "
                f"{accepted.get(round_number)} of 3)"
            )
        finally:
            if sig == signal.SIGSTOP:
                os.kill(clients[2].pid, signal.SIGCONT)
            for p in [server, *clients, *([again] if again else [])]:
                p.kill()
                p.wait()


def _line_time(path: Path, match: re.Match[str]) -> str:
    """The ``%(asctime)s`` of the log line holding ``match``."""
    text = path.read_text(errors="replace")
    start = text.rfind("\n", 0, match.start()) + 1
    return text[start : start + 23]


def _history(tmp: Path) -> list:  # type: ignore[type-arg]
    store = CheckpointStore(tmp / "state")
    try:
        checkpoint = store.load()
    finally:
        store.close()
    return [] if checkpoint is None else list(checkpoint.history)


def partition(src: Path, label: str, heartbeat: float = 1.0, trials: int = 3) -> None:
    names = ["c0", "c1", "c2"]
    results = []
    for _ in range(trials):
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            cfg, port = setup(
                tmp, names, rounds=400, hidden=32, heartbeat=heartbeat, timeout=120, src=src
            )
            server = fedforge(["server", str(cfg)], tmp / "server.log", src)
            wait_port(port)
            proxy = FreezableProxy(port)
            clients = [
                fedforge(
                    [
                        "client",
                        "--server",
                        f"127.0.0.1:{p}",
                        "--credentials",
                        str(tmp / "keys" / n),
                    ],
                    tmp / f"{n}.log",
                    src,
                )
                for n, p in zip(names, [port, port, proxy.port], strict=True)
            ]
            try:
                assert wait_log(tmp / "c0.log", r"round 3: fit done", 120), "no round 3"
                proxy.freeze()
                frozen = time.time()
                found = wait_log(
                    tmp / "server.log",
                    r"(\S+ \S+) WARNING (client c2 sent nothing|round \d+: failure of c2)",
                    60,
                )
                results.append(None if found is None else stamp(found.group(1)) - frozen)
            finally:
                proxy.close()
                for p in [server, *clients]:
                    p.kill()
                    p.wait()
    shown = ", ".join(
        "not within 60 s" if r is None else f"{r:.2f} s ({r / heartbeat:.1f} hb)" for r in results
    )
    print(f"partition [{label}]: heartbeat {heartbeat:g} s; detected after {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", default="memory,restart,partition")
    parser.add_argument("--baseline-src", type=Path, default=None)
    parser.add_argument("--baseline-only", action="store_true")
    args = parser.parse_args()
    parts = args.parts.split(",")
    variants = [] if args.baseline_only else [(ROOT / "src", "this code")]
    if args.baseline_src:
        variants.append((args.baseline_src.resolve(), "baseline"))
    for src, label in variants:
        if "memory" in parts:
            memory(src, label)
        if "restart" in parts:
            restart(src, label, signal.SIGKILL)
            restart(src, label, signal.SIGSTOP)
        if "partition" in parts:
            partition(src, label)


if __name__ == "__main__":
    main()
