"""The DP stages: clipping bounds each client, the noise has the claimed scale, adaptive
clipping finds its quantile, local noise stays on the client, and the noise source."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedforge.aggregate.kinds import Aggregate, StreamingMean
from fedforge.core.records import RecordBatch
from fedforge.privacy.accounting import SamplingScheme
from fedforge.privacy.noise import NoiseSource, gaussian_from_key, keystream_uniforms
from fedforge.stages.base import StageChain, SumContext
from fedforge.stages.clip import AdaptiveClip, FixedClip
from fedforge.stages.dp_noise import CentralGaussian, LocalGaussian

SCHEME = SamplingScheme("poisson", 1000, rate=0.01)


def batch(values: np.ndarray, examples: np.ndarray | None = None) -> RecordBatch:
    n = len(values)
    return RecordBatch(
        client_ids=np.arange(n, dtype=np.int64),
        num_examples=examples if examples is not None else np.full(n, 5, np.int64),
        arrays={"w": values.astype(np.float32)},
    )


def central(**kwargs: object) -> CentralGaussian:
    args: dict[str, object] = {
        "scheme": SCHEME,
        "denominator": 10.0,
        "source": NoiseSource(seed=7),
    }
    args.update(kwargs)
    z = args.pop("noise_multiplier", 1.0)
    return CentralGaussian(z, delta=1e-5, **args)  # type: ignore[arg-type]


def released(chain: StageChain, records: RecordBatch, norm: float) -> np.ndarray:
    """What the server releases from ``records``: client encode, decode, weights, sum, noise."""
    states = {"clip": {"norm": norm}}
    broadcast = chain.broadcast(states)
    encoded, _ = chain.encode(records, broadcast, [0] * len(records))
    decoded = chain.decode(encoded, states)
    acc = StreamingMean()
    acc.add(decoded, chain.weights(decoded, decoded.num_examples.astype(np.float64)))
    out = chain.on_sum(acc.result(), states, SumContext(3, 0, broadcast))
    return out.arrays["w"].astype(np.float64)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.lists(st.floats(-1e4, 1e4), min_size=6, max_size=6), min_size=2, max_size=6),
    replacement=st.lists(st.floats(-1e6, 1e6), min_size=6, max_size=6),
    examples=st.lists(st.integers(1, 10_000), min_size=6, max_size=6),
    weighting=st.sampled_from(["uniform", "capped"]),
)
def test_one_client_moves_the_release_by_at_most_clip_over_denominator(
    values: list[list[float]], replacement: list[float], examples: list[int], weighting: str
) -> None:
    """Whatever one client sends (and whatever sample count it claims), adding or removing it
    moves the released value by at most C / denominator, and replacing it by at most
    2C / denominator: the sensitivities the accountant assumes for each adjacency."""
    norm, denominator = 0.5, 10.0
    noise = central(denominator=denominator, weighting=weighting, weight_cap=100.0)
    chain = StageChain([FixedClip(norm), noise])
    a = np.array(values)
    counts = np.array(examples[: len(a)], np.int64)
    b = a.copy()
    b[0] = replacement
    other = counts.copy()
    other[0] = 10_000 if counts[0] < 10_000 else 1
    first = released(chain, batch(a, counts), norm)  # same seeded noise key: same noise
    replaced = released(chain, batch(b, other), norm)
    removed = released(chain, batch(a[1:], counts[1:]), norm)
    bound = norm / denominator * (1 + 1e-5)
    assert np.linalg.norm(first - removed) <= bound
    assert np.linalg.norm(first - replaced) <= 2 * bound


def test_fixed_size_sampling_accounts_the_replace_one_sensitivity() -> None:
    """Replacing a client moves the sum by up to 2C: the without-replacement event (whose
    adjacency is replace-one) must see half the noise multiplier."""
    from dp_accounting import privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    from fedforge.privacy.accounting import epsilon, round_event

    fixed = SamplingScheme("fixed", 100, sample_size=10)
    assert round_event(fixed, 2.0).event.noise_multiplier == 1.0
    accountant = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=privacy_accountant.NeighboringRelation.REPLACE_ONE
    )
    from dp_accounting import dp_event

    accountant.compose(
        dp_event.SampledWithoutReplacementDpEvent(100, 10, dp_event.GaussianDpEvent(1.0)), 20
    )
    assert epsilon(fixed, 2.0, 20, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5))


def test_the_added_noise_has_stddev_z_times_clip_over_denominator() -> None:
    noise = central(denominator=20.0)
    zeros = Aggregate({"w": np.zeros(200_000, np.float32)}, {}, count=3, total_weight=3.0)
    out = noise.on_sum(zeros, noise.init_state(), SumContext(1, 0, {"clip.norm": 2.0}))
    sample = out.arrays["w"].astype(np.float64)
    expected = 1.0 * 2.0 / 20.0
    # The sample stddev of 200,000 normals is within 1% of the truth with overwhelming odds.
    assert sample.std() == pytest.approx(expected, rel=0.01)
    assert abs(sample.mean()) < 5 * expected / np.sqrt(len(sample))
    assert stats.kstest(sample / expected, "norm").pvalue > 1e-4


def test_central_noise_divides_the_sum_by_the_fixed_denominator() -> None:
    noise = central(denominator=4.0, source=NoiseSource(seed=1))
    chain = StageChain([FixedClip(100.0), noise])
    values = np.array([[1.0, 2.0], [3.0, 4.0]])
    out = released(chain, batch(values), 100.0)
    # Noise of stddev 25 / 4 per coordinate is seeded: subtract the same draw.
    drawn = NoiseSource(seed=1).gaussian((2,), 1.0 * 100.0, "central", 3, 0, 0)
    np.testing.assert_allclose(out, (values.sum(axis=0) + drawn) / 4.0, rtol=1e-5)


def test_central_dp_releases_no_unnoised_scalar_and_accounts_each_release() -> None:
    noise = central()
    agg = Aggregate({"w": np.zeros(3, np.float32)}, {"clip.clipped": 2.0}, 2, 2.0)
    out = noise.on_sum(agg, noise.init_state(), SumContext(1, 0, {"clip.norm": 1.0}))
    assert out.scalars == {}  # fixed clipping: the clipped count is not released
    state, metrics = noise.finish_round(noise.init_state(), out)
    assert state["releases"] == 1.0
    assert metrics["dp.epsilon"] == pytest.approx(noise.epsilon_after(1))
    adaptive = central(count_stddev=5.0)
    out = adaptive.on_sum(agg, adaptive.init_state(), SumContext(1, 0, {"clip.norm": 1.0}))
    assert set(out.scalars) == {"clip.clipped"} and out.scalars["clip.clipped"] != 2.0
    assert state["noise_multiplier"] == 1.0  # what the releases were accounted with


def test_the_clipped_count_is_centred_so_one_client_moves_it_by_half() -> None:
    """Andrew et al.: each bit enters as b - 1/2, the sensitivity the noise split assumes.
    Adding a clipped or an unclipped client moves the released count by exactly 1/2."""
    noise = central(count_stddev=5.0)
    context = SumContext(1, 0, {"clip.norm": 1.0})

    def released(clipped: float, count: int) -> float:
        agg = Aggregate({"w": np.zeros(1, np.float32)}, {"clip.clipped": clipped}, count, 1.0)
        return noise.on_sum(agg, noise.init_state(), context).scalars["clip.clipped"]

    base = released(3.0, 6)
    assert released(4.0, 7) - base == pytest.approx(0.5)  # one more clipped client
    assert released(3.0, 7) - base == pytest.approx(-0.5)  # one more unclipped client
    # Without noise it would be the clipped count re-centred on the expected count (10).
    drawn = NoiseSource(seed=7).gaussian((1,), 5.0, "count", 1, 0)[0]
    assert base == pytest.approx(3.0 - 3.0 + drawn + 5.0)


def test_local_dp_keeps_the_signal_through_decode_and_aggregation() -> None:
    """The server must not re-clip a noised record: its norm is the noise's."""
    d, n = 10_000, 200
    clip = FixedClip(1.0, report_clipped=False, recheck=False)
    chain = StageChain([clip, LocalGaussian(0.5, 1e-5, source=NoiseSource(seed=2))])
    values = np.zeros((n, d))
    values[:, 0] = 1.0  # every client's update: the first unit vector (norm 1, not clipped)
    encoded, _ = chain.encode(batch(values), chain.broadcast({}), list(range(n)))
    decoded = chain.decode(encoded, {})
    acc = StreamingMean()
    acc.add(decoded, np.ones(n))
    mean = acc.result().arrays["w"].astype(np.float64)
    assert mean[0] == pytest.approx(1.0, abs=5 * 0.5 / np.sqrt(n))


def test_a_resumed_run_with_another_delta_or_calibrated_noise_is_refused() -> None:
    from fedforge.core.errors import ConfigError

    state, _ = central().finish_round(central().init_state(), Aggregate({}, {}, 1, 1.0))
    for other in (
        CentralGaussian(1.0, SCHEME, 1e-6, 10.0),  # epsilon at another delta
        central(target_epsilon=5.0, noise_multiplier=1.5),  # z calibrated for one mechanism
        central(accountant="rdp"),
    ):
        with pytest.raises(ConfigError, match="privacy settings changed"):
            other.budget_problem(state)
    assert central().budget_problem(state) is None
    # Another noise multiplier without a target is a new segment of the ledger: test_ledger.py
    assert CentralGaussian(1.5, SCHEME, 1e-5, 10.0).budget_problem(state) is None


def test_the_budget_stops_the_release_that_would_exceed_it() -> None:
    noise = central()
    target = noise.epsilon_after(3)
    limited = central(target_epsilon=target)
    assert limited.budget_problem({"releases": 2.0}) is None
    problem = limited.budget_problem({"releases": 3.0})
    assert problem is not None and "privacy budget reached" in problem


def test_adaptive_clipping_converges_to_the_target_quantile() -> None:
    """On a fixed distribution of update norms, with the noised count of DP, the norm
    settles where half the clients are unclipped: the distribution's median."""
    rng = np.random.default_rng(0)
    expected = 100
    clip = AdaptiveClip(0.01, target_quantile=0.5, learning_rate=0.2, expected_clients=expected)
    scheme = SamplingScheme("poisson", 10_000, rate=0.01)  # 100 expected clients
    noise = central(scheme=scheme, count_stddev=expected / 20, denominator=float(expected))
    state = clip.init_state()
    norms_seen = []
    for round_number in range(300):
        norms = rng.lognormal(mean=0.0, sigma=1.0, size=expected)  # median 1.0
        clipped = float((norms > state["norm"]).sum())
        agg = Aggregate({"w": np.zeros(1, np.float32)}, {"clip.clipped": clipped}, expected, 1.0)
        agg = noise.on_sum(agg, {}, SumContext(round_number, 0, {"clip.norm": state["norm"]}))
        state, _ = clip.finish_round(state, agg)
        norms_seen.append(state["norm"])
    settled = np.median(norms_seen[-100:])
    assert settled == pytest.approx(1.0, rel=0.15)
    quantile = stats.lognorm.cdf(settled, s=1.0)
    assert quantile == pytest.approx(0.5, abs=0.06)


def test_local_dp_noises_on_the_client_and_sends_no_clipped_bit() -> None:
    clip = FixedClip(1.0, report_clipped=False)
    local = LocalGaussian(2.0, 1e-5, source=NoiseSource(seed=3))
    chain = StageChain([clip, local])
    records = batch(np.zeros((4, 50_000)))
    out, _ = chain.encode(records, chain.broadcast({}), [11, 12, 13, 14])
    assert out.scalars == {}
    rows = out.arrays["w"].astype(np.float64)
    assert rows.std(axis=1) == pytest.approx(np.full(4, 2.0), rel=0.02)
    assert not np.allclose(rows[0], rows[1])  # every client its own noise
    again, _ = chain.encode(records, chain.broadcast({}), [11, 12, 13, 14])
    np.testing.assert_array_equal(again.arrays["w"], out.arrays["w"])  # seeded: replayable
    unseeded = StageChain([clip, LocalGaussian(2.0, 1e-5)])
    first, _ = unseeded.encode(records, chain.broadcast({}), [11, 12, 13, 14])
    second, _ = unseeded.encode(records, chain.broadcast({}), [11, 12, 13, 14])
    assert not np.array_equal(first.arrays["w"], second.arrays["w"])


def test_local_dp_accounts_the_client_that_took_part_most() -> None:
    local = LocalGaussian(2.0, 1e-5)
    state = local.init_state()
    for ids in ([1, 2], [2, 3], [2]):
        agg = Aggregate({}, {}, len(ids), float(len(ids)), client_ids=ids)
        state, metrics = local.finish_round(state, agg)
    assert metrics["dp.releases"] == 3.0
    assert metrics["dp.epsilon"] == pytest.approx(local.epsilon_after(3))
    # One release: a Gaussian of multiplier z / 2 (two records differ by up to 2C).
    assert local.epsilon_after(1) > central().epsilon_after(1)


def test_noise_source_keys_use_the_whole_key() -> None:
    key = bytes(range(32))
    flipped = bytes([key[0] ^ 1]) + key[1:]
    assert not np.array_equal(keystream_uniforms(key, 4), keystream_uniforms(flipped, 4))
    last = key[:31] + bytes([key[31] ^ 1])
    assert not np.array_equal(keystream_uniforms(key, 4), keystream_uniforms(last, 4))
    u = keystream_uniforms(key, 100_000)
    assert u.min() > 0 and u.max() <= 1
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    np.testing.assert_array_equal(
        gaussian_from_key(key, (5,), 1.0), gaussian_from_key(key, (5,), 1.0)
    )
    assert NoiseSource().key("x") != NoiseSource().key("x")  # OS entropy
    assert NoiseSource(seed=1).key("x", 2) == NoiseSource(seed=1).key("x", 2)
    assert NoiseSource(seed=1).key("x", 2) != NoiseSource(seed=1).key("x", 3)
    with pytest.raises(ValueError):
        keystream_uniforms(bytes(16), 1)  # AES-256 only


def test_the_server_skips_reading_again_only_records_its_own_clip_produced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In one process the server's check of the very batch its clip stage produced reuses
    the client-side norms (one pass over the records, not two) and decodes the same; a copy
    of the stage, a second check, a lower server bound or replaced arrays are read again."""
    import copy
    import pickle

    from fedforge.stages import clip as clip_module

    reads: list[int] = []
    full = clip_module.row_norms

    def counted(b: RecordBatch) -> np.ndarray:
        reads.append(len(b))
        return full(b)

    monkeypatch.setattr(clip_module, "row_norms", counted)
    values = np.random.default_rng(4).normal(size=(5, 6)) * 3
    values[0] *= 0.01  # one record within the bound
    stage = FixedClip(1.0)
    encoded = stage.encode(batch(values), {"clip.norm": 1.0}, [0] * 5)
    assert len(reads) == 1
    server = stage.decode(encoded, {"norm": 1.0})
    assert len(reads) == 1  # reused: not read again
    fresh = copy.deepcopy(stage).decode(encoded, {"norm": 1.0})
    assert len(reads) == 2  # a copy of the stage vouches for nothing
    np.testing.assert_array_equal(server.arrays["w"], fresh.arrays["w"])
    np.testing.assert_array_equal(server.scalars["clip.clipped"], fresh.scalars["clip.clipped"])
    stage.decode(encoded, {"norm": 1.0})
    assert len(reads) == 3  # vouched for once
    assert pickle.loads(pickle.dumps(stage))._bounded == {}
    again = stage.encode(batch(values), {"clip.norm": 1.0}, [0] * 5)
    stage.decode(again, {"norm": 0.5})  # the server's bound is lower than the client's
    assert len(reads) == 5
    forged = stage.encode(batch(values), {"clip.norm": 1.0}, [0] * 5)
    forged = forged.replace_arrays({"w": forged.arrays["w"] * 10})  # changed after the clip
    checked = stage.decode(forged, {"norm": 1.0})
    assert len(reads) == 7
    assert np.linalg.norm(checked.arrays["w"].astype(np.float64), axis=1).max() <= 1.0
    assert checked.scalars["clip.clipped"].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]
