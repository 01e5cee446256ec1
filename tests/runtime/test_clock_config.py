"""[clock] and [asynchronous]: refused combinations, and runs through the configuration."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedforge
from fedforge.config import load_config
from fedforge.core.errors import ConfigError
from fedforge.experiment import build_clock, build_dataset, build_sampler, simulate_config
from fedforge.runtime.sampling import UniformSampler

SMALL = [
    "data.dataset=digits",
    "partition.num_clients=20",
    "model.name=logistic",
    "client.epochs=1",
    "server.rounds=3",
    "server.clients_per_round=5",
    "runtime.backend=sequential",
]
# FedBuff has no clients per round (it dispatches up to asynchronous.concurrency)
SMALL_ASYNC = [o for o in SMALL if not o.startswith("server.clients_per_round")]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["clock.deadline_s=5"], "clock.deadline_s needs clock.enabled = true"),
        (["asynchronous.buffer=5"], "asynchronous.buffer needs asynchronous.mode = 'fedbuff'"),
        (
            ["clock.enabled=true", "asynchronous.mode=fedbuff", "clock.deadline_s=10"],
            "apply to synchronous rounds only",
        ),
        (
            ["clock.enabled=true", "asynchronous.mode=fedbuff", "asynchronous.buffer=200"],
            "buffer cannot exceed asynchronous.concurrency",
        ),
        (
            ["clock.enabled=true", "asynchronous.mode=fedbuff", "algorithm.name=scaffold"],
            "cannot run with this algorithm.name",
        ),
        (
            ["clock.enabled=true", "asynchronous.mode=fedbuff", "aggregation.kind=median"],
            "cannot run with this aggregation.kind",
        ),
        (
            ["clock.enabled=true", "asynchronous.mode=fedbuff", "privacy.mode=local"],
            "cannot run with this privacy.mode",
        ),
        (
            ["clock.enabled=true", "clock.over_selection=1.3", "server.sampler=poisson"],
            "over_selection needs server.sampler = 'uniform'",
        ),
        (["clock.enabled=true", "aggregation.kind=secure_sum"], "secure aggregation"),
        (["clock.enabled=true", "clock.over_selection=0.5"], "greater than or equal to 1"),
    ],
)
def test_impossible_combinations_are_refused_at_load(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        load_config(None, overrides)
    assert expected in str(info.value)


def test_fedbuff_in_simulation_needs_the_virtual_clock() -> None:
    # (it loads: a deployment's server runs the same configuration in real time)
    cfg = load_config(
        None,
        [
            *SMALL_ASYNC,
            "asynchronous.mode=fedbuff",
            "asynchronous.concurrency=6",
            "asynchronous.buffer=3",
        ],
    )
    with pytest.raises(ConfigError, match=r"set clock.enabled = true"):
        simulate_config(cfg, build_dataset(cfg))


def test_over_selection_samples_more_and_keeps_clients_per_round() -> None:
    cfg = load_config(None, [*SMALL, "clock.enabled=true", "clock.over_selection=1.3"])
    assert build_sampler(cfg) == UniformSampler(7)  # ceil(1.3 x 5)
    spec = build_clock(cfg, 20)
    assert spec is not None and spec.keep == 5 and len(spec.devices) == 20
    result = simulate_config(cfg, build_dataset(cfg))
    for r in result.history[1:]:
        assert r.clients_sampled == 7 and r.clients_completed == 5
        assert len(r.clients["too_slow"]) == 2 and r.metrics["clock.seconds"] > 0


def test_fedbuff_runs_from_the_configuration() -> None:
    cfg = load_config(
        None,
        [
            *SMALL_ASYNC,
            "clock.enabled=true",
            "clock.availability='random'",
            "clock.online_fraction=0.5",
            "asynchronous.mode=fedbuff",
            "asynchronous.buffer=3",
            "asynchronous.concurrency=6",
        ],
    )
    result = simulate_config(cfg, build_dataset(cfg))
    h = result.history
    assert [r.round for r in h] == [0, 1, 2, 3]
    assert all(r.clients_completed == 3 for r in h[1:])
    times = [r.metrics["clock.time"] for r in h[1:]]
    assert times == sorted(times) and times[0] > 0
    assert h[-1].labels["async"] == "fedbuff"


def test_cli_runs_on_the_virtual_clock_and_plots_simulated_time(tmp_path: Path) -> None:
    out = tmp_path / "run"
    sets = [*SMALL, "clock.enabled=true", "clock.deadline_s=4.0", "clock.speed_sigma=1.0"]
    args = [arg for s in sets for arg in ("--set", s)]
    done = subprocess.run(
        [sys.executable, "-m", "fedforge.cli", "run", *args, "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(Path(fedforge.__file__).parents[1])},
    )
    assert done.returncode == 0, done.stderr
    history = json.loads((out / "history.json").read_text())
    times = [r["metrics"]["clock.time"] for r in history[1:]]
    seconds = [r["metrics"]["clock.seconds"] for r in history[1:]]
    assert all(0 < s <= 4.0 for s in seconds)
    assert times == pytest.approx(list(itertools.accumulate(seconds)))
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
