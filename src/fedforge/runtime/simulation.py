"""Simulation entry point for the Python API: a model, a federated dataset, an algorithm."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from fedforge.aggregate.guard import OutlierBound
from fedforge.aggregate.kinds import Aggregation, WeightedMean
from fedforge.algorithms.base import Algorithm, ServerState, model_view
from fedforge.algorithms.fedavg import FedAvg
from fedforge.compress.downlink import Downlink
from fedforge.core.errors import ConfigError, FedforgeError
from fedforge.core.params import Params, spec_of
from fedforge.core.records import FIT
from fedforge.core.rng import Purpose, RngStreams
from fedforge.data.federated import FederatedDataset
from fedforge.privacy.dp_sgd import SampleDP
from fedforge.report.history import History
from fedforge.report.listeners import ListenerGroup
from fedforge.report.progress import LINE_SECONDS, LineProgress
from fedforge.report.runlock import hold
from fedforge.runtime.async_driver import AsyncDriver, FedBuff
from fedforge.runtime.backends import (
    BackendName,
    BackendOptions,
    backend_device,
    make_transport,
    resolve_backend,
)
from fedforge.runtime.checkpoint import CheckpointStore
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.client_state import ClientStateStore, EphemeralSessions
from fedforge.runtime.clock import ClockSpec, VirtualClock
from fedforge.runtime.driver import Driver, FederatedEvaluation, RoundListener
from fedforge.runtime.memory import check_training_memory
from fedforge.runtime.sampling import Sampler, UniformSampler
from fedforge.runtime.state_slots import ClientStates, run_states
from fedforge.runtime.stopping import StopRule
from fedforge.runtime.stragglers import Stragglers
from fedforge.secagg.aggregation import SecureAggregation
from fedforge.secagg.client import SecAggClient
from fedforge.secagg.protocol import SESSION
from fedforge.stages.base import Stage, StageChain
from fedforge.train.evaluate import Evaluation, evaluate
from fedforge.train.models import seeded
from fedforge.train.torch_model import TorchModel
from fedforge.train.user_loop import SiteEvaluation, UserLoop, central_evaluation
from fedforge.workload.base import Workload
from fedforge.workload.federate import check_federation, describe, federate

Probe = Callable[[torch.nn.Module], float]


@dataclass
class SimulationResult:
    """The run's history, final server state, and the model holding the final parameters."""

    history: History
    state: ServerState
    model: torch.nn.Module
    backend: str
    stop_reason: str | None = None  # why the run ended before its last round (a DP budget)


ModelFactory = Callable[[], torch.nn.Module]


def simulate(
    model: torch.nn.Module | ModelFactory | Workload,
    data: FederatedDataset | None = None,
    algorithm: Algorithm = FedAvg(),  # noqa: B008 (frozen, immutable)
    *,
    rounds: int = 10,
    clients_per_round: int = 10,
    seed: int = 0,
    backend: BackendName = "sequential",
    options: BackendOptions | None = None,
    threads: int | None = None,
    listener: RoundListener | None = None,
    verbose: int | bool = 1,
    sampler: Sampler | None = None,
    stages: Sequence[Stage] = (),
    aggregation: Aggregation = WeightedMean(),  # noqa: B008 (frozen, immutable)
    federated_eval: FederatedEvaluation | None = None,
    state_dir: Path | None = None,
    resume: bool = False,
    client_states: ClientStateStore | None = None,
    sample_dp: SampleDP | None = None,
    probes: Mapping[str, Probe] | None = None,
    labels: Mapping[str, str] | None = None,
    sampling_seed: int | None = None,
    downlink: Downlink = "none",
    clock: ClockSpec | None = None,
    fedbuff: FedBuff | None = None,
    stragglers: Stragglers | None = None,
    stop_when: StopRule | None = None,
    outliers: OutlierBound | None = None,
    max_refused: int = 3,
) -> SimulationResult:
    """Run ``rounds`` of federated training and return the result.

    ``model`` is a :class:`~fedforge.Workload` (your model, data and optionally training
    loop: ``data`` defaults to its sites pooled, each holding out 20% for
    ``federated_eval``), or a model with ``data`` a :class:`FederatedDataset`:
    a module, whose current weights are the initial global model (it is not
    modified: ``result.model`` is a trained copy), or a function that builds one: it is called
    under torch's RNG seeded from ``seed``, so the initial model follows the run seed (as in the
    command line's runs) whatever torch's global RNG holds. ``backend`` picks how clients
    execute: ``sequential`` (reference), ``vectorized`` (one batched program per cohort, CUDA
    when present), ``workers`` (persistent forked processes), ``ray``, or ``auto``. ``sampler``
    defaults to ``clients_per_round`` uniformly without replacement. ``threads`` sets torch's
    intra-op threads while the simulation runs (restored afterwards): by default 1, except for
    ``vectorized``, which takes every core while other processes leave them idle (decided
    before each round and logged). With ``state_dir`` the server state is checkpointed
    after every round and client state lives on disk; ``resume=True`` continues from there
    (the directory is locked while the simulation runs: another process is refused).
    ``client_states`` picks where stateful algorithms keep client state otherwise (default:
    :class:`~fedforge.runtime.state_slots.ClientStates`, in memory up to 1 GiB, beyond it in
    one memory-mapped file). ``sample_dp``
    trains every client with DP-SGD (Opacus) instead of the algorithm's program; it runs one
    client at a time (not ``vectorized``). ``probes`` are extra metrics of the global model
    computed at every central evaluation (a backdoor's success rate); ``labels`` are recorded
    with every round. ``downlink`` compresses the broadcast model (float16 or bfloat16).
    ``sampling_seed`` replaces the run seed for client sampling (central DP without seeded
    noise: a secret the server draws). ``clock`` runs the rounds on simulated devices
    (``runtime/clock.py``); ``fedbuff`` trains asynchronously on that clock, ``rounds`` then
    counting server updates.
    ``stragglers`` makes a share of each round's clients do partial work (or drops them).
    ``stop_when`` ends the run early (a metric's threshold or patience).
    ``outliers`` refuses a round with a record far larger than the round's others (retried
    without it); a round refused more than ``max_refused`` times stops the run with an
    error (``aggregate/guard.py``).
    ``listener`` follows the run (:class:`RoundListener`); ``verbose`` prints progress to
    stderr: ``0`` (or False) nothing, ``1`` (or True, the default) a line for round 0, then
    at most one every 5 seconds, and the last round, ``2`` a line every round.
    """
    loop, workload, site_eval = None, None, None
    if isinstance(model, Workload):
        workload = model
        if data is None:
            data = federate(workload, seed=seed, holdout=0.2 if federated_eval else None)
        loop, site_eval = UserLoop.of(workload), SiteEvaluation.of(workload)
        model = workload.model
    if data is None:
        raise ConfigError("simulate needs data: a FederatedDataset, or pass a Workload")
    if not isinstance(model, torch.nn.Module):
        model = seeded(model, RngStreams(seed).int_seed(Purpose.INIT))
    check_training_memory(sum(p.numel() for p in model.parameters()))
    if workload is not None and not data.opaque:  # your data against your model, first
        check_federation(data, model, [describe(s) for s in workload.site_list()])
    chain = StageChain(stages)
    chain.check(aggregation)
    if fedbuff is not None and sample_dp is not None:
        raise ConfigError("asynchronous training cannot run DP-SGD: it is accounted per round")
    if fedbuff is not None and sampler is not None:
        raise ConfigError(
            "asynchronous training samples no rounds (an idle online client gets work as "
            "soon as one of the fedbuff.concurrency slots frees): pass no sampler"
        )
    if federated_eval is not None and data.opaque and site_eval is None:
        raise ConfigError(
            "federated evaluation of an opaque workload needs its evaluate(model, site_data)"
        )
    if federated_eval is not None and data.holdout is None:
        raise ConfigError(
            "federated evaluation needs held-out client data: use data.with_holdout(...)"
        )
    blocker = "DP-SGD trains one client at a time through Opacus" if sample_dp else None
    if loop is not None:
        blocker = "a training function (your own loop) trains one client at a time"
    options = options or BackendOptions()
    if loop is not None and loop.cohort is not None and backend in ("auto", "vectorized"):
        chosen = "vectorized"  # the workload trains a cohort at once (Workload.train_cohort)
    else:
        chosen = resolve_backend(
            backend, algorithm.program(), model, blocker, data.train, options.device
        )
    previous_threads = torch.get_num_threads()
    # One thread unless set; the vectorized runtime takes more while other processes leave
    # cores idle (runtime/threads.py).
    if threads is not None:
        options = replace(options, threads=threads)
    torch.set_num_threads(options.threads or 1)
    # torch owns the cores. NumPy's BLAS (the server's sums) gets one thread: its spinning
    # worker threads otherwise steal the cores from torch's (measured: 0.23 s vs 0.12 s per
    # vectorized round on 2 cores).
    blas = threadpool_limits(limits=1, user_api="blas")
    lock = None
    if state_dir is not None:  # one process at a time in a state directory
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = hold(state_dir)
    try:
        return _simulate(
            model,
            data,
            algorithm,
            chain,
            aggregation,
            chosen,
            rounds=rounds,
            sampler=sampler or UniformSampler(clients_per_round),
            seed=seed,
            options=options,
            listener=_with_progress(listener, verbose, rounds),
            federated_eval=federated_eval,
            state_dir=state_dir,
            resume=resume,
            client_states=client_states,
            sample_dp=sample_dp,
            probes=probes or {},
            labels=labels or {},
            sampling_seed=sampling_seed,
            downlink=downlink,
            clock=clock,
            fedbuff=fedbuff,
            stragglers=stragglers,
            stop_when=stop_when,
            loop=loop,
            site_eval=site_eval,
            outliers=outliers,
            max_refused=max_refused,
        )
    finally:
        if lock is not None:
            lock.release()
        blas.restore_original_limits()
        torch.set_num_threads(previous_threads)


def _simulate(
    model: torch.nn.Module,
    data: FederatedDataset,
    algorithm: Algorithm,
    chain: StageChain,
    aggregation: Aggregation,
    chosen: str,
    *,
    rounds: int,
    sampler: Sampler,
    seed: int,
    options: BackendOptions,
    listener: RoundListener,
    federated_eval: FederatedEvaluation | None,
    state_dir: Path | None,
    resume: bool,
    client_states: ClientStateStore | None,
    sample_dp: SampleDP | None,
    probes: Mapping[str, Probe],
    labels: Mapping[str, str],
    sampling_seed: int | None,
    downlink: Downlink,
    clock: ClockSpec | None = None,
    fedbuff: FedBuff | None = None,
    stragglers: Stragglers | None = None,
    stop_when: StopRule | None = None,
    loop: UserLoop | None = None,
    site_eval: SiteEvaluation | None = None,
    outliers: OutlierBound | None = None,
    max_refused: int = 3,
) -> SimulationResult:
    streams = RngStreams(seed)
    eval_model = TorchModel(copy.deepcopy(model))
    test: object = data.test_site if data.opaque else data.test
    central = test is not None and (site_eval is not None if data.opaque else len(data.test) > 0)

    def evaluator(params: Params) -> Evaluation:
        eval_model.set_params(params)
        eval_model.set_frozen_offsets(params)  # (an algorithm's frozen/ offsets, if any)
        if site_eval is not None:
            result = central_evaluation(site_eval, eval_model.module, test)
        else:
            result = evaluate(eval_model, data.test)
        for name, probe in probes.items():
            result.metrics[name] = probe(eval_model.module)
        return result

    states = client_states or ClientStates(data.num_clients)
    checkpoints: CheckpointStore | None = None
    state = algorithm.init(eval_model.get_params())
    history = History()
    run_id = uuid.uuid4().hex
    if state_dir is not None:
        checkpoints = CheckpointStore(state_dir / "checkpoint")
        run_id, state, history = checkpoints.open_run(seed, state, resume=resume)
        states = run_states(state_dir / "clients", data.num_clients, resume)
    store: ClientStateStore = states
    if state_dir is not None:  # secure-aggregation sessions never touch disk
        store = EphemeralSessions(states, SESSION)

    def checkpoint(s: ServerState, h: History) -> None:
        assert checkpoints is not None
        if isinstance(states, ClientStates):
            states.flush()  # the round's client states, durable before the round commits
        checkpoints.save(run_id, s, h)

    secure = None
    if isinstance(aggregation, SecureAggregation):
        secure = SecAggClient(withhold_metrics=aggregation.withhold_metrics)
    app = ClientApp(algorithm, copy.deepcopy(model), chain, sample_dp, secure, loop, site_eval)
    transport = make_transport(chosen, app, data, store, options)
    listener.run_started(chosen, backend_device(chosen, options))
    virtual = _virtual_clock(clock, fedbuff, algorithm, data)
    driver = Driver(
        algorithm=algorithm,
        transport=transport,
        sampler=sampler,
        streams=streams,
        model_spec=spec_of(state.params),
        trainable=app.trainable,
        population=lambda: range(data.num_clients),
        population_size=lambda: data.num_clients,
        example_cap=lambda cid, stage: (
            data.client_size(cid) if stage == FIT else data.holdout_size(cid)
        ),
        stages=chain,
        aggregation=aggregation,
        evaluator=evaluator if central else None,  # no test set: no central evaluation
        eval_metrics=site_eval.metrics if site_eval is not None else (),
        federated_eval=federated_eval,
        listener=listener,
        client_states=store,
        client_metrics=app.extra_metrics,
        labels={**labels, **app.labels},
        sampling_seed=sampling_seed,
        downlink=downlink,
        clock=virtual if fedbuff is None else None,
        stragglers=stragglers,
        stop_when=stop_when,
        outliers=outliers,
        max_refused=max_refused,
    )
    try:
        save = checkpoint if checkpoints else None
        if fedbuff is not None:
            assert virtual is not None
            state = AsyncDriver(driver, fedbuff, virtual).run(
                state, rounds, history, checkpoint=save
            )
        else:
            state = driver.run(state, rounds, history, checkpoint=save)
    finally:
        transport.close()
        if checkpoints is not None:
            checkpoints.close()
        if isinstance(states, ClientStates) and states is not client_states:
            states.close()
    problem = nothing_trained(history)
    if problem:
        raise FedforgeError(problem)
    eval_model.set_params(state.params)
    eval_model.set_frozen_offsets(model_view(algorithm, state))
    return SimulationResult(
        history=history,
        state=state,
        model=eval_model.module,
        backend=chosen,
        stop_reason=driver.stop_reason,
    )


def nothing_trained(history: History) -> str | None:
    """Why a run whose clients all failed in every round must not end as a success (the
    model never moved), or None. Rounds with simulated dropouts only are not failures."""
    rounds = [r for r in history if r.round > 0]
    failed = sum(r.clients_failed for r in rounds)
    if not rounds or failed == 0 or any(r.clients_completed for r in rounds):
        return None
    return (
        f"no client completed any of the {len(rounds)} rounds ({failed} client failures, "
        "their errors are logged above): the model was never trained"
    )


def _with_progress(
    listener: RoundListener | None, verbose: int | bool, rounds: int
) -> RoundListener:
    """``listener`` plus the progress lines ``verbose`` asks for."""
    if int(verbose) <= 0:
        return listener or RoundListener()
    progress = LineProgress(rounds, interval=LINE_SECONDS if int(verbose) == 1 else 0.0)
    return ListenerGroup([listener, progress])


def _virtual_clock(
    clock: ClockSpec | None, fedbuff: FedBuff | None, algorithm: Algorithm, data: FederatedDataset
) -> VirtualClock | None:
    if clock is None:
        if fedbuff is not None:
            raise ConfigError(
                "asynchronous training (FedBuff) runs on the virtual clock: pass clock"
            )
        return None
    if len(clock.devices) != data.num_clients:
        raise ConfigError(
            f"the clock has {len(clock.devices)} devices for {data.num_clients} clients"
        )
    if fedbuff is not None and (clock.deadline is not None or clock.keep is not None):
        raise ConfigError("a deadline or over-selection applies to synchronous rounds only")
    program = algorithm.program()  # its step count includes FedRep's head-only steps
    return VirtualClock(
        clock.devices,
        steps=lambda cid, epochs: program.num_steps(data.client_size(cid), epochs),
        deadline=clock.deadline,
        keep=clock.keep,
        fixed_rounds=clock.fixed_rounds,
    )
