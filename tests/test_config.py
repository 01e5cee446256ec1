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
    with pytest.raises(ConfigError, match="median ignores weights"):
        load_config(None, ["aggregation.kind='median'", "aggregation.max_weight=10"])
