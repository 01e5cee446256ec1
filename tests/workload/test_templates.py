"""`fedforge new` writes a runnable project for every template: its own generated test, which
runs the project's configuration for two rounds as `fedforge run` does, passes. (The
`tabular` project also runs over the network: tests/net/test_own_code.py.) The `text-lora`
and `rl` projects' tests skip, naming the extra to install, where it is missing."""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedforge.cli import app
from fedforge.templates import templates

RUNNER = CliRunner()


@pytest.mark.parametrize("template", sorted(templates()))
def test_every_template_runs_and_its_generated_test_passes(template: str, tmp_path: Path) -> None:
    project = tmp_path / f"my-{template}"
    made = RUNNER.invoke(app, ["new", str(project), "--template", template])
    assert made.exit_code == 0, made.output
    for name in ("fedforge.toml", "models.py", "data.py", "README.md", "test_project.py"):
        assert (project / name).is_file(), name
    assert f"# my-{template}" in (project / "README.md").read_text()
    # The project's own test, as its users run it (its functions, with a fresh tmp_path).
    spec = importlib.util.spec_from_file_location(
        f"generated_{template}", project / "test_project.py"
    )
    assert spec is not None and spec.loader is not None
    generated = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generated)
    tests = [getattr(generated, n) for n in dir(generated) if n.startswith("test_")]
    assert tests
    for test in tests:  # pytest hands tmp_path to the tests that ask for it
        wants = "tmp_path" in inspect.signature(test).parameters
        test(tmp_path / f"generated-{test.__name__}") if wants else test()


def test_new_refuses_an_unknown_template_and_an_existing_directory(tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["new", str(tmp_path / "x"), "--template", "nope"])
    assert result.exit_code == 2 and "no template 'nope'" in result.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    result = RUNNER.invoke(app, ["new", str(tmp_path / "taken")])
    assert result.exit_code == 2 and "already exists and is not empty" in result.output
    listed = RUNNER.invoke(app, ["new", "--list"])
    assert listed.exit_code == 0
    assert all(t in listed.output for t in ("tabular", "images", "text-lora", "rl"))


def test_fedforge_run_on_a_new_project_stops_early_with_the_reason_and_status_0(
    tmp_path: Path,
) -> None:
    project = tmp_path / "hospitals"
    assert RUNNER.invoke(app, ["new", str(project), "--template", "tabular"]).exit_code == 0
    run = RUNNER.invoke(
        app,
        [
            "run",
            str(project / "fedforge.toml"),
            "--quiet",
            "--out",
            str(tmp_path / "run"),
            "--set",
            'server.stop_when.metric="test_accuracy"',
            "--set",
            "server.stop_when.threshold=0.9",
        ],
    )
    assert run.exit_code == 0, run.output
    assert "stopped early: test_accuracy reached" in " ".join(run.output.split())
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert 1 <= history[-1]["round"] < 20
    assert history[-1]["test_accuracy"] >= 0.9 > history[-2]["test_accuracy"]
    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert provenance["stop_reason"] == history[-1]["labels"]["stopped"]
