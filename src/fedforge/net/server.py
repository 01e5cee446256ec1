"""``fedforge server``: the federated round loop behind a gRPC endpoint, resumable after a crash."""

from __future__ import annotations

import logging
import uuid
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from safetensors.numpy import save_file

from fedforge.algorithms.base import ServerState
from fedforge.config import RunConfig, to_toml
from fedforge.core.errors import FedforgeError
from fedforge.core.rng import RngStreams
from fedforge.experiment import build_algorithm, build_dataset, build_model
from fedforge.net.backend import NetworkBackend
from fedforge.net.hub import Hub
from fedforge.net.keys import ServerCredentials
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.proto import fedforge_pb2_grpc as pb_grpc
from fedforge.net.service import FederationService
from fedforge.report.history import History
from fedforge.runtime.checkpoint import CheckpointStore
from fedforge.runtime.loop import RoundListener, RoundLoop
from fedforge.train.evaluate import Evaluation, evaluate
from fedforge.train.torch_model import TorchModel

log = logging.getLogger("fedforge")


@dataclass(frozen=True)
class ServerRun:
    run_id: str
    history: History
    state: ServerState


def grpc_options(max_message_mb: int) -> list[tuple[str, int]]:
    limit = max_message_mb << 20
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def run_server(
    config: RunConfig,
    *,
    insecure: bool = False,
    listener: RoundListener | None = None,
    client_names: list[str] | None = None,
) -> ServerRun:
    """Serve until ``config.server.rounds`` rounds are complete; resume from checkpoints.

    Clients are the names registered in the keys directory (ids in sorted name order), or
    ``client_names`` when ``insecure``.
    """
    d = config.deploy
    credentials = None if insecure else ServerCredentials.load(Path(d.keys))
    names = sorted(credentials.clients) if credentials else sorted(client_names or [])
    if not names:
        raise FedforgeError("no clients are registered; run `fedforge keys add-client NAME`")
    client_ids = {name: i for i, name in enumerate(names)}

    torch.set_num_threads(config.runtime.threads or 1)
    data = build_dataset(config)
    model = TorchModel(build_model(config, data))
    algorithm = build_algorithm(config)
    store = CheckpointStore(Path(d.state_dir))
    checkpoint = store.load()
    if checkpoint is not None:
        if checkpoint.seed != config.seed:
            raise FedforgeError(
                f"{d.state_dir} holds run {checkpoint.run_id} with seed {checkpoint.seed}, not "
                f"{config.seed}; use another deploy.state_dir to start a new run"
            )
        run_id, history = checkpoint.run_id, checkpoint.history
        order = model.names
        state = ServerState(
            checkpoint.state.round,
            {k: checkpoint.state.params[k] for k in order},
            checkpoint.state.optimizer_state,
        )
        log.info("resuming run %s after round %d", run_id, state.round)
    else:
        run_id, history = uuid.uuid4().hex, History()
        state = algorithm.init(model.get_params())
        store.start(run_id, config.seed)
    for name, cid in client_ids.items():
        store.register_client(name, cid, state.round)

    hub = Hub(run_id)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2 * len(names) + 16),
        options=grpc_options(d.max_message_mb),
    )
    pb_grpc.add_FederationServicer_to_server(  # type: ignore[no-untyped-call]
        FederationService(hub, credentials, client_ids, to_toml(config), d.heartbeat_s), server
    )
    if credentials is None:
        log.warning("INSECURE: no TLS, no client authentication; never use this over a network")
        port = server.add_insecure_port(d.address)
    else:
        tls = grpc.ssl_server_credentials(
            [(credentials.private_key, credentials.certificate)],
            root_certificates=credentials.ca_certificate,
            require_client_auth=True,
        )
        port = server.add_secure_port(d.address, tls)
    if port == 0:
        raise FedforgeError(f"cannot listen on {d.address}")
    server.start()
    log.info("run %s serving on %s (%d registered clients)", run_id, d.address, len(names))

    streams = RngStreams(config.seed)

    def evaluator(params: dict) -> Evaluation:  # type: ignore[type-arg]
        model.set_params(params)
        return evaluate(model, data.test)

    def example_cap(cid: int) -> int:
        session = hub.session_for(cid)
        declared = session.declared_examples if session and session.declared_examples > 0 else 0
        cap = declared or (data.client_size(cid) if cid < data.num_clients else d.max_examples)
        return min(cap, d.max_examples)

    backend = NetworkBackend(
        hub,
        streams,
        round_timeout_s=d.round_timeout_s,
        chunk_bytes=d.chunk_kb << 10,
        max_payload_bytes=d.max_payload_mb << 20,
    )
    loop = RoundLoop(
        algorithm,
        backend,
        hub.connected_ids,
        config.server.clients_per_round,
        streams,
        example_cap,
        evaluator,
        listener or RoundListener(),
    )
    try:
        while state.round < config.server.rounds:
            new_state, record = loop.run_round_with_retries(
                state,
                d.min_completed,
                d.max_retries,
                lambda: hub.wait_for_clients(max(d.min_clients, config.server.clients_per_round)),
            )
            state = new_state
            history.append(record)
            store.save(run_id, state, record)
        save_file(state.params, str(Path(d.state_dir) / "final_model.safetensors"))
        hub.broadcast(
            pb.ServerMessage(
                envelope=hub.envelope(), run_complete=pb.RunComplete(rounds=state.round)
            )
        )
    finally:
        server.stop(grace=2).wait()
        store.close()
    return ServerRun(run_id, history, state)
