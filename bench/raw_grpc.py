"""Raw gRPC streaming on loopback: the ceiling a deployment's transfers are compared with.

A sender process streams ``total`` bytes as raw ``bytes`` messages of ``chunk`` bytes (no
protobuf, slices of one buffer) over one server-streaming call; this process receives them
and times first byte to last. Same TLS setting and gRPC options as a deployment.

    python -m bench.raw_grpc --mb 1000 --chunk-kb 1024 [--tls KEYS_DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc

from fedforge.net.server import grpc_options

METHOD = "/bench.Raw/Pull"
OPTIONS = grpc_options(64)


def _identity(b: bytes) -> bytes:
    return b


def serve(port: int, total: int, chunk: int, keys: Path | None) -> None:
    """Send ``total`` bytes in ``chunk`` pieces to each caller (until killed)."""
    buffer = os.urandom(1 << 20) * max(1, total >> 20)
    view = memoryview(buffer)

    def pull(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        for start in range(0, len(buffer), chunk):
            yield bytes(view[start : start + chunk])

    handler = grpc.method_handlers_generic_handler(
        "bench.Raw",
        {
            "Pull": grpc.unary_stream_rpc_method_handler(
                pull, request_deserializer=_identity, response_serializer=_identity
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(4), options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    address = f"127.0.0.1:{port}"
    if keys is None:
        server.add_insecure_port(address)
    else:
        tls = grpc.ssl_server_credentials(
            [((keys / "server.key").read_bytes(), (keys / "server.crt").read_bytes())]
        )
        server.add_secure_port(address, tls)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def receive(port: int, keys: Path | None) -> tuple[int, float]:
    """(bytes received, seconds from the first to the last)."""
    address = f"127.0.0.1:{port}"
    if keys is None:
        channel = grpc.insecure_channel(address, options=OPTIONS)
    else:
        tls = grpc.ssl_channel_credentials(root_certificates=(keys / "ca.crt").read_bytes())
        channel = grpc.secure_channel(address, tls, options=OPTIONS)
    with channel:
        call = channel.unary_stream(
            METHOD, request_serializer=_identity, response_deserializer=_identity
        )(b"")
        got, first = 0, 0.0
        for piece in call:
            if not got:
                first = time.perf_counter()
            got += len(piece)
        return got, time.perf_counter() - first


def measure(total: int, chunk: int, keys: Path | None, repeats: int = 3) -> list[float]:
    """Bytes per second of ``repeats`` raw transfers (a fresh sender process each time is not
    needed: one sender, ``repeats`` pulls)."""
    from bench.bench_deploy import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "bench.raw_grpc", "--serve", str(port)]
    cmd += ["--mb", str(total >> 20), "--chunk-kb", str(chunk >> 10)]
    cmd += ["--tls", str(keys)] if keys else []
    sender = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert sender.stdout is not None and sender.stdout.readline().strip() == "ready"
        rates = []
        for _ in range(repeats):
            got, seconds = receive(port, keys)
            rates.append(got / seconds)
        return rates
    finally:
        sender.kill()
        sender.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=1000)
    parser.add_argument("--chunk-kb", type=int, default=1024)
    parser.add_argument("--tls", type=Path, default=None, help="a keys directory (server.crt)")
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    total, chunk = args.mb << 20, args.chunk_kb << 10
    if args.serve:
        serve(args.serve, total, chunk, args.tls)
        return
    rates = measure(total, chunk, args.tls)
    print(
        f"raw gRPC {args.mb} MiB in {args.chunk_kb} KiB messages: "
        + ", ".join(f"{r / 1e9:.2f}" for r in rates)
        + " GB/s"
    )


if __name__ == "__main__":
    main()
