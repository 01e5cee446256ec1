"""FedPG-BR as a fedforge algorithm: the agents' side is FedPG's (each reports its gradient
estimate at the global policy, :mod:`fedforge.rl.workload`), the Byzantine filter is the
``fedpg_br`` gather rule (``aggregation.kind``), and the server update runs SCSG on the
server's own environment (:func:`~fedforge.rl.fedpg_br.scsg_inner_loop`) from the global
policy, along the filtered mean. The server's environment has gymnasium's default physics;
its trajectories are drawn from the run seed and the round, so a resumed run repeats them.
Each SCSG step is a step of the server optimizer (``server.optimizer``, ``server.lr``; Adam with
lr 1e-3 in the authors' code, ``codes/agent.py`` and ``codes/options.py``) along the SCSG
direction, its state kept in the server state.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fedforge.aggregate.kinds import Aggregate
from fedforge.aggregate.server_opt import FedAdam, ServerOptimizer
from fedforge.algorithms.base import RoundContext, ServerState
from fedforge.algorithms.fedavg import FedAvg
from fedforge.config.rl import RLConfig
from fedforge.core.rng import Purpose, RngStreams
from fedforge.rl.collect import collect
from fedforge.rl.envs import batch_env
from fedforge.rl.estimators import Estimator
from fedforge.rl.fedpg_br import inner_steps, scsg_inner_loop
from fedforge.rl.policy import Policy, Tensors, mlp, stack
from fedforge.rl.trajectories import Trajectories

SERVER_STREAM = 4  # the server's inner steps and trajectories: Purpose.ENVIRONMENT, 4, round


@dataclass(frozen=True)
class FedPGBR(FedAvg):
    """FedPG-BR's server step; ``batch_size`` is the agents' B, ``mini_batch`` the server's
    b trajectories per SCSG step, each a step of ``server_optimizer``; ``max_steps`` caps the
    geometric number of steps."""

    env_id: str = "CartPole-v1"
    horizon: int = 500
    hidden: tuple[int, ...] = (16, 16)
    estimator: Estimator = field(default_factory=Estimator)
    batch_size: int = 10
    mini_batch: int = 4
    max_steps: int = 20
    seed: int = 0

    def server_update(
        self, state: ServerState, aggregate: Aggregate, context: RoundContext
    ) -> ServerState:
        env = batch_env(self.env_id)
        policy = Policy(mlp(env.obs_dim, env.num_actions, self.hidden))
        theta0 = {n: torch.from_numpy(np.array(a, np.float32)) for n, a in state.params.items()}
        kept = aggregate.count - len(aggregate.excluded)
        mu = (
            {n: torch.from_numpy(np.array(aggregate.arrays[n], np.float32)) for n in theta0}
            if kept > 0
            else None  # the filter kept nobody: the server's own gradient alone
        )
        rng = RngStreams(self.seed).generator(Purpose.ENVIRONMENT, SERVER_STREAM, context.round)
        steps = min(inner_steps(self.batch_size, self.mini_batch, rng), self.max_steps)
        physics = env.default_physics().reshape(1, -1)
        draws = itertools.count()

        def sample(params: Tensors) -> Trajectories:
            stream = np.random.SeedSequence(
                entropy=self.seed, spawn_key=(SERVER_STREAM, context.round, next(draws))
            )
            return collect(
                env, policy, stack([params]), physics, [stream], self.mini_batch, self.horizon
            )

        opt_state = state.optimizer_state

        def step(params: Tensors, direction: Tensors) -> Tensors:
            nonlocal opt_state
            arrays = {n: t.detach().numpy() for n, t in params.items()}
            update = {n: t.detach().numpy() for n, t in direction.items()}
            new, opt_state = self.server_optimizer.step(arrays, update, opt_state)
            return {n: torch.from_numpy(np.asarray(a, np.float32)) for n, a in new.items()}

        theta = scsg_inner_loop(policy, theta0, mu, steps, sample, self.estimator, step)
        params = {n: t.detach().numpy().astype(state.params[n].dtype) for n, t in theta.items()}
        return replace(state, params=params, optimizer_state=opt_state)


def fedpg_br(rl: RLConfig, seed: int, server_optimizer: ServerOptimizer | None = None) -> FedPGBR:
    """FedPG-BR's server for the agents ``rl`` describes (SCSG steps: ``server_optimizer``,
    by default the authors' Adam with lr 1e-3)."""
    return FedPGBR(
        server_optimizer=server_optimizer or FedAdam(lr=1e-3, beta2=0.999),
        env_id=rl.env,
        horizon=rl.max_episode_steps,
        hidden=tuple(rl.hidden),
        estimator=Estimator(rl.estimator, rl.discount, rl.baseline),
        batch_size=rl.episodes,
        mini_batch=rl.mini_batch,
        max_steps=rl.max_inner_steps,
        seed=seed,
    )
