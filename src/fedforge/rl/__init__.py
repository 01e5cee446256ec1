"""Federated reinforcement learning: an agent's private data is its environment.

Pieces, each a small module with one job: torch dynamics of classic-control environments
(:mod:`~fedforge.rl.cartpole`, :mod:`~fedforge.rl.acrobot`, registry in :mod:`~fedforge.rl.envs`,
gymnasium's rounding in :mod:`~fedforge.rl.libm`),
per-agent physical parameters (:mod:`~fedforge.rl.physics`), the categorical MLP policy
(:mod:`~fedforge.rl.policy`), trajectory collectors (:mod:`~fedforge.rl.collect` vectorized in
torch, :mod:`~fedforge.rl.gym_collect` on gymnasium itself), policy-gradient estimators
(:mod:`~fedforge.rl.estimators`), FedPG-BR's server pieces (:mod:`~fedforge.rl.fedpg_br`),
faulty agents (:mod:`~fedforge.rl.faults`), the penalty toward the global policy
(:mod:`~fedforge.rl.penalty`), an agent's work in a round (:mod:`~fedforge.rl.local`) and the
plain single-agent gymnasium baseline (:mod:`~fedforge.rl.single_agent`).

gymnasium (the ``fedforge[rl]`` extra) is imported only by the gymnasium collector and the
plain single-agent loop; everything else runs on torch alone.
"""
