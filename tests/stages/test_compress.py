"""The compression stage: encoded payloads are what travels and is counted, every runtime
decodes to the same model, and the codec composes with clipping."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from fedforge import simulate
from fedforge.aggregate.kinds import WeightedMean
from fedforge.algorithms.fedavg import FedAvg
from fedforge.compress.codecs import BFloat16, StochasticQuantizer, TopK
from fedforge.compress.rotation import Rotated
from fedforge.core.errors import ConfigError
from fedforge.core.params import spec_of
from fedforge.core.records import RecordSpec
from fedforge.data.federated import FederatedDataset
from fedforge.stages.base import StageChain
from fedforge.stages.clip import FixedClip, row_norms
from fedforge.stages.compress import Compress
from fedforge.train.program import LocalSGD
from fedforge.train.torch_model import TorchModel
from tests.conftest import small_mlp

LOCAL = LocalSGD(lr=0.1, epochs=1, batch_size=8)
CODECS = [BFloat16(), StochasticQuantizer(8, 64), Rotated(StochasticQuantizer(4, 256), 256)]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_bytes_up_are_the_encoded_bytes_and_runtimes_agree(
    small_federated: FederatedDataset, codec: object
) -> None:
    runs = {
        backend: simulate(
            small_mlp(),
            small_federated,
            FedAvg(local=LOCAL),
            rounds=2,
            clients_per_round=5,
            backend=backend,
            stages=[Compress(codec)],
        )
        for backend in ("sequential", "vectorized", "workers")
    }
    plain = simulate(
        small_mlp(), small_federated, FedAvg(local=LOCAL), rounds=2, clients_per_round=5
    )
    d = sum(v.size for v in TorchModel(small_mlp()).get_params().values())
    per_record = Compress(codec).codec.encoded_bytes(d)  # type: ignore[attr-defined]
    reference = runs["sequential"]
    for record in reference.history[1:]:
        assert record.bytes_up == record.clients_completed * per_record
        assert record.bytes_up < plain.history[1].bytes_up
    for backend, result in runs.items():
        for name, value in reference.state.params.items():
            np.testing.assert_allclose(result.state.params[name], value, atol=1e-5, err_msg=backend)
    for name, value in plain.state.params.items():  # close to the uncompressed model
        np.testing.assert_allclose(reference.state.params[name], value, atol=0.05)


def test_the_server_reclips_a_decoded_record() -> None:
    """A codec may push a clipped record past the bound; the clip check runs after decode."""
    from fedforge.core.records import RecordBatch

    codec = StochasticQuantizer(1, None)  # 1 bit: a large error
    chain = StageChain([FixedClip(1.0), Compress(codec)])
    spec = RecordSpec({"w": spec_of({"w": np.zeros(64, np.float32)})["w"]})
    chain.wire_spec(spec)
    rows = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    batch = RecordBatch(np.arange(8), np.full(8, 3), {"w": rows})
    states = {"clip": {"norm": 1.0}}
    encoded, _ = chain.encode(batch, chain.broadcast(states), list(range(8)))
    assert set(encoded.arrays) == {"codec/codes", "codec/low", "codec/step"}
    decoded = chain.decode(encoded, states)
    assert np.all(row_norms(decoded) <= 1.0 + 1e-5)


def test_a_codec_cannot_precede_secure_aggregation() -> None:
    class SecureSum:
        kind = "secure_sum"
        name = "secure_sum"

    with pytest.raises(ConfigError, match="does not commute"):
        StageChain([Compress(BFloat16())]).check(SecureSum())  # type: ignore[arg-type]
    StageChain([Compress(BFloat16())]).check(WeightedMean())


def test_error_feedback_keeps_the_residual_in_each_clients_state() -> None:
    """Through the chain, as a client runs it: round after round the residual entry holds
    exactly what top-k has not sent yet, under the stage's own prefix."""
    from fedforge.compress.codecs import TopK
    from fedforge.core.params import ArraySpec
    from fedforge.core.records import RecordBatch

    stage = Compress(TopK(0.1), error_feedback=True)
    chain = StageChain([stage])
    chain.wire_spec(RecordSpec({"w": ArraySpec((50,), np.dtype(np.float32))}))
    assert chain.keeps_client_state
    rng = np.random.default_rng(0)
    state: dict[str, np.ndarray] = {}
    sent, total = np.zeros(50), np.zeros(50)
    for _ in range(6):
        x = rng.standard_normal(50).astype(np.float32)
        batch = RecordBatch(np.array([0]), np.array([5]), {"w": x[None]})
        encoded, new = chain.encode(batch, {}, [1], [state])
        assert set(new[0]) == {"stage/compress/residual"}
        state = new[0]
        sent += stage.decode(encoded, {}).arrays["w"][0]
        total += x
    np.testing.assert_allclose(sent + state["stage/compress/residual"], total, atol=1e-5)


@pytest.mark.parametrize("extra", ["topk", "downlink"])
def test_error_feedback_and_downlink_agree_across_runtimes(
    small_federated: FederatedDataset, extra: str
) -> None:
    from fedforge.compress.codecs import TopK

    stages = [Compress(TopK(0.2), error_feedback=True)] if extra == "topk" else []
    runs = {
        backend: simulate(
            small_mlp(),
            small_federated,
            FedAvg(local=LOCAL),
            rounds=3,
            clients_per_round=10,  # every client every round: residuals are reused
            backend=backend,
            stages=stages,
            downlink="bfloat16" if extra == "downlink" else "none",
        )
        for backend in ("sequential", "vectorized", "workers")
    }
    plain = simulate(
        small_mlp(), small_federated, FedAvg(local=LOCAL), rounds=3, clients_per_round=10
    )
    reference = runs["sequential"]
    for result in runs.values():
        for name, value in reference.state.params.items():
            np.testing.assert_allclose(result.state.params[name], value, atol=1e-5)
    params = sum(a.size for a in plain.state.params.values())
    if extra == "downlink":  # two bytes a parameter down, the same bytes up
        assert reference.history[1].bytes_down == 10 * 2 * params
        assert reference.history[1].bytes_up == plain.history[1].bytes_up
    else:
        assert reference.history[1].bytes_up == 10 * 8 * TopK(0.2).k(params)
    differs = any(
        not np.allclose(reference.state.params[k], v) for k, v in plain.state.params.items()
    )
    assert differs  # the compression is real


@pytest.mark.parametrize(
    "codec",
    [StochasticQuantizer(8, 64), TopK(0.1), Rotated(StochasticQuantizer(4, 16), 16)],
    ids=lambda c: c.name,
)
def test_a_mean_sums_compressed_records_without_decoding_them_to_the_same_aggregate(
    codec: object,
) -> None:
    """The server's mean of a chunk of encoded records, summed from the payloads, equals the
    mean of the decoded records (weights capped alike); a sum that is not finite is refused
    so the records are decoded and checked one by one."""
    from fedforge.aggregate.kinds import StreamingMean
    from fedforge.core.records import RecordBatch

    chain = StageChain([Compress(codec)])
    layout = {"b": np.zeros(7, np.float32), "w": np.zeros((5, 9), np.float32)}
    chain.wire_spec(RecordSpec(spec_of(layout)))
    rng = np.random.default_rng(1)
    arrays = {k: rng.normal(size=(6, *v.shape)).astype(np.float32) for k, v in layout.items()}
    batch = RecordBatch(np.arange(6), np.array([3, 1, 8, 2, 5, 4]), arrays)
    encoded, _ = chain.encode(batch, {}, list(range(6)))
    weights = encoded.num_examples.astype(np.float64)
    summed, decoded = StreamingMean(max_weight=6.0), StreamingMean(max_weight=6.0)
    assert summed.add_summed(encoded, weights, partial(chain.weighted_sum, encoded))
    decoded.add(chain.decode(encoded, {}), weights)
    got, expected = summed.result(), decoded.result()
    assert got.total_weight == expected.total_weight and got.downweighted == [2]
    for name, value in expected.arrays.items():
        assert got.arrays[name].dtype == value.dtype and got.arrays[name].shape == value.shape
        np.testing.assert_allclose(got.arrays[name], value, rtol=1e-6, atol=1e-7)
    overflow = np.full(6, 1e308)
    assert not StreamingMean().add_summed(encoded, overflow, partial(chain.weighted_sum, encoded))
