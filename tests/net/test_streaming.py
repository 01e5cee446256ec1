"""Streamed transfers: payloads decoded chunk by chunk into their arrays, the replies held at
once bounded, the streamed aggregate bit for bit the in-memory one, a reply corrupted in its
last chunk kept out of it, the server's memory within its plan, and a plan above the budget
refused at start."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from fedforge.aggregate.kinds import StreamingMean
from fedforge.algorithms.base import RoundContext
from fedforge.config import load_config
from fedforge.core.errors import ConfigError
from fedforge.core.params import ArraySpec, spec_of
from fedforge.core.records import FIT, Record, Task
from fedforge.experiment import build_algorithm, build_dataset, build_model
from fedforge.net.codec import ProtocolError, decode_params, encode_params, split_payload
from fedforge.net.hub import Hub
from fedforge.net.memory_plan import RUNTIME_BYTES, check_budget, server_plan
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.service import FederationService
from fedforge.net.stream import StreamDecoder, encode_pieces, stream_chunks
from fedforge.net.transport import NetworkTransport
from fedforge.train.torch_model import TorchModel
from tests.net.helpers import (
    PATIENCE,
    CraftedClient,
    base_architecture,
    free_port,
    make_keys,
    start_server,
    stop_all,
    stored_history,
    wait_for_port,
    write_config,
)

RNG = np.random.default_rng(7)
ARRAYS = {
    "w": RNG.standard_normal((37, 11)).astype(np.float32),
    "b": RNG.standard_normal(5),
    "codes": np.arange(7, dtype=np.int64),
    "empty": np.zeros((0, 3), np.float32),
    "scalar": np.array(2.5, np.float32),
}


def _decode(chunks: list[pb.Chunk], decoder: StreamDecoder) -> dict[str, np.ndarray]:
    out = None
    for chunk in chunks:
        assert out is None  # nothing before the last chunk
        out = decoder.add(chunk)
    assert out is not None
    return out


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1000, 1 << 20])
def test_streamed_payloads_decode_bit_for_bit_at_any_chunk_size(chunk_bytes: int) -> None:
    """Chunks that split the header and elements decode into the same bits; safetensors
    reads the payload, and the decoder reads what safetensors writes."""
    for encoded in (encode_pieces(ARRAYS), encode_pieces({k: v.copy() for k, v in ARRAYS.items()})):
        chunks = list(stream_chunks(encoded, chunk_bytes))
        got = _decode(chunks, StreamDecoder(1 << 20, spec_of(ARRAYS), finite=True))
        whole = decode_params(b"".join(c.data for c in chunks))
        for name, want in ARRAYS.items():
            for arrays in (got, whole):
                assert arrays[name].dtype == want.dtype and arrays[name].shape == want.shape
                assert arrays[name].tobytes() == want.tobytes()
    plain = {k: v for k, v in ARRAYS.items() if v.ndim}  # (safetensors' writer: ndim >= 1)
    got = _decode(list(split_payload(encode_params(plain), chunk_bytes)), StreamDecoder(1 << 20))
    assert all(got[k].tobytes() == v.tobytes() for k, v in plain.items())


def test_a_bad_reply_is_refused_at_the_chunk_that_shows_it() -> None:
    """A NaN at its chunk, other arrays than the record's at the header (before any array is
    allocated), a flipped byte in the last chunk at the digest."""
    poisoned = {**ARRAYS, "w": ARRAYS["w"].copy()}
    poisoned["w"][30, 2] = np.nan
    chunks = list(stream_chunks(encode_pieces(poisoned), 64))
    decoder = StreamDecoder(1 << 20, spec_of(ARRAYS), finite=True)
    with pytest.raises(ProtocolError, match="w: NaN or infinite") as info:
        for index, chunk in enumerate(chunks):  # noqa: B007 (index: where it stopped)
            decoder.add(chunk)
    assert index < len(chunks) - 1
    assert "w" in str(info.value)

    other = {"w": np.zeros((37, 12), np.float32)}
    decoder = StreamDecoder(1 << 20, {"w": spec_of(ARRAYS)["w"]})
    with pytest.raises(ProtocolError, match=r"w: shape \(37, 12\), expected \(37, 11\)"):
        for index, chunk in enumerate(stream_chunks(encode_pieces(other), 64)):  # noqa: B007
            decoder.add(chunk)
    assert index == 1 and not decoder._arrays  # the header's second chunk; nothing allocated

    chunks = list(stream_chunks(encode_pieces(ARRAYS), 64))
    last = pb.Chunk()
    last.CopyFrom(chunks[-1])
    last.data = bytes([last.data[0] ^ 1]) + last.data[1:]
    with pytest.raises(ProtocolError, match="digest mismatch"):
        _decode([*chunks[:-1], last], StreamDecoder(1 << 20))


JSON_VALUES = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=4)
ENTRIES = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F64", "U8", "I64", "BOOL", "F8"]) | JSON_VALUES,
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | JSON_VALUES,
        "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3) | JSON_VALUES,
    }
)


@settings(max_examples=100, deadline=None)
@given(
    header=st.dictionaries(st.text(max_size=6), ENTRIES | JSON_VALUES, max_size=3),
    tail=st.binary(max_size=64),
)
def test_fuzz_stream_decoder_raises_only_protocol_errors(header: dict, tail: bytes) -> None:  # type: ignore[type-arg]
    """Any header a hostile peer writes (well-formed JSON of any shape) and any bytes after it:
    the decoder refuses with ProtocolError, never another exception, never a large allocation."""
    text = json.dumps(header).encode()
    payload = len(text).to_bytes(8, "little") + text + tail
    for chunk_bytes in (5, 1 << 10):
        decoder = StreamDecoder(1 << 16, finite=True)
        with contextlib.suppress(ProtocolError):
            for chunk in split_payload(payload, chunk_bytes):
                decoder.add(chunk)


def _service(max_uploads: int) -> tuple[FederationService, NetworkTransport, list]:  # type: ignore[type-arg]
    hub = Hub("run-1", max_uploads=max_uploads)
    service = FederationService(hub, None, {"a": 0, "b": 1}, "", 1.0)
    sessions = [hub.open("a", 0, 100), hub.open("b", 1, 100)]
    transport = NetworkTransport(hub, round_timeout_s=60, chunk_bytes=64, max_payload_bytes=1 << 24)
    return service, transport, sessions


def _task_id(session) -> bytes:  # type: ignore[no-untyped-def]
    item = session.outbox.get(timeout=10)
    return bytes(next(iter(item)).task.task_id)


def _chunks(round_number: int, task_id: bytes, arrays: dict, n: int) -> list[pb.ClientMessage]:  # type: ignore[type-arg]
    messages = []
    for chunk in stream_chunks(encode_pieces(arrays), 999):  # (splits float32 elements)
        message = pb.ClientMessage(
            envelope=pb.Envelope(run_id="run-1", round=round_number, nonce=os.urandom(16))
        )
        message.reply.stage, message.reply.task_id = FIT, task_id
        message.reply.num_examples = n
        message.reply.metrics["train_loss"] = 0.5
        message.reply.chunk.CopyFrom(chunk)
        messages.append(message)
    return messages


def test_streamed_aggregate_equals_the_in_memory_one_and_uploads_are_bounded() -> None:
    """Two replies streamed through the service with one upload slot: the second waits until
    the first has verified, and the mean of what arrived is bit for bit the mean of the
    records in memory."""
    service, transport, (a, b) = _service(max_uploads=1)
    shared = {"w": np.zeros(20_000, np.float32)}
    updates = {cid: {"w": RNG.standard_normal(20_000).astype(np.float32)} for cid in (0, 1)}
    replies: list = []  # type: ignore[type-arg]
    tasks = [Task(FIT, 1, cid, cid, shared, {}) for cid in (0, 1)]
    runner = threading.Thread(target=lambda: replies.extend(transport.exchange(tasks)))
    runner.start()
    ids = {0: _task_id(a), 1: _task_id(b)}
    first, second = _chunks(1, ids[0], updates[0], 3), _chunks(1, ids[1], updates[1], 5)
    service._handle(a, first[0])  # a holds the only slot
    waited = threading.Event()
    reader = threading.Thread(
        target=lambda: [service._handle(b, m) for m in second] and waited.set()
    )
    reader.start()
    time.sleep(0.3)
    assert not waited.is_set() and b.task is not None and b.task.receiver.received == 0
    for message in first[1:]:
        service._handle(a, message)
    reader.join(timeout=30)
    runner.join(timeout=30)
    assert waited.is_set() and len(replies) == 2
    streamed, in_memory = StreamingMean(), StreamingMean()
    for reply in replies:
        assert isinstance(reply, Record)
        streamed.add(reply.as_batch(), np.array([float(reply.num_examples)]))
        original = Record(reply.client_id, reply.num_examples, updates[reply.client_id])
        in_memory.add(original.as_batch(), np.array([float(reply.num_examples)]))
    assert streamed.result().arrays["w"].tobytes() == in_memory.result().arrays["w"].tobytes()


def _peak_rss(pid: int, peaks: list[int], done: threading.Event) -> None:
    while not done.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        if match:
            peaks.append(int(match.group(1)) * 1024)
        time.sleep(0.05)


def test_a_reply_corrupted_in_its_last_chunk_never_touches_the_aggregate(
    tmp_path: Path,
) -> None:
    """A real server with a 100 MB model and one upload slot; three sites answer, one with a
    byte flipped in its last chunk: it is refused at that chunk, the new model is bit for bit
    the initial one plus the mean of the two others, and the server's peak memory stays
    within the plan it logged at start."""
    names = ["a", "b", "corrupt"]
    keys = make_keys(tmp_path, names)
    port = free_port()
    cfg = write_config(
        tmp_path,
        keys,
        port,
        rounds=1,
        clients=3,
        timeout=60 * PATIENCE,
        heartbeat=5.0,
        deploy_extra="max_concurrent_uploads = 1",
    )
    cfg.write_text(cfg.read_text().replace("hidden = [32]", "hidden = [5000, 5000]"))  # 102 MB
    config = load_config(cfg)
    initial = TorchModel(build_model(config, build_dataset(config))).get_params()  # the server's
    server = start_server(cfg, tmp_path / "server.log")
    peaks: list[int] = []
    done = threading.Event()
    threading.Thread(target=_peak_rss, args=(server.pid, peaks, done), daemon=True).start()
    sites: list[CraftedClient] = []
    try:
        wait_for_port(port)
        architecture = base_architecture((5000, 5000))
        sites = [CraftedClient(port, keys / n, 100, architecture) for n in names]
        with ThreadPoolExecutor(len(sites)) as pool:  # each site declares its size at once
            received = list(pool.map(lambda site: site.next_task(keep=False), sites))
        updates = {
            n: {
                k: (scale * RNG.standard_normal(v.shape)).astype(np.float32)
                for k, v in initial.items()
            }
            for n, scale in (("a", 0.01), ("b", 0.02), ("corrupt", 0.01))
        }
        counts = {"a": 5, "b": 7, "corrupt": 6}
        for site, name, (round_number, _) in zip(sites, names, received, strict=True):
            chunks = list(split_payload(encode_params(updates[name]), 1 << 20))
            if name == "corrupt":
                last = pb.Chunk()
                last.CopyFrom(chunks[-1])
                last.data = last.data[:-1] + bytes([last.data[-1] ^ 0xFF])
                chunks[-1] = last
            site.send_result(round_number, chunks, counts[name])
        for site in sites:
            threading.Thread(target=site.drain, daemon=True).start()
        assert server.wait(timeout=120 * PATIENCE) == 0, (tmp_path / "server.log").read_text()
    finally:
        done.set()
        stop_all([server])
        for site in sites:
            site.done.set()
    log = (tmp_path / "server.log").read_text()
    assert "payload digest mismatch" in log
    record = stored_history(tmp_path / "state")[1]
    assert record.clients_completed == 2 and record.clients_rejected == 1
    # The new model, as the server computes it from the two verified records only.
    algorithm = build_algorithm(config)
    accumulator = StreamingMean()
    for name in ("a", "b"):
        record_in = Record(names.index(name), counts[name], updates[name])
        accumulator.add(record_in.as_batch(), np.array([float(counts[name])]))
    state = algorithm.init(initial)
    expected = algorithm.server_update(state, accumulator.result(), RoundContext(1, 3, 3))
    final = load_file(str(tmp_path / "state" / "final_model.safetensors"))
    for name, values in expected.params.items():
        assert final[name].tobytes() == values.tobytes(), name
    plan = re.search(r"estimated peak server memory ([\d.]+) GB", log)  # (over 1 GB)
    assert plan is not None and peaks
    model_bytes = sum(v.nbytes for v in initial.values())
    assert model_bytes > 100e6
    assert max(peaks) < float(plan.group(1)) * 1e9, (max(peaks), plan.group(0))


def test_a_server_over_its_memory_budget_refuses_to_start(tmp_path: Path) -> None:
    """``fedforge server`` with a plan above ``deploy.memory_budget_mb``: one line with the
    estimate, exit 1, nothing served."""
    from typer.testing import CliRunner

    from fedforge.cli import app

    port = free_port()
    cfg = write_config(tmp_path, tmp_path, port, clients=2, deploy_extra="memory_budget_mb = 1")
    args = ["server", str(cfg), "--insecure", "--client", "a", "--client", "b"]
    done = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert done.exit_code == 1, done.output
    lines = [line for line in done.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.output, done.output
    assert re.match(
        r"error: estimated peak server memory [\d.]+ [MG]B \(model [\d.]+ [MG]B, .*\) exceeds "
        r"deploy.memory_budget_mb = 1: ",
        lines[0],
    ), lines[0]
    assert not (tmp_path / "state" / "final_model.safetensors").exists()


def test_the_memory_plan_counts_sums_robust_rules_and_uploads_in_flight() -> None:
    update = {"w": ArraySpec((1000,), np.dtype(np.float32))}  # 4 kB a record
    common = {"model_bytes": 4000, "state_bytes": 8000, "broadcast_bytes": 4000, "update": update}
    mean = server_plan(kind="mean", per_round=10, uploads=2, **common).parts
    assert mean["aggregation (mean)"] == 8000 + 4000  # the float64 sum and the mean
    assert mean["replies in flight (3)"] == 3 * 4000  # two received, one being folded in
    robust = server_plan(kind="gather", per_round=10, uploads=0, **common)
    assert robust.parts["aggregation (gather)"] == 10 * 4000 + 4000  # every record of a round
    assert robust.parts["replies in flight (11)"] == 11 * 4000
    assert robust.total == sum(robust.parts.values()) > RUNTIME_BYTES
    assert robust.line().startswith(f"estimated peak server memory {robust.total / 1e6:.1f} MB (")
    check_budget(robust, 0)  # no budget
    with pytest.raises(ConfigError, match=r"exceeds deploy\.memory_budget_mb = 1"):
        check_budget(robust, 1)
