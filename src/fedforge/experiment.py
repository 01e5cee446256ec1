"""Turn a validated :class:`RunConfig` into data, model and algorithm, and run it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from torch import nn

from fedforge.aggregate.gather import RobustAggregation
from fedforge.aggregate.guard import DEPLOYMENT_RATIO, OutlierBound
from fedforge.aggregate.kinds import Aggregation, WeightedMean
from fedforge.aggregate.server_opt import FedAdagrad, FedAdam, FedYogi, ServerOptimizer, ServerSGD
from fedforge.algorithms.base import Algorithm
from fedforge.algorithms.ditto import Ditto
from fedforge.algorithms.fedavg import FedAvg
from fedforge.algorithms.fednova import FedNova
from fedforge.algorithms.fedper import FedPer, head_names
from fedforge.algorithms.fedprox import FedProx
from fedforge.algorithms.fedrep import FedRep
from fedforge.algorithms.qfedavg import QFedAvg
from fedforge.algorithms.scaffold import Scaffold
from fedforge.attacks.configure import plan_attack
from fedforge.compress.codecs import BFloat16, Codec, Float16, StochasticQuantizer, TopK
from fedforge.compress.rotation import Rotated
from fedforge.config import RunConfig
from fedforge.config.checks import clients_drawn
from fedforge.core.errors import ConfigError
from fedforge.core.rng import Purpose, RngStreams
from fedforge.data.federated import FederatedDataset
from fedforge.privacy.dp_sgd import SampleDP
from fedforge.privacy.setup import privacy_stages, secret_sampling_seed
from fedforge.report.listeners import ListenerGroup
from fedforge.report.live import LIVE, LiveLog
from fedforge.report.rundir import (
    RunWatch,
    prepare_out_dir,
    provenance,
    simulation_toml,
    start_provenance,
    write_run_dir,
)
from fedforge.report.runlock import held_here, hold
from fedforge.runtime.async_driver import FedBuff
from fedforge.runtime.backends import BackendName, BackendOptions
from fedforge.runtime.clock import ClockSpec
from fedforge.runtime.devices import draw_devices, read_trace
from fedforge.runtime.driver import FederatedEvaluation, RoundListener
from fedforge.runtime.memory import check_training_memory
from fedforge.runtime.sampling import PoissonSampler, Sampler, UniformSampler
from fedforge.runtime.simulation import SimulationResult, simulate
from fedforge.runtime.stopping import StopRule
from fedforge.runtime.stragglers import Stragglers
from fedforge.secagg.aggregation import SecureAggregation
from fedforge.stages.base import Stage
from fedforge.stages.clip import FixedClip
from fedforge.stages.compress import Compress
from fedforge.train.models import logistic, mlp, seeded
from fedforge.train.program import LocalSGD
from fedforge.train.torch_model import trainable_names
from fedforge.train.user_loop import UserLoop
from fedforge.workload.base import Workload
from fedforge.workload.configured import DataShape, configured_workload, project_dir
from fedforge.workload.federate import federate


def build_workload(config: RunConfig, data: FederatedDataset | None = None) -> Workload:
    """The workload the configuration names (built-in or yours); ``data`` is the federation
    a built-in model takes its input shape and classes from (see ``configured_workload``)."""
    return configured_workload(config, DataShape.of(data) if data is not None else None)


def build_dataset(config: RunConfig) -> FederatedDataset:
    """The configured federated dataset: a built-in dataset partitioned over clients, or one
    client per site of your data; with federated evaluation, each client's data is split
    into a training part and a held-out part (seeded)."""
    holdout = config.evaluation.holdout if config.evaluation.fraction > 0 else None
    return federate(
        configured_workload(config), root=project_dir(config), seed=config.seed, holdout=holdout
    )


def build_model(config: RunConfig, data: FederatedDataset) -> nn.Module:
    """The configured model for ``data``, initialized from the run seed; a built-in model is
    refused before any memory is allocated when training it cannot fit in this machine's
    memory."""
    workload = build_workload(config, data)
    if config.model.factory is None and config.workload is None:
        check_model_memory(config, workload)
    seed = RngStreams(config.seed).int_seed(Purpose.INIT)
    return seeded(workload.model, seed)


def check_model_memory(config: RunConfig, workload: Workload) -> None:
    """Refuse a configured built-in model too large to train here (sized on torch's meta
    device, which allocates nothing)."""
    import torch

    with torch.device("meta"):
        num_params = sum(p.numel() for p in workload.model().parameters())
    copies = {"adam": 2, "yogi": 2, "adagrad": 1}.get(config.server.optimizer, 0)
    copies += int(config.server.momentum > 0) + int(config.client.momentum > 0)
    lower = {"mlp": "lower model.hidden", "cnn": "lower model.channels or model.dense"}.get(
        config.model.name,
        "use fewer features" if config.model.name == "logistic" else "lower model.channels",
    )
    check_training_memory(num_params, optimizer_copies=copies, what_to_lower=lower)


def build_loop(workload: Workload) -> UserLoop | None:
    """The workload's training function, if it has one."""
    return UserLoop.of(workload)


def build_stop_rule(config: RunConfig) -> StopRule | None:
    stop = config.server.stop_when
    if stop.metric is None:
        return None
    mode = StopRule.default_mode(stop.metric) if stop.mode == "auto" else stop.mode
    return StopRule(stop.metric, stop.threshold, stop.patience, mode, stop.min_delta)


def build_server_optimizer(config: RunConfig) -> ServerOptimizer:
    s = config.server
    if s.optimizer == "sgd":
        return ServerSGD(lr=s.lr or 1.0, momentum=s.momentum)
    adaptive = {"adam": FedAdam, "yogi": FedYogi, "adagrad": FedAdagrad}[s.optimizer]
    return adaptive(lr=s.lr or 0.01, beta1=s.beta1, beta2=s.beta2, tau=s.tau)


def build_algorithm(config: RunConfig, names: list[str] | None = None) -> Algorithm:
    """The configured algorithm; ``names`` are the model's parameter names (FedPer's and
    FedRep's head; default: the configured built-in model's)."""
    c, a = config.client, config.algorithm
    local = LocalSGD(
        lr=c.lr,
        epochs=c.epochs,
        batch_size=c.batch_size,
        momentum=c.momentum,
        weight_decay=c.weight_decay,
    )
    opt = build_server_optimizer(config)
    if config.lora.enabled:
        from fedforge.llm.workload import LoraSetup, lora_algorithm

        mu = a.mu if a.name == "fedprox" else 0.0
        return lora_algorithm(LoraSetup.of(config), local, opt, mu)
    if config.rl is not None and config.rl.method == "fedpg_br":
        from fedforge.rl.fedpg_br_server import fedpg_br

        return fedpg_br(config.rl, config.seed, opt)
    if a.name == "fedprox":
        return FedProx(local=local, server_optimizer=opt, mu=a.mu)
    if a.name == "scaffold":
        return Scaffold(local=local, server_optimizer=opt)
    if a.name == "fednova":
        return FedNova(local=local, server_optimizer=opt)
    if a.name == "qfedavg":
        return QFedAvg(local=local, server_optimizer=opt, q=a.q)
    if a.name in ("fedper", "fedrep"):
        names = names or [n for n, _ in _architecture(config).named_parameters()]
        try:
            head = head_names(names, a.head_layers)
        except ValueError as exc:
            raise ConfigError(f"algorithm.head_layers: {exc}") from None
        if a.name == "fedper":
            return FedPer(local=local, server_optimizer=opt, head=head)
        return FedRep(local=local, server_optimizer=opt, head=head, head_epochs=a.head_epochs)
    if a.name == "ditto":
        return Ditto(local=local, server_optimizer=opt, lam=a.lam)
    return FedAvg(local=local, server_optimizer=opt)


def _architecture(config: RunConfig) -> nn.Module:
    """The configured built-in MLP on dummy sizes: its parameter names are the real model's."""
    if config.model.name == "logistic":
        return logistic(1, 2)
    return mlp(1, 2, config.model.hidden)


def build_stragglers(config: RunConfig) -> Stragglers | None:
    """Simulated stragglers (``algorithm.stragglers`` > 0), else None."""
    a = config.algorithm
    if a.stragglers == 0:
        return None
    return Stragglers(a.stragglers, config.client.epochs, drop=a.drop_stragglers)


def build_stages(
    config: RunConfig, population: int | None, client_sizes: Sequence[int] | None = None
) -> list[Stage]:
    """The update stages, in chain order, for a server of ``population`` clients whose
    example counts are ``client_sizes`` when known; ``population`` None: a deployed client's
    chain (the stages with a client side)."""
    stages: list[Stage] = []
    if config.update.clip_norm is not None:
        stages.append(FixedClip(config.update.clip_norm))
    stages.extend(privacy_stages(config, population, client_sizes))
    if config.update.codec != "none":
        stages.append(Compress(build_codec(config), config.update.uses_error_feedback))
    return stages


def build_codec(config: RunConfig) -> Codec[Any]:
    """The configured update codec (``compress/codecs.py``)."""
    name, block = config.update.codec, config.update.codec_block
    if name == "float16":
        return Float16()
    if name == "bfloat16":
        return BFloat16()
    if name == "q8":
        return StochasticQuantizer(8, block)
    if name == "q4":
        return StochasticQuantizer(4, block)
    if name == "topk":
        return TopK(config.update.topk_fraction)
    return Rotated(StochasticQuantizer(4 if name == "rotated_q4" else 2, 4096), 4096)


def build_sample_dp(config: RunConfig) -> SampleDP | None:
    """DP-SGD inside every client (``privacy.mode = 'sample'``), else None."""
    p = config.privacy
    if p.mode != "sample":
        return None
    assert p.noise_multiplier is not None
    return SampleDP(p.noise_multiplier, p.clip_norm, p.delta, p.accountant, p.seeded_noise)


def build_aggregation(config: RunConfig) -> Aggregation:
    a = config.aggregation
    if config.lora.enabled and config.lora.aggregation == "exact":
        from fedforge.aggregate.stacked import StackedRecords

        return StackedRecords()
    if a.kind == "mean":
        return WeightedMean(max_weight=a.max_weight)
    if a.kind == "secure_sum":
        return SecureAggregation(
            config.secagg.params(), withhold_metrics=config.privacy.mode == "distributed"
        )
    return RobustAggregation(
        a.kind,
        byzantine=a.byzantine,
        beta=a.trim,
        multi=a.multi_krum,
        max_norm=a.max_norm,
        quantile=a.norm_quantile,
        tau=a.tau,
        iterations=a.iterations,
        sigma=a.sigma,
        delta=a.delta,
        alpha=a.alpha,
        batch_size=config.rl.episodes if config.rl is not None else 1,
    )


def build_outliers(config: RunConfig, *, deployed: bool) -> OutlierBound | None:
    """The outlier bound on records: ``aggregation.outlier_ratio``, by default on in
    deployment (never under secure aggregation, whose server sees no record, nor under
    central DP, whose records are clipped and whose sample must not depend on them)."""
    ratio = config.aggregation.outlier_ratio
    if ratio is None:  # (central DP clips every record already and cannot refuse one)
        secure = config.aggregation.kind == "secure_sum" or config.privacy.mode == "central"
        ratio = DEPLOYMENT_RATIO if deployed and not secure else 0.0
    return OutlierBound(ratio) if ratio > 0 else None


def build_sampler(config: RunConfig) -> Sampler:
    s = config.server
    if s.sampler == "poisson":
        return PoissonSampler(s.sampling_rate)
    # over-selection: the clock keeps the first clients_per_round to finish
    return UniformSampler(clients_drawn(config))


def build_clock(config: RunConfig, num_clients: int) -> ClockSpec | None:
    """The simulated devices and the synchronous rounds' deadline and over-selection. Under
    central DP with partial availability every round lasts the deadline (fixed-length
    rounds), so who is online does not depend on who took part before."""
    c = config.clock
    if not c.enabled:
        return None
    if c.trace is not None:
        devices = read_trace(Path(c.trace), num_clients, c.period_s)
    else:
        devices = draw_devices(
            num_clients,
            RngStreams(config.seed).generator(Purpose.DEVICES),
            speed_median=c.speed_median,
            speed_sigma=c.speed_sigma,
            down_mbps=c.down_mbps,
            up_mbps=c.up_mbps,
            bandwidth_sigma=c.bandwidth_sigma,
            pattern=c.availability,
            online_fraction=c.online_fraction,
            always_on=c.always_on,
            slot_seconds=c.slot_s,
            period_seconds=c.period_s,
        )
    keep = config.server.clients_per_round if c.over_selection > 1 else None
    fixed = (
        config.privacy.mode == "central" and c.deadline_s is not None and not devices.always_online
    )
    return ClockSpec(devices, c.deadline_s, keep, fixed_rounds=fixed)


def build_fedbuff(config: RunConfig) -> FedBuff | None:
    a = config.asynchronous
    if a.mode == "off":
        return None
    return FedBuff(a.buffer, a.concurrency, a.staleness_exponent, a.eval_every)


def build_federated_eval(config: RunConfig) -> FederatedEvaluation | None:
    e = config.evaluation
    return FederatedEvaluation(e.fraction, e.every) if e.fraction > 0 else None


def backend_options(config: RunConfig) -> BackendOptions:
    rt = config.runtime
    return BackendOptions(
        num_workers=rt.num_workers,
        memory_budget=rt.memory_budget_mb << 20 if rt.memory_budget_mb else None,
        device=rt.device,
        ray_address=rt.ray_address,
    )


def check_simulation(config: RunConfig) -> None:
    """What a configuration cannot do in simulation (it may on a deployment's server)."""
    if config.asynchronous.mode != "off" and not config.clock.enabled:
        raise ConfigError(
            "asynchronous.mode = 'fedbuff' runs on the virtual clock in simulation: set "
            "clock.enabled = true (a deployment's server runs it in real time)"
        )


def simulate_config(
    config: RunConfig,
    data: FederatedDataset,
    *,
    backend: BackendName | None = None,
    listener: RoundListener | None = None,
    state_dir: Path | None = None,
    resume: bool = False,
) -> SimulationResult:
    """The configured simulation on ``data`` (``backend`` overrides the configured one),
    without writing a run directory."""
    check_simulation(config)
    aggregation = build_aggregation(config)
    attack = plan_attack(config, data, aggregation)
    workload = build_workload(config, attack.data)
    names = trainable_names(build_model(config, attack.data))
    return simulate(
        workload,
        attack.data,
        build_algorithm(config, names),
        rounds=config.server.rounds,
        sampler=build_sampler(config) if config.asynchronous.mode == "off" else None,
        seed=config.seed,
        backend=backend or config.runtime.backend,
        options=backend_options(config),
        threads=config.runtime.threads,
        listener=listener,
        verbose=False,  # the command line shows its own progress
        stages=attack.stages + build_stages(config, data.num_clients, data.client_sizes()),
        sample_dp=build_sample_dp(config),
        probes=attack.probes,
        labels=attack.labels,
        sampling_seed=secret_sampling_seed(config),
        downlink=config.update.downlink,
        aggregation=attack.aggregation,
        federated_eval=build_federated_eval(config),
        stragglers=build_stragglers(config),
        state_dir=state_dir,
        resume=resume,
        clock=build_clock(config, data.num_clients),
        fedbuff=build_fedbuff(config),
        stop_when=build_stop_rule(config),
        outliers=build_outliers(config, deployed=False),
        max_refused=config.aggregation.max_refused,
    )


def prepare_data(config: RunConfig) -> FederatedDataset:
    """The configured dataset, once the configured model is known to fit in memory (so a
    model far too large is refused before a run directory is touched)."""
    data = build_dataset(config)
    if config.model.factory is None and config.workload is None:
        check_model_memory(config, build_workload(config, data))
    return data


def run_experiment(
    config: RunConfig,
    out_dir: Path,
    listener: RoundListener | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    data: FederatedDataset | None = None,
) -> SimulationResult:
    """Run the configured simulation and write the run directory; the server state is
    checkpointed in it after every round, so ``resume=True`` continues a killed run.

    ``data`` is the configured dataset when already built (:func:`prepare_data`). The
    directory is locked for this process while the run lasts (another live run there is
    refused with RunDirInUse). Without ``resume``, a non-empty ``out_dir`` is refused
    (FedforgeError) unless ``overwrite`` is given, which replaces a previous run directory."""
    started = datetime.now().astimezone()
    data = data or prepare_data(config)
    if resume or held_here(out_dir):  # held: the caller prepared it (the command line)
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = hold(out_dir)
    else:
        lock = prepare_out_dir(out_dir, overwrite=overwrite)
    with lock:
        (out_dir / "config.toml").write_text(simulation_toml(config))  # first: resumable
        record = start_provenance(
            out_dir,
            provenance(config, backend=config.runtime.backend, device=None, started=started),
            resume=resume,
        )
        live = LiveLog(out_dir / LIVE)  # the dashboard's feed
        watch = RunWatch(lock, record)
        listeners = ListenerGroup([watch, live, listener])
        try:
            result = simulate_config(
                config, data, listener=listeners, state_dir=out_dir, resume=resume
            )
            lock.check()
        except BaseException as exc:
            live.stopped(exc)
            raise
        record["finished"] = datetime.now().astimezone().isoformat(timespec="seconds")
        record["stop_reason"] = result.stop_reason
        write_run_dir(out_dir, config, result, data, record)
    return result
