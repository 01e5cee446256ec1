"""``fedforge server``: the driver behind a gRPC endpoint, resumable after a crash."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from safetensors.numpy import save_file

from fedforge.aggregate.kinds import Aggregation
from fedforge.algorithms.base import Algorithm, ServerState
from fedforge.config import RunConfig, to_toml
from fedforge.core.errors import ConfigError, FedforgeError
from fedforge.core.params import Params, ParamSpec, num_bytes, spec_of
from fedforge.core.records import EVALUATE, FIT
from fedforge.core.rng import Purpose, RngStreams
from fedforge.data.datasets import ArrayDataset
from fedforge.data.federated import FederatedDataset
from fedforge.experiment import (
    build_aggregation,
    build_algorithm,
    build_dataset,
    build_fedbuff,
    build_federated_eval,
    build_loop,
    build_model,
    build_outliers,
    build_sample_dp,
    build_sampler,
    build_stages,
    build_stop_rule,
    build_workload,
)
from fedforge.net.codec import encoded_size_bound
from fedforge.net.deployment import settle_run, site_config_toml
from fedforge.net.hub import Hub
from fedforge.net.keys import ServerCredentials
from fedforge.net.memory_plan import MemoryPlan, check_budget, server_plan
from fedforge.net.proto import fedforge_pb2_grpc as pb_grpc
from fedforge.net.registry import check_client_name
from fedforge.net.service import FederationService
from fedforge.net.sizes import SiteSizes
from fedforge.net.supervision import RetryPolicy, RoundLog, Watchdog
from fedforge.net.transport import NetworkTransport
from fedforge.privacy.dp_sgd import dp_sgd_labels
from fedforge.privacy.setup import secret_sampling_seed
from fedforge.report.dashboard import is_loopback_host
from fedforge.report.history import History
from fedforge.report.listeners import ListenerGroup
from fedforge.report.live import LIVE, LiveLog
from fedforge.report.rundir import provenance, start_provenance, write_provenance, write_report
from fedforge.report.runlock import RunDirInUse, hold
from fedforge.runtime.async_driver import AsyncDriver
from fedforge.runtime.checkpoint import CheckpointStore
from fedforge.runtime.client_app import DP_SGD_EPSILON
from fedforge.runtime.driver import Driver, RoundListener
from fedforge.secagg.aggregation import SecureAggregation
from fedforge.secagg.protocol import CIPHERTEXT_BYTES, IDENTITY_BYTES, MASK, STEPS
from fedforge.stages.base import StageChain
from fedforge.train.evaluate import Evaluation, evaluate
from fedforge.train.models import seeded
from fedforge.train.torch_model import TorchModel, trainable_names
from fedforge.train.user_loop import SiteEvaluation, central_evaluation, loop_problem
from fedforge.workload.base import Workload
from fedforge.workload.federate import load_test, load_test_object
from fedforge.workload.fingerprint import fingerprint

log = logging.getLogger("fedforge")


@dataclass(frozen=True)
class ServerRun:
    run_id: str
    history: History
    state: ServerState
    stop_reason: str | None = None  # why the run ended before its last round (a DP budget)


def sampling_population(
    config: RunConfig, hub: Hub, registered: int
) -> Callable[[], Sequence[int]]:
    """Who a round may sample: the connected clients, or under central DP every registered
    one, as its accountant assumes (the server waits until all are connected; one that
    dropped out since fails its task, which can only lower its inclusion)."""
    if config.privacy.mode == "central":
        return lambda: range(registered)
    return hub.connected_ids


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


def deployed_aggregation(
    config: RunConfig, credentials: ServerCredentials | None, names: dict[int, str]
) -> Aggregation:
    """The configured aggregation; secure aggregation over TLS requires every client to
    sign its keys with its certificate, so the server cannot substitute them, and the server
    checks each signature itself (the run's CA, the client's own name) before relaying it."""
    aggregation = build_aggregation(config)
    if isinstance(aggregation, SecureAggregation) and credentials is not None:
        return replace(
            aggregation,
            require_identities=True,
            ca_pem=credentials.ca_certificate,
            names=names,
        )
    return aggregation


def reply_limits(fit: ParamSpec, population: int) -> dict[str, int]:
    """The largest reply each stage may announce: what a valid record of it encodes to.
    Secure aggregation's masked input is the record in a ring of at most 64-bit words; its
    other steps carry keys, shares and ciphertexts: a few KiB per client of the federation."""
    words = sum(int(np.prod(a.shape, dtype=np.int64)) for a in fit.values())
    per_client = (population + 1) * (IDENTITY_BYTES + CIPHERTEXT_BYTES + 1024)
    limits = {step: (64 << 10) + per_client for step in STEPS}
    limits[MASK] = 8 * words + (64 << 10) + per_client
    limits[FIT] = encoded_size_bound(fit)
    limits[EVALUATE] = encoded_size_bound({})
    return limits


def plan_memory(
    config: RunConfig,
    state: ServerState,
    algorithm: Algorithm,
    chain: StageChain,
    model: TorchModel,
    registered: int,
    evaluation_copy: bool = False,
) -> MemoryPlan:
    """The server's estimated peak memory for this run (see ``net/memory_plan.py``)."""
    trainable = [name for name, _ in model.module.named_parameters()]
    update = chain.wire_spec(algorithm.record_spec(spec_of(state.params), trainable)).arrays
    broadcast = {**state.params, **algorithm.broadcast(state)}
    fedbuff = build_fedbuff(config)
    if fedbuff is not None:
        per_round = fedbuff.concurrency
    elif config.server.sampler == "uniform":
        per_round = min(config.server.clients_per_round, registered)
    else:
        per_round = registered
    return server_plan(
        model_bytes=num_bytes(state.params),
        state_bytes=num_bytes(state.optimizer_state) + num_bytes(state.extras),
        broadcast_bytes=num_bytes(broadcast),
        update=update,
        kind=build_aggregation(config).kind,
        per_round=per_round,
        uploads=config.deploy.max_concurrent_uploads,
        evaluation_copy=evaluation_copy,
    )


def run_server(
    config: RunConfig,
    *,
    insecure: bool = False,
    listener: RoundListener | None = None,
    client_names: list[str] | None = None,
    allow_remote_insecure: bool = False,
    new_run: bool = False,
) -> ServerRun:
    """Serve until ``config.server.rounds`` rounds are complete; resume from checkpoints.

    Clients are the names registered in the keys directory, or ``client_names`` when
    ``insecure``; their ids are fixed for the run (see :func:`settle_run`). ``insecure``
    listens on loopback only unless ``allow_remote_insecure``. The server holds the state
    directory's run lock while it lives: a second server on it is refused (RunDirInUse), and
    a dashboard tells a live server from a killed one. ``new_run`` deletes the stored state
    (once the lock is held) and starts over.
    """
    d = config.deploy
    if insecure and not allow_remote_insecure and not is_loopback(d.address):
        raise FedforgeError(
            f"--insecure refuses to listen on {d.address}: without TLS anyone on the network "
            "can read and forge updates; listen on 127.0.0.1, or pass --allow-remote-insecure"
        )
    state_dir = Path(d.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = hold(state_dir)
    except RunDirInUse as exc:
        raise RunDirInUse(f"deploy.state_dir {exc}") from None
    with lock:
        if new_run:
            CheckpointStore.discard(state_dir)
        return _serve(config, insecure, listener, client_names)


def _serve(
    config: RunConfig,
    insecure: bool,
    listener: RoundListener | None,
    client_names: list[str] | None,
) -> ServerRun:
    """The body of :func:`run_server`, run while the state directory is locked."""
    d = config.deploy
    credentials = None if insecure else ServerCredentials.load(Path(d.keys))
    if credentials is not None:  # a revoked client is no longer one of the federation
        revoked = credentials.revoked_names()
        registered = [n for n in credentials.registry.names() if n not in revoked]
    else:
        registered = sorted(client_names or [])
    if not registered:
        raise FedforgeError("no clients are registered; run `fedforge keys add-client NAME`")
    for name in registered:
        check_client_name(name)

    if config.attack.kind != "none":
        log.warning("[attack] simulates attackers in simulations only; the server ignores it")
    if config.clock.enabled:
        raise ConfigError(
            "[clock] simulates devices' time in simulation only (the network runs in real "
            "time): set clock.enabled = false"
        )
    torch.set_num_threads(config.runtime.threads or 1)
    setup = server_setup(config)
    data, model, workload = setup.data, TorchModel(setup.model), setup.workload
    algorithm = build_algorithm(config, trainable_names(setup.model))
    loop = build_loop(workload)
    if loop is not None:  # the clients' training function against the run's algorithm
        problem = loop_problem(
            type(algorithm).__name__,
            algorithm.loop_refusal,
            algorithm.program(),
            loop,
            config.privacy.mode == "sample",
        )
        if problem:
            raise ConfigError(problem)
    store = CheckpointStore(Path(d.state_dir))
    try:
        run_id, state, history = store.open_run(config.seed, algorithm.init(model.get_params()))
        # Ids are the run's: recorded at its start, kept across restarts; new names get new ids.
        partitions = data.num_clients if data is not None else None
        client_ids = settle_run(store, config, registered, partitions, run_id, history)
    except BaseException:
        store.close()
        raise
    if history:
        log.info("resuming run %s after round %d", run_id, state.round)
    names = {cid: name for name, cid in client_ids.items()}  # id -> name
    known_sizes = data is not None and d.client_data == "builtin"
    sizes = [data.client_size(c) for c in sorted(names)] if data and known_sizes else None
    chain = StageChain(build_stages(config, len(names), sizes))
    sample_dp = build_sample_dp(config)
    run_log = start_run_log(Path(d.state_dir), config, resumed=bool(history))

    site_eval = SiteEvaluation.of(workload)  # (its own code evaluates a copy of the model)
    plan = plan_memory(config, state, algorithm, chain, model, len(names), site_eval is not None)
    log.info("%s", plan.line())
    try:
        check_budget(plan, d.memory_budget_mb)
    except BaseException:
        store.close()
        raise
    hub = Hub(run_id, d.heartbeat_s, d.max_concurrent_uploads)
    if state.round >= config.server.rounds:
        hub.finished = state.round  # a complete run: answer late clients, then exit
    # A stream holds a worker thread while it lives; a refused certificate holds none and a
    # silent stream holds one for at most hello_timeout_s (MAX_PENDING_HELLOS per identity),
    # and each identity has one session, so registered clients never run out of threads.
    # Streams beyond the pool are refused (RESOURCE_EXHAUSTED, which clients retry).
    workers = 4 * len(names) + 64
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=grpc_options(d.max_message_mb),
        maximum_concurrent_rpcs=workers,
    )
    pb_grpc.add_FederationServicer_to_server(  # type: ignore[no-untyped-call]
        FederationService(
            hub,
            credentials,
            client_ids,
            site_config_toml(config),
            d.heartbeat_s,
            d.hello_timeout_s,
            fingerprint(setup.model, workload.schema),
        ),
        server,
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

    def evaluator(params: Params) -> Evaluation:
        if site_eval is not None:  # the workload's own code: a copy, whatever it writes
            model.set_params(params)
        else:  # the model's arrays themselves (read in eval mode only)
            model.share_params(params)
        model.set_frozen_offsets(params)  # (an algorithm's frozen/ offsets, when it has them)
        if site_eval is not None:
            return central_evaluation(site_eval, model.module, central_test)
        assert setup.test is not None
        return evaluate(model, setup.test)

    central_test: object = setup.test_site if workload.opaque else setup.test
    has_test = central_test is not None and (
        site_eval is not None if workload.opaque else len(setup.test or ())
    )

    site_sizes = SiteSizes(hub, d, data, lambda cid: names[cid])

    transport = NetworkTransport(
        hub,
        round_timeout_s=d.round_timeout_s,
        chunk_bytes=d.chunk_kb << 10,
        max_payload_bytes=d.max_payload_mb << 20,
    )
    driver = Driver(
        algorithm=algorithm,
        transport=transport,
        sampler=build_sampler(config),
        streams=RngStreams(config.seed),
        model_spec=spec_of(state.params),
        trainable=trainable_names(model.module),
        population=sampling_population(config, hub, len(names)),
        population_size=lambda: len(names),
        example_cap=site_sizes.limit,
        count_cap=site_sizes.count_cap,
        outliers=build_outliers(config, deployed=True),
        max_refused=config.aggregation.max_refused,
        stages=chain,
        aggregation=deployed_aggregation(
            config, credentials, {cid: name for name, cid in client_ids.items()}
        ),
        evaluator=evaluator if has_test else None,
        eval_metrics=site_eval.metrics if site_eval is not None else (),
        federated_eval=build_federated_eval(config),
        listener=RoundLog(ListenerGroup([LiveLog(Path(d.state_dir) / LIVE), listener]), names),
        describe=lambda cid: names.get(cid, f"client {cid}"),
        client_metrics=(DP_SGD_EPSILON,) if sample_dp else loop_metrics(workload),
        labels=dp_sgd_labels(sample_dp) if sample_dp else {},
        sampling_seed=secret_sampling_seed(config),
        downlink=config.update.downlink,
        stop_when=build_stop_rule(config),
    )
    # Replies announcing more bytes than a valid record of their stage encodes to are
    # refused at their first chunk: a client holds O(model) server memory at most.
    transport.reply_limits = reply_limits(driver.fit_spec.arrays, len(names))
    # ... and a reply whose header names other arrays is refused before they are allocated.
    transport.reply_specs = {FIT: driver.fit_reply_spec.arrays, EVALUATE: driver.eval_spec.arrays}
    # Rounds start once min_clients are connected, with whoever is connected (the sampler
    # draws from them).
    needed = min(d.min_clients, len(names))
    if config.privacy.mode == "central":
        # The accountant samples from every registered client: so must the sampler.
        log.info("central DP: every round waits for all %d registered clients", len(names))
        needed = len(names)
    retry = RetryPolicy(hub, needed, d.max_retries, d.round_timeout_s)
    watchdog = Watchdog(hub, credentials, d.heartbeat_s, d.silent_heartbeats)
    fedbuff = build_fedbuff(config)
    try:
        if fedbuff is not None:
            # FedBuff in real time: clients that finish get new work at once; an update
            # every buffer arrivals (of as many clients), checkpointed. Starts once
            # min_clients, and at least buffer clients, are connected.
            if state.round < config.server.rounds:
                hub.wait_for_clients(min(max(needed, fedbuff.buffer), len(names)))
            state = AsyncDriver(driver, fedbuff, wait=lambda: hub.wait_for_change(1.0)).run(
                state,
                config.server.rounds,
                history,
                checkpoint=lambda s, h: store.save(run_id, s, h),
            )
        else:
            state = driver.run(
                state,
                config.server.rounds,
                history,
                min_completed=d.min_completed,
                max_retries=None,  # sites that cannot be reached are waited for, never fatal
                before_attempt=retry.before_attempt,
                checkpoint=lambda s, h: retry.round_done(lambda: store.save(run_id, s, h)),
            )
        save_file(state.params, str(Path(d.state_dir) / "final_model.safetensors"))
        write_report(Path(d.state_dir), config, history, data, "network")
        finish_run_log(Path(d.state_dir), run_log, driver.stop_reason)
        hub.finish(state.round)
        if d.linger_s > 0:
            log.info("run complete; answering late clients for %g s", d.linger_s)
            time.sleep(d.linger_s)
    finally:
        watchdog.stop()
        transport.close()
        server.stop(grace=2).wait()
        store.close()
    return ServerRun(run_id, history, state, driver.stop_reason)


@dataclass(frozen=True)
class ServerSetup:
    """What the server builds from the configuration: the workload, its model (initialized
    from the run seed), the central test set (None: none) and, for a built-in dataset, the
    federation whose shares clients train on."""

    workload: Workload
    model: torch.nn.Module
    test: ArrayDataset | None
    data: FederatedDataset | None
    test_site: object | None = None  # an opaque workload's central test object


def server_setup(config: RunConfig) -> ServerSetup:
    if config.rl is not None:  # agents hold environments; the server its held-out physics
        workload = build_workload(config)
        model = seeded(workload.model, RngStreams(config.seed).int_seed(Purpose.INIT))
        return ServerSetup(workload, model, None, None, load_test_object(workload))
    if config.data.builtin and config.workload is None and not config.lora.enabled:
        data = build_dataset(config)
        workload = build_workload(config, data)
        return ServerSetup(workload, build_model(config, data), data.test, data)
    workload = build_workload(config)
    model = seeded(workload.model, RngStreams(config.seed).int_seed(Purpose.INIT))
    return ServerSetup(workload, model, load_test(workload), None)


def loop_metrics(workload: Workload) -> tuple[str, ...]:
    """The metrics clients report beside ``train_loss`` (a training function's)."""
    return workload.metrics if workload.train is not None else ()


def start_run_log(state_dir: Path, config: RunConfig, *, resumed: bool) -> dict[str, Any]:
    """What ``fedforge dashboard STATE_DIR`` reads of a deployed run, beside its checkpoint:
    the configuration, the provenance and the live log (emptied when a new run starts)."""
    if not resumed:
        (state_dir / LIVE).unlink(missing_ok=True)
    (state_dir / "config.toml").write_text(to_toml(config))
    started = datetime.now().astimezone()
    record = provenance(config, backend="network", device=None, started=started)
    return start_provenance(state_dir, record, resume=resumed)


def finish_run_log(state_dir: Path, record: dict[str, Any], stop_reason: str | None) -> None:
    record["finished"] = datetime.now().astimezone().isoformat(timespec="seconds")
    record["stop_reason"] = stop_reason  # why the run ended before its last round, if it did
    write_provenance(state_dir, record)


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` listens on the loopback interface only."""
    return is_loopback_host(address.rsplit(":", 1)[0])
