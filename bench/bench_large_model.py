"""A large float32 model over the network: memory and transfer speed of a real deployment.

    python -m bench.bench_large_model --model-mb 200 --clients 2 --rounds 2

A stack of square linear layers (an MLP on digits, ``--layers`` hidden layers sized for
``--model-mb``), real ``fedforge server`` and ``fedforge client`` processes on loopback with
mutual TLS, each in its own session. Reported: the server's and every client's peak RSS
(VmHWM) as a multiple of the model's size; seconds per round split into download (the
client's first task chunk to its last), training (the client's fit), upload (the server's
first reply chunk to its last); and the transfer rate against raw gRPC streaming of the same
number of bytes in the same run (``bench/raw_grpc.py``, TLS, same chunk size).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import raw_grpc
from bench.bench_deploy import write_config

ROOT = Path(__file__).resolve().parents[1]
# This checkout's fedforge (src/) in every process, whatever is installed.
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "COLUMNS": "400"}


def hidden_for(model_mb: float, layers: int) -> list[int]:
    """Widths of ``layers`` square hidden layers holding about ``model_mb`` MB of float32."""
    width = int(math.sqrt(model_mb * 1e6 / 4 / max(layers - 1, 1)))
    return [width] * layers


def peak_rss(pid: int) -> int:
    """VmHWM of ``pid`` in bytes (0 once it exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=ENV, start_new_session=True
    )


def watch(procs: dict[str, subprocess.Popen[bytes]], timeout_s: float) -> dict[str, int]:
    """Wait for every process; their peak RSS (sampled until each exits)."""
    peaks = dict.fromkeys(procs, 0)
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs.values()):
        if time.monotonic() > deadline or procs["server"].poll() not in (None, 0):
            for p in procs.values():
                p.kill()
            raise SystemExit("timed out, or the server failed")
        for name, p in procs.items():
            peaks[name] = max(peaks[name], peak_rss(p.pid))
        time.sleep(0.05)
    return peaks


def times(log: Path, pattern: str) -> list[tuple[str, ...]]:
    return re.findall(pattern, log.read_text())


def run(
    model_mb: float, clients: int, rounds: int, layers: int, chunk_kb: int, uploads: int
) -> None:
    names = [f"c{i}" for i in range(clients)]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(os.environ.get("BENCH_KEEP", d))
        tmp.mkdir(parents=True, exist_ok=True)
        cfg, port = write_config(
            tmp,
            names,
            rounds=rounds,
            model="mlp",
            hidden=hidden_for(model_mb, layers),
            partitions=200,
            deploy_extra=f"linger_s = 0\nchunk_kb = {chunk_kb}\nmax_concurrent_uploads = {uploads}",
        )
        server = spawn(
            [sys.executable, "-m", "fedforge.cli", "server", str(cfg)], tmp / "server.log"
        )
        procs = {"server": server}
        for n in names:
            cmd = [sys.executable, "-m", "fedforge.cli", "client", "--server", f"127.0.0.1:{port}"]
            cmd += ["--credentials", str(tmp / "keys" / n), "--state-dir", str(tmp / n)]
            procs[n] = spawn(cmd, tmp / f"{n}.log")
        peaks = watch(procs, 3600)
        if server.returncode != 0:
            raise SystemExit((tmp / "server.log").read_text()[-3000:])
        down = [
            (float(mb), float(s))
            for n in names
            for mb, s in times(
                tmp / f"{n}.log", r"received a fit task \(([\d.]+) MB.*?in ([\d.]+) s"
            )
        ]
        train = [
            float(s) for n in names for s in times(tmp / f"{n}.log", r"fit done in ([\d.]+) s")
        ]
        up = [
            (float(mb), float(s))
            for mb, s in times(
                tmp / "server.log", r"received a fit reply of \S+ \(([\d.]+) MB\) in ([\d.]+) s"
            )
        ]
        walls = [
            float(s) for s in times(tmp / "server.log", r"round \d+: \d+ sampled.*, ([\d.]+) s\n")
        ]
        size_mb = down[0][0]
        keys = tmp / "keys"
        raw = statistics.median(raw_grpc.measure(int(size_mb * 1e6), chunk_kb << 10, keys))
    model = size_mb * 1e6
    print(
        f"model {size_mb:.0f} MB ({layers} hidden layers), {clients} clients, {rounds} rounds, chunk {chunk_kb} KiB"
    )
    print(
        f"  server peak RSS {peaks['server'] / 2**20:.0f} MiB = {peaks['server'] / model:.2f}x model"
    )
    worst = max(peaks[n] for n in names)
    print(f"  client peak RSS (largest) {worst / 2**20:.0f} MiB = {worst / model:.2f}x model")
    print(
        f"  per transfer, median: download {statistics.median(s for _, s in down):.2f} s "
        f"({statistics.median(mb / s for mb, s in down) / 1e3:.2f} GB/s per client), "
        f"train {statistics.median(train):.2f} s, upload {statistics.median(s for _, s in up):.2f} s "
        f"({statistics.median(mb / s for mb, s in up) / 1e3:.2f} GB/s per client)"
    )
    print(f"  raw gRPC (TLS, same bytes and chunk, one stream): {raw / 1e9:.2f} GB/s")
    if walls:
        print(f"  round wall (server log) median {statistics.median(walls):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-mb", type=float, default=200)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--chunk-kb", type=int, default=1024)
    parser.add_argument("--uploads", type=int, default=0, help="deploy.max_concurrent_uploads")
    args = parser.parse_args()
    run(args.model_mb, args.clients, args.rounds, args.layers, args.chunk_kb, args.uploads)


if __name__ == "__main__":
    main()
