"""Every release is paid for as it happened: a resumed run that changes its settings composes
the old segments with the new ones (dp-accounting, computed here directly for each
mechanism), never reports less than it had spent, and refuses what cannot be composed; local
DP counts every record the server saw; DP-SGD's final figure is the largest so far."""

from __future__ import annotations

from pathlib import Path

import pytest
from dp_accounting import dp_event, privacy_accountant
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedforge import simulate
from fedforge.aggregate.kinds import Aggregate
from fedforge.algorithms.fedavg import FedAvg
from fedforge.config import load_config
from fedforge.core.errors import ConfigError
from fedforge.data.federated import FederatedDataset
from fedforge.experiment import build_dataset, build_stages, simulate_config
from fedforge.privacy.accounting import PLD_DISCRETIZATION, SamplingScheme
from fedforge.privacy.noise import NoiseSource
from fedforge.report.history import DP_SGD_MAX, privacy_text
from fedforge.runtime.driver import RoundListener
from fedforge.stages.clip import AdaptiveClip, FixedClip
from fedforge.stages.dp_noise import CentralGaussian, DistributedGaussian, LocalGaussian
from fedforge.train.program import LocalSGD
from tests.conftest import small_mlp

DELTA = 1e-5
G = dp_event.GaussianDpEvent
ONE = Aggregate({}, {}, 1, 1.0, client_ids=[0])


def pld(*events: tuple[dp_event.DpEvent, int]) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(
        value_discretization_interval=PLD_DISCRETIZATION
    )
    for event, count in events:
        accountant.compose(event, count)
    return float(accountant.get_epsilon(DELTA))


def replace_one_rdp(*events: tuple[dp_event.DpEvent, int]) -> float:
    relation = privacy_accountant.NeighboringRelation.REPLACE_ONE
    accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    for event, count in events:
        accountant.compose(event, count)
    return float(accountant.get_epsilon(DELTA))


def releases(stage: CentralGaussian | LocalGaussian, state: dict[str, float], n: int):  # type: ignore[no-untyped-def]
    metrics: dict[str, float] = {}
    for _ in range(n):
        state, metrics = stage.finish_round(state, ONE)
    return state, metrics


def test_full_participation_thinned_by_over_selection_costs_two_clip_norms() -> None:
    """Over-selection that draws all 20 keeps the fastest 5 of everyone: a client added can
    evict another, so the sum moves by 2C (the Gaussian of z / 2), and it divides by the 5."""
    config = load_config(
        None,
        [
            "privacy.mode=central", "privacy.noise_multiplier=1", "clock.enabled=true",
            "server.clients_per_round=5", "clock.over_selection=4",
            "partition.num_clients=20", "privacy.adaptive_clip=true", "privacy.count_stddev=1",
        ],
    )  # fmt: skip
    clip, noise = build_stages(config, 20, [10] * 20)
    assert isinstance(noise, CentralGaussian) and isinstance(clip, AdaptiveClip)
    assert noise.scheme == SamplingScheme("full", 20, keep=5)
    assert noise.epsilon_after(5) == pytest.approx(pld((G(0.5), 5)), rel=1e-6)
    assert noise.epsilon_after(5) > 28  # the reviewer's 28.37 (reported 11.48 before)
    assert noise.denominator == 5.0 and clip.expected_clients == 5.0
    assert noise.expected_summed == 5.0


def test_a_resume_that_changes_the_sampling_composes_both_segments() -> None:
    """3 releases drawing 10 of 20 (over-selection 2, K = 5), resumed drawing 5 of 20:
    replace-one RDP of both, not 6 releases of the second."""
    first = CentralGaussian(2.0, SamplingScheme.fixed_size(10, 20, keep=5), DELTA, 5.0)
    second = CentralGaussian(2.0, SamplingScheme.fixed_size(5, 20), DELTA, 5.0)
    state, before = releases(first, first.init_state(), 3)
    state, after = releases(second, state, 3)
    wor = dp_event.SampledWithoutReplacementDpEvent
    expected = replace_one_rdp((wor(20, 10, G(1.0)), 3), (wor(20, 5, G(1.0)), 3))
    assert after["dp.epsilon"] == pytest.approx(expected, rel=1e-9)
    assert after["dp.epsilon"] == pytest.approx(9.63, abs=0.01)  # (reported 5.97 before)
    assert after["dp.epsilon"] > before["dp.epsilon"] == pytest.approx(7.466, abs=0.01)
    assert after["dp.releases"] == 6.0


def test_a_resumed_noise_multiplier_or_rate_composes_and_never_lowers_epsilon() -> None:
    poisson = SamplingScheme("poisson", 100, rate=0.2)
    first = CentralGaussian(1.0, poisson, DELTA, 20.0)
    second = CentralGaussian(5.0, SamplingScheme("full", 100), DELTA, 100.0)
    state, before = releases(first, first.init_state(), 4)
    state, after = releases(second, state, 2)
    poisson_event = dp_event.PoissonSampledDpEvent(0.2, G(1.0))
    assert after["dp.epsilon"] == pytest.approx(pld((poisson_event, 4), (G(5.0), 2)), rel=1e-6)
    assert after["dp.epsilon"] > before["dp.epsilon"]
    # The budget check counts the ledger too.
    target = CentralGaussian(5.0, SamplingScheme("full", 100), DELTA, 100.0, target_epsilon=1.0)
    assert "privacy budget reached" in str(target.budget_problem({**state}) or "")


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (SamplingScheme.fixed_size(5, 20), SamplingScheme("poisson", 20, rate=0.25)),
        (SamplingScheme("full", 20), SamplingScheme.fixed_size(5, 20)),
    ],
)
def test_a_resume_cannot_mix_neighbouring_relations(
    first: SamplingScheme, then: SamplingScheme
) -> None:
    stage = CentralGaussian(2.0, first, DELTA, 5.0)
    state, _ = releases(stage, stage.init_state(), 3)
    with pytest.raises(ConfigError, match="cannot compose"):
        CentralGaussian(2.0, then, DELTA, 5.0).finish_round(state, ONE)


def test_local_dp_composes_a_changed_noise_multiplier_and_keeps_its_delta() -> None:
    """Two records at z = 2 then one at z = 50: the Gaussians of z / 2 composed (6.576), not
    three at z = 50 (0.228)."""
    state, _ = releases(LocalGaussian(2.0, DELTA), LocalGaussian(2.0, DELTA).init_state(), 2)
    state, metrics = releases(LocalGaussian(50.0, DELTA), state, 1)
    assert metrics["dp.epsilon"] == pytest.approx(pld((G(1.0), 2), (G(25.0), 1)), rel=2e-3)
    assert metrics["dp.releases"] == 3.0
    with pytest.raises(ConfigError, match="privacy settings changed"):
        releases(LocalGaussian(50.0, 1e-6), state, 1)
    ddp = DistributedGaussian(1.0, 1.0, DELTA, 10.0)
    ddp_state, _ = ddp.finish_round(ddp.init_state(), Aggregate({}, {"ddg.rho": 0.5}, 2, 2.0))
    with pytest.raises(ConfigError, match="privacy settings changed"):
        DistributedGaussian(1.0, 1.0, 1e-3, 10.0).finish_round(ddp_state, ONE)


def test_local_dp_counts_every_record_the_server_saw() -> None:
    """Half the clients claim more examples than they hold, so the server rejects their
    records (and refuses, then re-samples, a round in which it rejected every one): each of
    those records still left its client noised and reached the server."""
    config = load_config(
        None,
        [
            "data.dataset=digits", "partition.scheme=iid", "partition.num_clients=10",
            "model.name=logistic", "client.epochs=1", "client.batch_size=0",
            "runtime.backend=sequential", "server.clients_per_round=3", "server.rounds=8",
            "privacy.mode=local", "privacy.noise_multiplier=2.0",
            "attack.kind=label_flip", "attack.fraction=0.5", "attack.overclaim=2",
        ],
    )  # fmt: skip

    class Sent(RoundListener):
        def __init__(self) -> None:
            self.sent: dict[int, int] = {}
            self.rejected = 0

        def client_done(self, client_id: int, status: str) -> None:
            if status in ("accepted", "rejected"):
                self.sent[client_id] = self.sent.get(client_id, 0) + 1
                self.rejected += status == "rejected"

    sent = Sent()
    result = simulate_config(config, build_dataset(config), listener=sent)
    most = max(sent.sent.values())
    last = result.history[-1].metrics
    assert sent.rejected > 0
    assert last["dp.releases"] == most
    assert last["dp.epsilon"] == pytest.approx(pld((G(1.0), most)), rel=2e-3)


def test_a_round_without_records_carries_local_dp_epsilon_forward(
    small_federated: FederatedDataset,
) -> None:
    from fedforge.runtime.sampling import PoissonSampler

    result = simulate(
        small_mlp(), small_federated, rounds=6, sampler=PoissonSampler(0.1), verbose=0,
        stages=[FixedClip(0.5, report_clipped=False), LocalGaussian(1.0, DELTA)],
    )  # fmt: skip
    rounds = result.history  # (round 0: nothing spent yet)
    empty = [i for i, r in enumerate(rounds) if i and r.clients_sampled == 0]
    assert empty, "the seed should give a round in which nobody is sampled"
    assert all("dp.epsilon" in r.metrics for r in rounds[1:])
    for i in empty:
        assert rounds[i].metrics["dp.epsilon"] == rounds[i - 1].metrics.get("dp.epsilon", 0.0)
    assert rounds[-1].metrics["dp.epsilon"] > 0


def central_chain(scheme: SamplingScheme | None = None) -> list[object]:
    scheme = scheme or SamplingScheme.fixed_size(4, 10)
    return [FixedClip(0.5), CentralGaussian(1.0, scheme, DELTA, 4.0, source=NoiseSource(1))]


def local_chain() -> list[object]:
    return [FixedClip(0.5, report_clipped=False), LocalGaussian(1.0, DELTA)]


def unseeded_chain() -> list[object]:
    return [FixedClip(0.5), CentralGaussian(1.0, SamplingScheme.fixed_size(4, 10), DELTA, 4.0)]


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        (central_chain, local_chain, r"resume with the same privacy\.mode"),
        (central_chain, list, r"resume with the same privacy\.mode"),
        (list, central_chain, r"resume with the same privacy\.mode"),
        (unseeded_chain, central_chain, "seeded_noise = true"),
    ],
    ids=["central-to-local", "central-to-off", "off-to-central", "os-entropy-to-seeded"],
)
def test_a_run_resumes_in_the_privacy_mode_it_started_with(
    small_federated: FederatedDataset,
    tmp_path: Path,
    before,
    after,
    message: str,  # type: ignore[no-untyped-def]
) -> None:
    def run(stages: list[object], rounds: int) -> None:
        simulate(
            small_mlp(), small_federated, FedAvg(local=LocalSGD(lr=0.1, epochs=1, batch_size=0)),
            rounds=rounds, clients_per_round=4, stages=stages, state_dir=tmp_path,  # type: ignore[arg-type]
            resume=True, verbose=0,
        )  # fmt: skip

    run(before(), 1)
    with pytest.raises(ConfigError, match=message):
        run(after(), 2)


def test_dp_sgd_composes_a_changed_noise_multiplier_and_reports_the_largest_so_far(
    small_federated: FederatedDataset, tmp_path: Path
) -> None:
    from fedforge.privacy.dp_sgd import SampleDP, num_steps, sample_rate

    local = LocalSGD(lr=0.1, epochs=1, batch_size=8)
    reported: dict[int, float] = {}

    class Reports(RoundListener):
        def client_reported(self, cid: int, status: str, reason: str, metrics: dict) -> None:  # type: ignore[type-arg]
            if "dp_sgd.epsilon" in metrics:
                reported[cid] = metrics["dp_sgd.epsilon"]

    def run(z: float, rounds: int):  # type: ignore[no-untyped-def]
        return simulate(
            small_mlp(), small_federated, FedAvg(local=local), rounds=rounds,
            clients_per_round=10, sample_dp=SampleDP(z, 1.0, DELTA, seeded=True),
            state_dir=tmp_path, resume=True, verbose=0, listener=Reports(),
        )  # fmt: skip

    first = run(1.0, 2)
    largest = first.history[-1].metrics[DP_SGD_MAX]
    result = run(10.0, 3)  # every client trained 2 rounds at z = 1, then one at z = 10
    for cid, value in reported.items():
        n = small_federated.client_size(cid)
        q, steps = sample_rate(8, n), num_steps(local, n)
        expected = pld(
            (dp_event.PoissonSampledDpEvent(q, G(1.0)), 2 * steps),
            (dp_event.PoissonSampledDpEvent(q, G(10.0)), steps),
        )
        assert value == pytest.approx(expected, rel=1e-6), cid
    last = result.history[-1]
    assert last.metrics[DP_SGD_MAX] == max(largest, max(reported.values()))
    assert last.metrics[DP_SGD_MAX] >= largest  # never below what was reported
    assert privacy_text(last).startswith(f"eps <= {last.metrics[DP_SGD_MAX]:.3g} per client")
