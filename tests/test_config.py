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
