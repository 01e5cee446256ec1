"""Raw gRPC streaming on loopback: the ceiling a deployment's transfers are compared with.

A sender process streams ``total`` bytes as raw ``bytes`` messages of ``chunk`` bytes (no
protobuf, slices of one buffer) over one server-streaming call; this process receives them
and times first byte to last. Same TLS setting and gRPC options as a deployment.

``--fedforge`` sends the same bytes as a float32 model the way the server sends a task (the
encoded pieces cut into chunks written into ``ServerMessage``s in place) and receives them
the way a client does (parsed messages, each chunk hashed and copied into the arrays by a
``StreamDecoder``): the protocol's cost against the raw stream, side by side.

    python -m bench.raw_grpc --mb 1000 --chunk-kb 1024 [--tls KEYS_DIR] [--fedforge]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.server import grpc_options
from fedforge.net.stream import StreamDecoder, chunk_parts, encode_pieces

METHOD = "/bench.Raw/Pull"
OPTIONS = grpc_options(64)


def _identity(b: bytes) -> bytes:
    return b


def _model(total: int) -> dict[str, np.ndarray]:
    """``total`` bytes of float32 in four arrays."""
    rng = np.random.default_rng(0)
    return {f"layer{i}": rng.standard_normal(total // 16, np.float32) for i in range(4)}


def _fedforge_messages(model: dict[str, np.ndarray], chunk: int) -> Iterator[bytes]:
    """A task's messages as the server's transport builds them, serialized."""
    encoded = encode_pieces(model)
    for part in chunk_parts(encoded, chunk):
        message = pb.ServerMessage(envelope=pb.Envelope(run_id="r", round=1, nonce=os.urandom(16)))
        body = message.task
        body.stage, body.seed, body.task_id = "fit", bytes(16), bytes(16)
        part.fill(body.chunk)
        yield message.SerializeToString()


def serve(port: int, total: int, chunk: int, keys: Path | None, fedforge: bool) -> None:
    """Send ``total`` bytes in ``chunk`` pieces to each caller (until killed)."""
    buffer = os.urandom(1 << 20) * max(1, total >> 20)
    view = memoryview(buffer)
    model = _model(total)

    def pull(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        if fedforge:
            yield from _fedforge_messages(model, chunk)
            return
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


def receive(port: int, keys: Path | None, fedforge: bool = False) -> tuple[int, float]:
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
        decoder = StreamDecoder(1 << 40)
        for piece in call:
            if not got:
                first = time.perf_counter()
            got += len(piece)
            if fedforge:
                decoder.add(pb.ServerMessage.FromString(piece).task.chunk)
        return got, time.perf_counter() - first


def measure(
    total: int, chunk: int, keys: Path | None, repeats: int = 3, fedforge: bool = False
) -> list[float]:
    """Bytes per second of ``repeats`` raw transfers (a fresh sender process each time is not
    needed: one sender, ``repeats`` pulls)."""
    from bench.bench_deploy import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "bench.raw_grpc", "--serve", str(port)]
    cmd += ["--mb", str(total >> 20), "--chunk-kb", str(chunk >> 10)]
    cmd += ["--tls", str(keys)] if keys else []
    cmd += ["--fedforge"] if fedforge else []
    sender = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert sender.stdout is not None and sender.stdout.readline().strip() == "ready"
        rates = []
        for _ in range(repeats):
            got, seconds = receive(port, keys, fedforge)
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
    parser.add_argument("--fedforge", action="store_true", help="also fedforge's protocol")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats")
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    total, chunk = args.mb << 20, args.chunk_kb << 10
    if args.serve:
        serve(args.serve, total, chunk, args.tls, args.fedforge)
        return
    kinds = [False, True] if args.fedforge else [False]
    rates: dict[bool, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):  # contenders interleaved
        for kind in kinds:
            rates[kind] += measure(total, chunk, args.tls, repeats=1, fedforge=kind)
    for kind, got in rates.items():
        name = "fedforge protocol" if kind else "raw gRPC"
        print(
            f"{name}, {args.mb} MiB in {args.chunk_kb} KiB messages: median "
            f"{statistics.median(got) / 1e9:.2f} GB/s ({', '.join(f'{r / 1e9:.2f}' for r in got)})"
        )


if __name__ == "__main__":
    main()
