"""Federated RL as a fedforge :class:`~fedforge.Workload`: an agent's data is its environment.

``data(site)`` gives agent ``site.index`` (or, deployed, the agent its own ``[rl]`` names) an
:class:`Agent`: the environment id, the horizon, its physical parameters (drawn from
``rl.spread`` by :func:`~fedforge.rl.physics.agent_physics`, or given as ``rl.physics``) and
its fault, if it is one of the faulty agents. The workload is opaque: fedforge hands the
agent to ``train`` and ``evaluate`` unread, and only the policy's change leaves the agent.

``train`` runs the agent's round on gymnasium itself (:func:`~fedforge.rl.gym_collect.
collect_gym`): under ``fedavg`` :func:`~fedforge.rl.local.local_update` from the global policy
(the record is the new policy minus the global one, as for any FedAvg client); under
``fedpg`` and ``fedpg_br`` :func:`~fedforge.rl.local.estimate_gradients` at the global policy
(the record is the gradient estimate: the module is set to ``global + g``, so ``local -
global`` is ``g`` and the server's optimizer steps along the mean). A faulty agent corrupts
its record as :mod:`fedforge.rl.faults` says. ``evaluate`` is the global policy's mean return
on the agent's environment; ``test()`` the held-out physics (central evaluation, on the torch
dynamics, equal to gymnasium's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from fedforge.config.rl import RLConfig
from fedforge.core.errors import ConfigError
from fedforge.core.rng import Purpose, RngStreams
from fedforge.rl.collect import collect
from fedforge.rl.envs import batch_env
from fedforge.rl.estimators import Estimator
from fedforge.rl.faults import FaultKind, faulty_reports
from fedforge.rl.gym_collect import collect_gym
from fedforge.rl.local import Collector, LocalRL, estimate_gradients, evaluate, local_update
from fedforge.rl.physics import EnvSpec, agent_physics, heldout_physics
from fedforge.rl.policy import Policy, Tensors, mlp, stack, unstack
from fedforge.workload.base import Site, TrainConfig, Workload

RETURN = "episode_return"  # the metric: mean undiscounted return
TRAJECTORIES = "trajectories"  # the metric: trajectories the agent collected this round
FAULT_STREAM = 3  # a faulty agent's noise: Purpose.ENVIRONMENT, 3, round seed


@dataclass(frozen=True)
class Agent:
    """One agent's private data: its environment and physics, its id, its fault (if any)."""

    env_id: str
    horizon: int
    physics: tuple[float, ...]
    agent: int
    fault: FaultKind | None = None


@dataclass(frozen=True)
class HeldOut:
    """The held-out physics the global policy is scored on (central evaluation)."""

    env_id: str
    horizon: int
    physics: tuple[tuple[float, ...], ...]


def env_spec(rl: RLConfig) -> EnvSpec:
    """The agents' environment distribution of ``rl`` (its ranges checked)."""
    try:
        return EnvSpec(
            env_id=rl.env,
            max_episode_steps=rl.max_episode_steps,
            spread=rl.spread,
            heldout_spread=rl.heldout_spread,
            heldout=rl.heldout,
        )
    except ValueError as exc:
        raise ConfigError(f"rl: {_first_line(exc)}") from None


def _first_line(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(str(e.get("msg", e)) for e in errors())
    return str(exc).splitlines()[0]


def agent_of(rl: RLConfig, seed: int, index: int) -> Agent:
    """Agent ``index`` of a simulation (or of a deployment, its client id), unless ``rl``
    names the agent (``rl.agent``: a deployed agent's own configuration); ``rl.physics``
    overrides the drawn parameters."""
    spec = env_spec(rl)
    env = spec.env
    agent = rl.agent if rl.agent is not None else (index if index >= 0 else None)
    if agent is None and not rl.physics:
        raise ConfigError(
            "a deployed agent needs its environment: set rl.agent (its draw from rl.spread) "
            "or rl.physics (its own parameters)"
        )
    row = agent_physics(spec, [agent if agent is not None else 0], seed)[0].tolist()
    for name, value in rl.physics.items():
        if name not in env.parameters:
            raise ConfigError(
                f"rl.physics: {rl.env} has no physical parameter {name!r}; choose from "
                f"{', '.join(env.parameters)}"
            )
        if not (np.isfinite(value) and value > 0):
            raise ConfigError(f"rl.physics.{name}: need a finite positive value, got {value}")
        row[env.parameters.index(name)] = float(value)
    number = agent if agent is not None else -1
    fault = rl.fault if 0 <= number < rl.faulty else None
    return Agent(rl.env, rl.max_episode_steps, tuple(row), number, fault)


@dataclass(frozen=True)
class AgentWork:
    """What ``train`` and ``evaluate`` do: the method, the local work, how agents collect."""

    method: str
    local: LocalRL
    eval_episodes: int
    collector: Collector = collect_gym

    def train(self, model: nn.Module, agent: Agent, config: TrainConfig) -> dict[str, float]:
        """The agent's round from the global policy in ``model``, on gymnasium; ``model``
        ends at ``global + record`` (see the module docstring)."""
        [(params, metrics)] = self.rounds(model, [agent], [config], self.collector)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(params[name])
        return metrics

    def train_cohort(
        self, model: nn.Module, agents: list[Agent], configs: list[TrainConfig]
    ) -> list[tuple[Tensors, dict[str, float]]]:
        """Every agent's round at once: their environments stepped as one tensor program on
        the torch dynamics (gymnasium's, bit for bit on the CPU), the policies vmapped."""
        return self.rounds(model, agents, configs, collect)

    def rounds(
        self,
        model: nn.Module,
        agents: list[Agent],
        configs: list[TrainConfig],
        collector: Collector,
    ) -> list[tuple[Tensors, dict[str, float]]]:
        """The agents' rounds from the global policy (the configs' ``global_params``):
        per agent, ``global + record`` and its metrics."""
        for agent in agents:
            if not isinstance(agent, Agent):
                raise ConfigError(
                    f"the RL workload's site is a {type(agent).__name__}, not an Agent"
                )
        kinds = {(a.env_id, a.horizon) for a in agents}
        if len(kinds) != 1:
            raise ConfigError("a cohort of agents must share one environment and horizon")
        env_id, horizon = kinds.pop()
        env = batch_env(env_id)
        policy = Policy(model)
        names = [n for n, _ in model.named_parameters()]
        start = {n: configs[0].global_params[n].detach().clone() for n in names}
        stacked = stack([start] * len(agents))
        physics = torch.tensor([a.physics for a in agents], dtype=torch.float64)
        randomly = [a.fault == "random_action" for a in agents]
        mask = torch.tensor(randomly) if any(randomly) else None
        seeds = [c.seed for c in configs]
        if self.method == "fedavg":
            local = replace(self.local, horizon=horizon, lr=configs[0].lr)
            result = local_update(
                local, env, policy, stacked, start, physics, seeds, mask, collector=collector
            )
            changes = [{n: p[n] - start[n] for n in names} for p in unstack(result.params)]
            returns, used = result.mean_return.tolist(), result.trajectories
        else:
            streams = [np.random.SeedSequence(entropy=s) for s in seeds]
            grads, traj = estimate_gradients(
                env, policy, stacked, physics, streams, self.local.episodes, horizon,
                self.local.estimator, mask, collector=collector,
            )  # fmt: skip
            changes = unstack(grads)
            returns, used = traj.returns.mean(dim=-1).tolist(), self.local.episodes
        out = []
        for agent, config, change, mean_return in zip(
            agents, configs, changes, returns, strict=True
        ):
            if agent.fault in ("random_noise", "sign_flip"):
                change = _corrupt(change, agent.fault, config.seed)
            params = {n: (start[n] + change[n]).to(start[n].dtype) for n in names}
            metrics = {"train_loss": -mean_return, RETURN: mean_return, TRAJECTORIES: float(used)}
            out.append((params, metrics))
        return out

    def evaluate(self, model: nn.Module, site: object) -> dict[str, float]:
        """The policy's mean return on an agent's environment or on the held-out physics."""
        if isinstance(site, Agent):
            rows, horizon, env_id = [site.physics], site.horizon, site.env_id
            seed, collector = max(site.agent, 0), self.collector
        elif isinstance(site, HeldOut):
            rows, horizon, env_id = list(site.physics), site.horizon, site.env_id
            seed, collector = 0, collect  # the server's own: torch dynamics
        else:
            raise ConfigError(f"the RL workload cannot evaluate on a {type(site).__name__}")
        params = {n: p.detach() for n, p in model.named_parameters()}
        physics = torch.tensor(rows, dtype=torch.float64)
        returns = evaluate(
            batch_env(env_id), Policy(model), params, physics, self.eval_episodes, horizon,
            seed=seed, greedy=False, collector=collector,
        )  # fmt: skip
        return {RETURN: float(returns.mean())}


def _corrupt(change: Tensors, fault: FaultKind, seed: int) -> Tensors:
    """A faulty agent's record: its honest ``change`` transformed (one flat row)."""
    names = list(change)
    row = torch.cat([change[n].reshape(-1) for n in names]).numpy()[None, :]
    rng = RngStreams(seed).generator(Purpose.ENVIRONMENT, FAULT_STREAM)
    bad = torch.from_numpy(np.ascontiguousarray(faulty_reports(fault, row, rng)[0]))
    out, at = {}, 0
    for name in names:
        size = change[name].numel()
        out[name] = bad[at : at + size].reshape(change[name].shape).to(change[name].dtype)
        at += size
    return out


def rl_workload(rl: RLConfig, seed: int) -> Workload:
    """The workload ``[rl]`` describes (its sites: ``rl.agents`` agents)."""
    spec = env_spec(rl)
    env = spec.env
    if rl.penalty != "none" and rl.method != "fedavg":
        raise ConfigError(
            f"rl.penalty = {rl.penalty!r} penalizes local steps toward the global policy: "
            f"rl.method = {rl.method!r} takes none (use fedavg)"
        )
    estimator = Estimator(rl.estimator, rl.discount, rl.baseline)
    local = LocalRL(
        estimator,
        rl.episodes,
        rl.max_episode_steps,
        rl.iterations,
        1.0,  # replaced by client.lr each round
        rl.optimizer,
        kl=rl.penalty_coef if rl.penalty == "kl" else 0.0,
        prox=rl.penalty_coef if rl.penalty == "prox" else 0.0,
    )
    work = AgentWork(rl.method, local, rl.eval_episodes)
    hidden = tuple(rl.hidden)

    def model() -> nn.Module:
        return mlp(env.obs_dim, env.num_actions, hidden)

    def data(site: Site) -> Agent:
        return agent_of(rl, seed, site.index)

    def test() -> HeldOut | None:
        if not rl.heldout:
            return None
        rows = heldout_physics(spec, seed)
        return HeldOut(rl.env, rl.max_episode_steps, tuple(tuple(r) for r in rows.tolist()))

    return Workload(
        model=model,
        data=data,
        train=work.train,
        train_cohort=work.train_cohort,
        test=test,
        sites=rl.agents,
        metrics=(RETURN, TRAJECTORIES),
        schema=schema(rl),
        name=f"rl:{rl.env}",
        opaque=True,
        evaluate=work.evaluate,
        evaluate_metrics=(RETURN,),
    )


def schema(rl: RLConfig) -> Mapping[str, str]:
    """What server and agents must agree on (compared in the handshake)."""
    return {
        "rl.env": rl.env,
        "rl.method": rl.method,
        "rl.hidden": ",".join(map(str, rl.hidden)),
    }
