"""What a client does with a task, in every runtime: the same code in simulation and on a
deployed client.

``fit`` runs the algorithm's :class:`~fedforge.train.program.LocalProgram` one step at a time,
then its ``finish`` and the client side of the update stages; ``evaluate`` scores the global
model on the client's held-out split. Client state is handed in and returned, so the runtime
decides where it lives (the simulation's store, or the deployed client's disk).

With secure aggregation, ``fit`` keeps the record in the client's state (a *session*, its
entries prefixed ``secagg/``) and sends only its example count and metrics; the four
secure-aggregation steps of the same round then read and update that session.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from fedforge.algorithms.base import Algorithm
from fedforge.algorithms.fedavg import FedAvg
from fedforge.compress.downlink import decode_broadcast
from fedforge.core.errors import ConfigError, FedforgeError
from fedforge.core.params import Params
from fedforge.core.records import EVALUATE, FIT, Record, Task
from fedforge.data.federated import ClientData
from fedforge.privacy.dp_sgd import (
    SampleDP,
    add_steps,
    dp_sgd_labels,
    ledger_epsilon,
    train_dp_sgd,
)
from fedforge.runtime.client_state import ClientStateStore
from fedforge.secagg.client import SecAggClient
from fedforge.secagg.protocol import SESSION, STEPS
from fedforge.secagg.session import Session, keep
from fedforge.stages.base import STAGE_STATE, StageChain
from fedforge.train.evaluate import evaluate
from fedforge.train.program import INITIAL_LOSS, Tensors, batch_order, task_epochs
from fedforge.train.site_cohort import Trained
from fedforge.train.torch_model import TorchModel
from fedforge.train.user_loop import (
    SiteEvaluation,
    UserLoop,
    loop_problem,
    proximal_mu,
    run_evaluate,
    run_loop,
)

DP_SGD_STEPS = "dp_sgd/steps"  # the client's DP-SGD steps so far, kept in its state
DP_SGD_LEDGER = "dp_sgd/ledger"  # ... by (sampling rate, noise multiplier): rows of 3
LATEST = 1 << 62  # a round after every round: ``store.get(cid, LATEST)`` is the newest state
DP_SGD_EPSILON = "dp_sgd.epsilon"  # the metric: the client's epsilon after this round
PERSONAL_ACCURACY = "personal_accuracy"  # evaluate metrics of a personalized algorithm
PERSONAL_LOSS = "personal_loss"


def to_tensors(arrays: Params, device: torch.device | None = None) -> Tensors:
    """Tensors sharing memory with the arrays where possible (copies read-only ones)."""
    out = {}
    for name, arr in arrays.items():
        a = arr if arr.flags.writeable else arr.copy()
        out[name] = torch.from_numpy(np.ascontiguousarray(a)).to(device or "cpu")
    return out


def to_arrays(tensors: Tensors) -> Params:
    return {name: t.detach().cpu().numpy() for name, t in tensors.items()}


def without_session(state: Params) -> Params:
    """``state`` without its secure-aggregation session."""
    return {k: v for k, v in state.items() if not k.startswith(SESSION)}


def session_of(state: Params | None) -> Session | None:
    """The secure-aggregation session in ``state`` (None: there is none)."""
    session = {k[len(SESSION) :]: v for k, v in (state or {}).items() if k.startswith(SESSION)}
    return session or None


def torch_seed(task_seed: int) -> int:
    return task_seed & ((1 << 63) - 1)


class ClientApp:
    """Answers tasks for one model and algorithm."""

    def __init__(
        self,
        algorithm: Algorithm,
        module: torch.nn.Module,
        stages: StageChain | None = None,
        sample_dp: SampleDP | None = None,
        secure: SecAggClient | None = None,
        loop: UserLoop | None = None,
        site_eval: SiteEvaluation | None = None,
    ) -> None:
        self.algorithm = algorithm
        self.stages = stages or StageChain()
        self.model = TorchModel(module)
        self.module = module
        # The trained parameters (looked up once: it walks modules); frozen ones stay local.
        self.parameters = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.trainable = list(self.parameters)
        self.program = algorithm.program()
        if sample_dp is not None and type(algorithm) is not FedAvg:
            raise ConfigError(
                "DP-SGD (sample-level DP) trains every parameter with plain local SGD: it "
                f"cannot run {type(algorithm).__name__}'s local program (use FedAvg, with "
                "any server optimizer)"
            )
        self.sample_dp = sample_dp  # DP-SGD inside the client instead of the plain program
        if loop is not None:
            name, refusal = type(algorithm).__name__, algorithm.loop_refusal
            problem = loop_problem(name, refusal, self.program, loop, sample_dp is not None)
            if problem:
                raise ConfigError(problem)
        self.loop = loop  # your training function instead of the built-in program
        self.site_eval = site_eval  # your evaluation function instead of loss and accuracy
        if site_eval is not None and algorithm.personalized:
            raise ConfigError(
                f"{type(algorithm).__name__} evaluates a personal model beside the global one "
                "with the built-in loss and accuracy: it cannot run a workload's evaluate"
            )
        self.secure = secure  # secure aggregation: the record stays here until masked
        sample = {n: np.zeros(1, np.float32) for n in self.trainable}
        # DP-SGD keeps the client's own privacy ledger (its steps so far) in its state;
        # secure aggregation its session.
        self.stateful = (
            bool(algorithm.init_client_state(sample))
            or sample_dp is not None
            or secure is not None
            or self.stages.keeps_client_state  # error feedback's residual
        )

    @property
    def labels(self) -> dict[str, str]:
        """What the history records about how clients train (DP-SGD and its noise)."""
        return dp_sgd_labels(self.sample_dp) if self.sample_dp else {}

    @property
    def extra_metrics(self) -> tuple[str, ...]:
        """Metrics this app's fit records carry beyond ``train_loss``."""
        loop = self.loop.metrics if self.loop is not None else ()
        return (DP_SGD_EPSILON,) if self.sample_dp else loop

    def stored_state(self, task: Task, store: ClientStateStore) -> Params | None:
        """The client's state ``task`` starts from (fit tasks of a stateful algorithm, and
        secure-aggregation steps, and evaluate tasks of a personalized one: its newest state;
        None otherwise, or before the client's first task)."""
        if task.stage in STEPS or (task.stage == EVALUATE and self.algorithm.personalized):
            return store.get(task.client_id, task.round + 1)
        if task.stage != FIT or not self.stateful:
            return None
        state = store.get(task.client_id, task.round)
        if state is not None and self.secure is not None:
            state = without_session(state)  # a session an earlier round left unfinished
        if self.sample_dp is not None:
            # The DP-SGD ledger only grows: a retried or replayed round adds to the newest
            # count (those steps were trained and sent), not to the one the round started from.
            newest = store.get(task.client_id, LATEST) or {}
            ledger = {k: newest[k] for k in (DP_SGD_STEPS, DP_SGD_LEDGER) if k in newest}
            if ledger:
                state = {**(state or {}), **ledger}
        return state

    def handle(
        self, task: Task, data: ClientData, state: Params | None, trained: Trained | None = None
    ) -> tuple[Record, Params | None]:
        """The reply to ``task``; ``trained``: a fit's training already done (a cohort's)."""
        if task.stage in (FIT, EVALUATE):  # a compressed broadcast back to float32
            task = replace(task, shared=decode_broadcast(dict(task.shared)))
        if task.stage == FIT and trained is not None:
            return self.fit(task, data, state, trained)
        if task.stage == FIT:
            return self.fit(task, data, state)
        if task.stage == EVALUATE:
            return self.evaluate(task, data, state), None
        if task.stage in STEPS:
            return self.secure_step(task, state)
        raise FedforgeError(f"unknown task stage {task.stage!r}")

    def fit(
        self, task: Task, data: ClientData, state: Params | None, trained: Trained | None = None
    ) -> tuple[Record, Params | None]:
        names = self.model.names
        shared = to_tensors(dict(task.shared))
        state = dict(state) if state is not None else None
        ledger = state.pop(DP_SGD_STEPS, None) if state is not None else None
        segments = state.pop(DP_SGD_LEDGER, None) if state is not None else None
        stage_state = {k: v for k, v in (state or {}).items() if k.startswith(STAGE_STATE)}
        state = {k: v for k, v in (state or {}).items() if k not in stage_state} or None
        if not state:
            state = self.algorithm.init_client_state({n: task.shared[n] for n in self.trainable})
        own = {k: t.clone() for k, t in to_tensors(state).items()}  # finish may overwrite it
        self.model.set_params({n: task.shared[n] for n in names})
        self.model.set_frozen_offsets(task.shared)
        metrics: dict[str, float] = {}
        if self.program.initial_loss:  # the global model's loss on the local data
            own[INITIAL_LOSS] = torch.tensor(
                evaluate(self.model, data.train).loss, dtype=torch.float64
            )
        starts = self.program.starts(list(own))
        with torch.no_grad():  # FedPer's head starts from the client's own
            for name, param in self.module.named_parameters():
                if name in starts:
                    param.copy_(own[starts[name]])
        personal = {
            n: own[key].clone().requires_grad_(True) for n, key in starts.items() if n not in names
        }
        if trained is not None:  # trained with its cohort (train/site_cohort.py)
            with torch.no_grad():
                for name, param in self.module.named_parameters():
                    param.copy_(trained.params[name])
            steps, metrics = trained.steps, dict(trained.metrics)
        elif self.loop is not None:
            steps, metrics = run_loop(
                self.loop,
                self.module,
                data.train,
                self.algorithm.local,
                epochs=task_epochs(task.scalars, self.algorithm.local),
                round_number=task.round,
                seed=torch_seed(task.seed),
                mu=proximal_mu(self.program),
                shared=shared,
                site=data.site,
            )
        elif data.site is not None:
            raise FedforgeError("an opaque site trains only with the workload's training function")
        elif self.sample_dp is None:
            steps, metrics["train_loss"] = self._train(task, data, shared, own, personal)
        else:
            x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
            configured = self.algorithm.local  # a straggler runs fewer epochs
            local = replace(configured, epochs=task_epochs(task.scalars, configured))
            result = train_dp_sgd(
                self.module, x, y, local, self.sample_dp, task.seed, self.sample_dp.seeded
            )
            steps, metrics["train_loss"] = result.steps, result.train_loss
            before = int(ledger[0]) if ledger is not None else 0
            total_steps = steps + before
            if segments is None:  # (a state from before the ledger: its steps at these settings)
                segments = np.array([[result.sample_rate, self.sample_dp.noise_multiplier, before]])
            segments = add_steps(
                segments, result.sample_rate, self.sample_dp.noise_multiplier, steps
            )
            metrics[DP_SGD_EPSILON] = ledger_epsilon(segments, len(data.train), self.sample_dp)
        with torch.no_grad():
            local_state = self.model.tensors()
            delta = {n: local_state[n] - shared[n] for n in names}
            for n, p in personal.items():  # Ditto's personal copy, as a change from the model
                delta[n] = p.detach() - shared[self.program.base_name(n)]
            arrays, new_own = self.algorithm.finish(delta, shared, own, torch.tensor(float(steps)))
        record = Record(task.client_id, len(data.train), to_arrays(arrays), metrics=metrics)
        batch, stage_states = self.stages.encode(
            record.as_batch(), task.scalars, [task.seed], [stage_state]
        )
        encoded = batch.row(0)
        new_state = {**(to_arrays(new_own) if new_own else {}), **stage_states[0]}
        if self.sample_dp is not None:
            new_state[DP_SGD_STEPS] = np.array([total_steps], np.int64)
            assert segments is not None
            new_state[DP_SGD_LEDGER] = segments
        if self.secure is not None:
            return self.keep_record(encoded, new_state, task.round)
        return encoded, (new_state or None)

    def keep_record(
        self, record: Record, state: Params, round_number: int
    ) -> tuple[Record, Params]:
        """Secure aggregation: the fit reply (no arrays) and the client's new state holding
        the record in its session for round ``round_number``."""
        assert self.secure is not None
        reply, session = keep(record, round_number, withhold_metrics=self.secure.withhold_metrics)
        return reply, {**state, **{SESSION + k: v for k, v in session.items()}}

    def secure_step(self, task: Task, state: Params | None) -> tuple[Record, Params]:
        """One secure-aggregation step on the session in ``state``; the rest of the state
        (an algorithm's, a DP-SGD ledger) is kept as it is."""
        answer = self.secure_chunk([task], [state])[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def secure_chunk(
        self, tasks: Sequence[Task], states: Sequence[Params | None]
    ) -> list[tuple[Record, Params] | Exception]:
        """One secure-aggregation step for many clients at once (the vectorized runtime;
        ``secure_step`` is a chunk of one): each client's reply and new state, or the
        exception that failed it alone."""
        if self.secure is None:
            why = "this client does not run secure aggregation"
            return [FedforgeError(f"{t.stage}: {why}") for t in tasks]
        sessions = [session_of(state) for state in states]
        answers = self.secure.handle_chunk(tasks, sessions)
        out: list[tuple[Record, Params] | Exception] = []
        for state, answer in zip(states, answers, strict=True):
            if isinstance(answer, Exception):
                out.append(answer)
                continue
            record, session = answer
            kept = without_session(state or {})
            out.append((record, {**kept, **{SESSION + k: v for k, v in (session or {}).items()}}))
        return out

    def _train(
        self, task: Task, data: ClientData, shared: Tensors, own: Tensors, personal: Tensors
    ) -> tuple[int, float]:
        """The algorithm's local program on the module's parameters (and the personal copy,
        trained beside them): (steps, mean loss)."""
        params: Tensors = {**self.parameters, **personal}
        opt_state = self.program.init({n: p.detach() for n, p in params.items()})
        x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
        local = self.algorithm.local
        total, seen, steps = 0.0, 0, 0
        if not self.module.training:  # (train() walks every submodule)
            self.module.train()
        with torch.random.fork_rng(devices=[]):
            # Dropout draws from the client's stream (the CPU generator only: seeding every
            # device through torch.manual_seed costs more than a small client's training).
            torch.default_generator.manual_seed(torch_seed(task.seed))
            # The local epochs, after a head-first schedule's head-only ones (FedRep).
            passes = self.program.passes(task_epochs(task.scalars, local))
            head_steps = self.program.head_steps(len(data.train))
            for batch in batch_order(len(data.train), local.batch_size, passes, task.seed):
                idx = torch.from_numpy(batch)
                opt_state, loss = self.program.eager_step(
                    self.module, params, opt_state, shared, own, x[idx], y[idx], steps < head_steps
                )
                total += float(loss) * len(batch)
                seen += len(batch)
                steps += 1
        return steps, total / max(seen, 1)

    def evaluate(self, task: Task, data: ClientData, state: Params | None = None) -> Record:
        """Score the global model on the held-out split; a personalized algorithm's client
        also scores its personal model (from ``state``, else the one it would start with)."""
        if data.holdout is None or len(data.holdout) == 0:
            raise FedforgeError("this client has no held-out data to evaluate on")
        params = {n: task.shared[n] for n in self.model.names}
        self.model.set_params(params)
        self.model.set_frozen_offsets(task.shared)
        if self.site_eval is not None:  # your evaluation: on the site's object or examples
            site = data.site if data.site is not None else data.holdout
            scores = run_evaluate(self.site_eval, self.module, site)
            return Record(task.client_id, len(data.holdout), {}, metrics=scores)
        if data.site is not None:
            raise FedforgeError("an opaque site is evaluated only by the workload's evaluate")
        result = evaluate(self.model, data.holdout)
        metrics = {"loss": result.loss, "accuracy": result.accuracy}
        if self.algorithm.personalized:
            if not state:
                state = self.algorithm.init_client_state({n: params[n] for n in self.trainable})
            self.model.set_params(self.algorithm.personalize(params, state))
            own = evaluate(self.model, data.holdout)
            metrics.update({PERSONAL_LOSS: own.loss, PERSONAL_ACCURACY: own.accuracy})
        return Record(task.client_id, len(data.holdout), {}, metrics=metrics)
