"""The run directory: unique default names, no silent overwrite, provenance, config file."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from fedforge.config import RunConfig, load_config
from fedforge.core.errors import FedforgeError
from fedforge.report import rundir
from fedforge.report.rundir import (
    new_run_dir,
    prepare_out_dir,
    provenance,
    simulation_toml,
    start_provenance,
)
from fedforge.report.runlock import LOCK

NOON = datetime(2024, 5, 1, 12, 0, 0)


def test_runs_started_in_the_same_second_get_different_directories(tmp_path: Path) -> None:
    a = new_run_dir(tmp_path / "runs", NOON)
    b = new_run_dir(tmp_path / "runs", NOON)
    assert a != b and a.is_dir() and b.is_dir()
    assert a.name.startswith("20240501-120000-") and b.name.startswith("20240501-120000-")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([a.name, b.name])


def test_a_taken_name_is_drawn_again_never_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    draws = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(rundir.secrets, "token_hex", lambda n: next(draws))
    a = new_run_dir(tmp_path, NOON)
    (a / "history.json").write_text("[]")
    b = new_run_dir(tmp_path, NOON)
    assert a.name.endswith("-aaaaaa") and b.name.endswith("-bbbbbb")
    assert (a / "history.json").read_text() == "[]"


def _previous_run(path: Path) -> Path:
    path.mkdir()
    (path / "config.toml").write_text("seed = 1\n")
    (path / "history.json").write_text("[]\n")
    return path


def test_an_existing_run_directory_is_refused_and_left_intact(tmp_path: Path) -> None:
    old = _previous_run(tmp_path / "old")
    with pytest.raises(FedforgeError, match="--overwrite") as info:
        prepare_out_dir(old)
    assert "\n" not in str(info.value)
    assert (old / "config.toml").read_text() == "seed = 1\n"
    assert (old / "history.json").exists()


def test_overwrite_replaces_a_previous_run(tmp_path: Path) -> None:
    old = _previous_run(tmp_path / "old")
    with prepare_out_dir(old, overwrite=True):  # held by this process until released
        assert [p.name for p in old.iterdir()] == [LOCK]  # only the lock file is kept


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("precious")
    with pytest.raises(FedforgeError, match="not a fedforge run directory"):
        prepare_out_dir(folder, overwrite=True)
    assert (folder / "chapter1.tex").read_text() == "precious"


def test_missing_or_empty_out_is_fine_and_a_file_is_refused(tmp_path: Path) -> None:
    prepare_out_dir(tmp_path / "new" / "run").release()
    assert (tmp_path / "new" / "run").is_dir()
    prepare_out_dir(tmp_path / "new" / "run").release()  # empty (but its lock): still fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(FedforgeError, match="not a directory"):
        prepare_out_dir(tmp_path / "file", overwrite=True)


def test_simulation_config_has_no_deploy_section_and_loads_back(tmp_path: Path) -> None:
    config = load_config(None, ["server.rounds=7", "seed=4", "client.lr=0.2"])
    text = simulation_toml(config)
    assert "deploy" not in text and "[server]" in text
    (tmp_path / "config.toml").write_text(text)
    assert load_config(tmp_path / "config.toml") == config


def test_provenance_records_versions_backend_device_command_and_start(tmp_path: Path) -> None:
    import sys

    import numpy
    import torch

    import fedforge

    started = datetime(2024, 5, 1, 12, 0, 0).astimezone()
    record = provenance(RunConfig(), backend="vectorized", device="cpu", started=started)
    assert record["fedforge"] == fedforge.__version__
    assert record["torch"] == torch.__version__ and record["numpy"] == numpy.__version__
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["backend"] == "vectorized" and record["backend_requested"] == "auto"
    assert record["device"] == "cpu"
    assert record["command"] == sys.argv
    assert datetime.fromisoformat(record["started"]) == started
    json.dumps(record)  # serializable as is


def test_a_resumed_run_keeps_its_original_start_and_command(tmp_path: Path) -> None:
    first = {"started": "2024-05-01T12:00:00+00:00", "command": ["fedforge", "run"]}
    start_provenance(tmp_path, first)
    again = {"started": "2024-05-01T13:00:00+00:00", "command": ["fedforge", "run", "--resume"]}
    merged = start_provenance(tmp_path, again, resume=True)
    on_disk = json.loads((tmp_path / "provenance.json").read_text())
    assert on_disk == merged
    assert merged["started"] == first["started"] and merged["command"] == first["command"]
    assert merged["resumed"] == [again]
