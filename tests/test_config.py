from pathlib import Path

import pytest

from fedforge.config import RunConfig, load_config, to_toml
from fedforge.core.errors import ConfigError


def test_defaults_are_the_embedded_default_run() -> None:
    cfg = load_config()
    assert cfg.data.dataset == "mnist5k" and cfg.partition.scheme == "dirichlet"
    assert (cfg.partition.num_clients, cfg.partition.alpha) == (100, 0.5)
    assert cfg.model.hidden == [200, 200] and cfg.server.clients_per_round == 10


def test_overrides_are_parsed_as_toml_values(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.toml"
    path.write_text("[server]\nrounds = 3\n")
    cfg = load_config(path, ["server.lr=0.5", "model.hidden=[10, 20]", "data.dataset=digits"])
    assert cfg.server.rounds == 3 and cfg.server.lr == 0.5
    assert cfg.model.hidden == [10, 20] and cfg.data.dataset == "digits"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("server.round=3", "server.round: unknown key; allowed keys here: rounds"),
        ("partition.scheme=zipf", "'iid', 'dirichlet', 'shards', 'quantity' or 'natural'"),
        ("client.lr=-1", "client.lr: Input should be greater than 0"),
        ("colour=blue", "colour: unknown key; allowed keys here: seed, data"),
        ("partition.scheme=natural", "needs data.dataset = 'synthetic'"),
        ("server.clients_per_round=101", "exceeds the number of clients (100)"),
        ("novalue", "expects key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key_and_allowed_values(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_resolved_config_round_trips_through_toml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = load_config(None, ["seed=4", "partition.scheme=shards"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "examples").glob("*.toml")), ids=lambda p: p.name
)
def test_example_configs_are_valid(path: Path) -> None:
    load_config(path)


def test_impossible_stage_chains_are_refused_when_the_configuration_loads() -> None:
    import pytest

    from fedforge.config import load_config
    from fedforge.core.errors import ConfigError

    with pytest.raises(ConfigError, match="clip_norm cannot be combined"):
        load_config(None, ["algorithm.name='scaffold'", "update.clip_norm=1.0"])
    with pytest.raises(ConfigError, match="max_weight applies to the weighted mean"):
        load_config(None, ["aggregation.kind='median'", "aggregation.max_weight=10"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ('runtime.device="gpu0"', "runtime.device: 'gpu0' is not a torch device name"),
        ('runtime.device="cuda:x"', "runtime.device: 'cuda:x' is not a torch device name"),
        ('runtime.device=""', "runtime.device: '' is not a torch device name"),
    ],
)
def test_a_nonsense_device_is_refused_when_the_configuration_loads(
    override: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)
    assert "use e.g. 'cpu', 'cuda'" in str(info.value)


def test_cuda_without_cuda_is_refused_when_the_configuration_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError) as info:
            load_config(None, [f'runtime.device="{device}"'])
        message = str(info.value)
        assert f"runtime.device: '{device}' needs CUDA" in message
        assert "use 'cpu' or leave it unset" in message
        assert _is_short(message)
    assert load_config(None, ['runtime.device="cpu"']).runtime.device == "cpu"


def test_a_cuda_index_past_the_last_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert load_config(None, ['runtime.device="cuda:0"']).runtime.device == "cuda:0"
    with pytest.raises(ConfigError, match=r"runtime.device: 'cuda:1' but this machine has 1"):
        load_config(None, ['runtime.device="cuda:1"'])


def test_ray_backend_without_ray_is_refused_when_the_configuration_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name == "ray" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["runtime.backend=ray"])
    message = str(info.value)
    assert "runtime.backend: 'ray' needs Ray" in message
    assert "pip install 'fedforge[ray]'" in message
    assert _is_short(message)
    assert load_config(None, ["runtime.backend=workers"]).runtime.backend == "workers"


def test_ray_backend_loads_where_ray_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedforge.config.load.ray_installed", lambda: True)
    assert load_config(None, ["runtime.backend=ray"]).runtime.backend == "ray"


def test_cross_field_errors_print_the_message_not_the_raw_configuration() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["server.clients_per_round=500", "seed=12345"])
    message = str(info.value)
    assert message == (
        "invalid configuration:\n"
        "  server.clients_per_round: 500 exceeds the number of clients (100); "
        "lower it or raise partition.num_clients"
    )
    assert "{" not in message and "12345" not in message
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            ["partition.scheme=natural", "data.dataset=synthetic", "server.clients_per_round=31"],
        )
    assert "(30); lower it or raise data.devices" in str(info.value)
    assert "{" not in str(info.value)
    for overrides in (
        ["partition.scheme=natural"],
        ["algorithm.name=scaffold", "update.clip_norm=1.0"],
        ["aggregation.kind=median", "aggregation.max_weight=0.5"],
    ):
        with pytest.raises(ConfigError) as info:
            load_config(None, overrides)
        assert "{" not in str(info.value) and "Value error" not in str(info.value)
        assert _is_short(str(info.value))


def _is_short(message: str) -> bool:
    """A header line and one line per error: no traceback, no raw configuration."""
    lines = message.splitlines()
    return (
        len(lines) == 2
        and lines[0] == "invalid configuration:"
        and "Traceback" not in message
        and len(lines[1]) < 160
    )


def test_non_iid_algorithm_keys() -> None:
    cfg = load_config(
        None,
        [
            "algorithm.name=ditto",
            "algorithm.lam=0.5",
            "algorithm.stragglers=0.9",
            "algorithm.drop_stragglers=true",
        ],
    )
    assert cfg.algorithm.lam == 0.5 and cfg.algorithm.stragglers == 0.9
    for bad, message in (
        (["algorithm.name=fedper", "model.name=logistic"], "head_layers"),
        (["algorithm.name=fednova", "update.clip_norm=1.0"], "normalizer"),
        (["algorithm.name=qfedavg", "aggregation.kind=secure_sum"], "normalizer"),
        (["algorithm.stragglers=1.5"], "stragglers"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, bad)


FEDBUFF = ["clock.enabled=true", "asynchronous.mode=fedbuff", "asynchronous.concurrency=20"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        # FedBuff: normalizers the staleness discount would scale; ignored stragglers, sampler
        ([*FEDBUFF, "algorithm.name=fednova"], "algorithm.name"),
        ([*FEDBUFF, "algorithm.name=qfedavg"], "algorithm.name"),
        ([*FEDBUFF, "algorithm.stragglers=0.5"], "algorithm.stragglers"),
        ([*FEDBUFF, "server.sampler=poisson"], "server.sampler"),
        ([*FEDBUFF, "server.clients_per_round=5"], "server.clients_per_round"),
        # algorithm-specific keys under another algorithm
        (["algorithm.mu=0.5"], "algorithm.mu"),
        (["algorithm.q=2.0"], "algorithm.q"),
        (["algorithm.name=fedprox", "algorithm.lam=0.5"], "algorithm.lam"),
        (["algorithm.head_layers=2"], "algorithm.head_layers"),
        (["algorithm.drop_stragglers=true"], "algorithm.drop_stragglers"),
        # records the aggregation would break
        (["algorithm.name=scaffold", "aggregation.kind=median"], "aggregation.kind"),
        (["algorithm.name=scaffold", "aggregation.kind=krum"], "aggregation.kind"),
        (["algorithm.name=scaffold", "aggregation.kind=secure_sum"], "aggregation.kind"),
        (["algorithm.name=fednova", "aggregation.kind=trimmed_mean"], "aggregation.kind"),
        # the sampler and the server optimizer
        (["server.sampling_rate=0.3"], "server.sampling_rate"),
        (["server.sampler=poisson", "server.clients_per_round=5"], "server.clients_per_round"),
        (["server.optimizer=adam", "server.momentum=0.9"], "server.momentum"),
        (["server.optimizer=adagrad", "server.beta2=0.9"], "server.beta2"),
        (["server.tau=0.1"], "server.tau"),
        # update stages
        (["update.codec=float16", "update.codec_block=64"], "update.codec_block"),
        (["update.codec=q8", "update.topk_fraction=0.1"], "update.topk_fraction"),
        (["update.error_feedback=true"], "update.error_feedback"),
        # privacy
        (["privacy.noise_multiplier=1.0"], "privacy.noise_multiplier"),
        (
            ["privacy.mode=central", "privacy.noise_multiplier=1", "privacy.target_quantile=0.7"],
            "privacy.target_quantile",
        ),
        (
            ["privacy.mode=central", "privacy.noise_multiplier=1", "privacy.weight_cap=50"],
            "privacy.weight_cap",
        ),
        (
            [
                "privacy.mode=distributed",
                "privacy.noise_multiplier=1",
                "aggregation.kind=secure_sum",
                "privacy.accountant=rdp",
            ],
            "privacy.accountant",
        ),
        # aggregation keys of another kind, secure aggregation without it
        (["aggregation.kind=median", "aggregation.byzantine=1"], "aggregation.byzantine"),
        (["aggregation.kind=krum", "aggregation.trim=0.2"], "aggregation.trim"),
        (["aggregation.kind=krum", "aggregation.multi_krum=3"], "aggregation.multi_krum"),
        (["aggregation.max_norm=2.0"], "aggregation.max_norm"),
        (["aggregation.kind=median", "aggregation.tau=2.0"], "aggregation.tau"),
        (["secagg.ring_bits=64"], "secagg.ring_bits"),
        # federated evaluation off
        (["evaluation.holdout=0.3"], "evaluation.holdout"),
        (["evaluation.every=2"], "evaluation.every"),
        # attacks
        (["attack.scale=5.0"], "attack.scale"),
        (["attack.overclaim=3.0"], "attack.overclaim"),
        (["attack.kind=sign_flip", "attack.std=2.0"], "attack.std"),
        (["attack.kind=label_flip", "attack.target_label=3"], "attack.target_label"),
        # the clock's device keys
        (["clock.enabled=true", "clock.online_fraction=0.3"], "clock.online_fraction"),
        (["clock.enabled=true", "clock.availability=diurnal", "clock.slot_s=60"], "clock.slot_s"),
        (
            ["clock.enabled=true", "clock.availability=random", "clock.period_s=60"],
            "clock.period_s",
        ),
        (
            ["clock.enabled=true", "clock.trace='d.csv'", "clock.speed_median=2"],
            "clock.speed_median",
        ),
        # data, partition, model, runtime
        (["data.alpha=0.5"], "data.alpha"),
        (["partition.scheme=iid", "partition.alpha=0.1"], "partition.alpha"),
        (["partition.shards_per_client=3"], "partition.shards_per_client"),
        (["partition.exponent=2.0"], "partition.exponent"),
        (
            ["data.dataset=synthetic", "partition.scheme=natural", "partition.num_clients=50"],
            "partition.num_clients",
        ),
        (["model.name=logistic", "model.hidden=[10]"], "model.hidden"),
        (["runtime.backend=sequential", "runtime.num_workers=4"], "runtime.num_workers"),
        (["runtime.backend=workers", "runtime.memory_budget_mb=64"], "runtime.memory_budget_mb"),
        (["runtime.ray_address='auto'"], "runtime.ray_address"),
    ],
)
def test_a_setting_that_would_be_ignored_is_refused_naming_its_key(
    overrides: list[str], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert _is_short(message), message
    assert message.splitlines()[1].strip().startswith(key) or f"this {key}" in message, message


def test_the_same_keys_load_where_they_apply() -> None:
    for overrides in (
        ["algorithm.name=fedprox", "algorithm.mu=0.5"],
        ["algorithm.name=fedrep", "algorithm.head_layers=2", "algorithm.head_epochs=2"],
        ["algorithm.stragglers=0.5", "algorithm.drop_stragglers=true"],
        ["algorithm.name=fednova", "aggregation.kind=krum", "aggregation.byzantine=2"],
        ["server.sampler=poisson", "server.sampling_rate=0.3"],
        ["update.codec=q4", "update.codec_block=64", "update.error_feedback=true"],
        [
            "privacy.mode=central",
            "privacy.noise_multiplier=1",
            "privacy.weighting=capped",
            "privacy.weight_cap=50",
        ],
        ["evaluation.fraction=0.5", "evaluation.holdout=0.3", "evaluation.every=2"],
        ["attack.kind=backdoor", "attack.target_label=3", "attack.overclaim=2.0"],
        ["clock.enabled=true", "clock.availability=random", "clock.slot_s=60"],
        ["runtime.backend=auto", "runtime.num_workers=4", "runtime.memory_budget_mb=64"],
        # FedBuff draws no rounds: the default clients_per_round may exceed the clients
        [
            "partition.num_clients=3",
            *FEDBUFF[:2],
            "asynchronous.buffer=2",
            "asynchronous.concurrency=3",
        ],
    ):
        load_config(None, overrides)
