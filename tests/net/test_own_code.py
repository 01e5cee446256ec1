"""A project from `fedforge new` deployed as it is: a server and three hospitals, each a
`fedforge client CONFIG --data FILE` process with the model factory, data loader and training
loop from files beside the configuration, under secure aggregation; a fourth site whose model
differs is refused in the handshake with both fingerprints and the first differing parameter;
the run stops early where the simulation does (server.stop_when) with the simulation's model,
and a restarted server stays stopped. A `workload = "module:NAME"` object deploys the same
way, and ends with its simulation's model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from fedforge.cli import app
from fedforge.config import load_config
from fedforge.experiment import build_dataset, simulate_config
from tests.net.helpers import fedforge, free_port, make_keys, stop_all

pytestmark = pytest.mark.timeout(240)
HOSPITALS = ["hospital1", "hospital2", "hospital3"]


def _deployable(project: Path, keys: Path, port: int, state: Path) -> Path:
    """The project's configuration with its own training loop, secure aggregation, two
    rounds and this test's keys, port and state directory."""
    text = (project / "fedforge.toml").read_text()
    text = text.replace('# train = "train:train"', 'train = "train:train"')
    text = text.replace("rounds = 20", "rounds = 3")
    text = text.replace('address = "127.0.0.1:8443"', f'address = "127.0.0.1:{port}"')
    text = text.replace('keys = "keys"', f'keys = "{keys}"')
    text = text.replace('state_dir = "server-state"', f'state_dir = "{state}"')
    text = text.replace("linger_s = 5", "linger_s = 0")
    text += '\n[aggregation]\nkind = "secure_sum"\n[secagg]\ncomplete_graph = true\n'
    path = project / "deploy.toml"
    path.write_text(text)
    return path


@pytest.mark.usefixtures("isolated_imports")
def test_a_new_project_deploys_unchanged_and_a_different_model_is_refused(tmp_path: Path) -> None:
    project = tmp_path / "hospitals"
    assert CliRunner().invoke(app, ["new", str(project), "--template", "tabular"]).exit_code == 0
    keys = make_keys(tmp_path, [*HOSPITALS, "rogue"])
    port = free_port()
    config = _deployable(project, keys, port, tmp_path / "state")
    # Early stopping after round 2: a test loss between round 1's and round 2's.
    full = simulate_config(
        load_config(config), build_dataset(load_config(config)), backend="sequential"
    )
    losses = [r.test_loss for r in full.history[1:]]
    assert losses[0] > losses[1] > losses[2], losses
    threshold = (losses[0] + losses[1]) / 2
    config.write_text(
        config.read_text()
        + f'[server.stop_when]\nmetric = "test_loss"\nthreshold = {threshold!r}\n'
    )
    rogue = project / "rogue.toml"
    rogue.write_text(config.read_text().replace("hidden = 32", "hidden = 16"))
    server = fedforge(["server", str(config)], tmp_path / "server.log")
    clients = [
        fedforge(
            [
                "client",
                str(config),
                "--server",
                f"127.0.0.1:{port}",
                "--credentials",
                str(keys / name),
                "--data",
                str(project / "data" / f"{name}.csv"),
            ],
            tmp_path / f"{name}.log",
        )
        for name in HOSPITALS
    ]
    refused = fedforge(
        [
            "client",
            str(rogue),
            "--server",
            f"127.0.0.1:{port}",
            "--credentials",
            str(keys / "rogue"),
            "--data",
            str(project / "data" / "hospital1.csv"),
        ],
        tmp_path / "rogue.log",
    )
    try:
        assert refused.wait(timeout=180) == 1
        assert server.wait(timeout=180) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for name, client in zip(HOSPITALS, clients, strict=True):
            assert client.wait(timeout=60) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        stop_all([server, *clients, refused])
    rogue_log = (tmp_path / "rogue.log").read_text()
    assert "architecture mismatch: the server's model is " in rogue_log
    assert (
        "first difference: the server has '0.weight float32 [32, 30]' where rogue has "
        "'0.weight float32 [16, 30]'" in rogue_log
    )
    assert "Traceback" not in rogue_log
    assert "refused client rogue: architecture mismatch" in (tmp_path / "server.log").read_text()
    server_log = (tmp_path / "server.log").read_text()
    assert "stopped early: test_loss reached" in server_log and "in round 2" in server_log
    provenance = json.loads((tmp_path / "state" / "provenance.json").read_text())
    assert "in round 2" in provenance["stop_reason"]
    # The deployment computed what the simulation computes (same seed, sites, loop and stop).
    simulated = simulate_config(
        load_config(config), build_dataset(load_config(config)), backend="sequential"
    )
    assert simulated.history[-1].round == 2 and simulated.stop_reason == provenance["stop_reason"]
    deployed = load_file(str(tmp_path / "state" / "final_model.safetensors"))
    assert deployed.keys() == simulated.state.params.keys()
    for name, value in simulated.state.params.items():
        np.testing.assert_allclose(deployed[name], value, rtol=0, atol=1e-5, err_msg=name)
    assert simulated.history[-1].clients_completed == 3
    # Restarted, the server resumes the stopped run: it stops at once, with status 0.
    again = fedforge(["server", str(config)], tmp_path / "again.log")
    try:
        assert again.wait(timeout=120) == 0, (tmp_path / "again.log").read_text()[-3000:]
    finally:
        stop_all([again])
    assert "stopped early: test_loss reached" in (tmp_path / "again.log").read_text()
    assert load_file(str(tmp_path / "state" / "final_model.safetensors")).keys() == deployed.keys()


TASK = """
import numpy as np
import torch
import fedforge as ff


def model():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def blobs(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, ((x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)).astype(np.int64)


def train(model, loader, config):
    optimizer = config.sgd(model)
    for _ in range(config.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()


# A deployed client without --data is called with its client id as site.index.
TASK = ff.Workload(
    model=model,
    data=lambda site: blobs(site.index, 30 + 10 * site.index),
    train=train,
    test=lambda: blobs(99, 40),
    sites=2,
)
"""


@pytest.mark.usefixtures("isolated_imports")
def test_a_workload_object_runs_over_the_network_as_in_simulation(tmp_path: Path) -> None:
    """`workload = "task:TASK"` names one object (model, data by client id, training loop,
    central test set) that the server and each client build from the same configuration."""
    (tmp_path / "task.py").write_text(TASK)
    keys = make_keys(tmp_path, ["site0", "site1"])
    port = free_port()
    config = tmp_path / "fedforge.toml"
    config.write_text(
        'workload = "task:TASK"\nseed = 1\n'
        "[client]\nepochs = 2\nbatch_size = 8\nlr = 0.3\n"
        "[server]\nrounds = 2\nclients_per_round = 2\n"
        f'[deploy]\naddress = "127.0.0.1:{port}"\nkeys = "{keys}"\n'
        f'state_dir = "{tmp_path / "state"}"\nmin_clients = 2\nround_timeout_s = 60\nlinger_s = 0\n'
    )
    server = fedforge(["server", str(config)], tmp_path / "server.log")
    clients = [
        fedforge(
            [
                *("client", str(config), "--server", f"127.0.0.1:{port}"),
                "--credentials",
                str(keys / name),
            ],
            tmp_path / f"{name}.log",
        )
        for name in ("site0", "site1")
    ]
    try:
        assert server.wait(timeout=180) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for name, client in zip(("site0", "site1"), clients, strict=True):
            assert client.wait(timeout=60) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        stop_all([server, *clients])
    simulated = simulate_config(
        load_config(config), build_dataset(load_config(config)), backend="sequential"
    )
    assert simulated.history[-1].clients_completed == 2
    assert simulated.history[-1].test_accuracy > simulated.history[0].test_accuracy
    deployed = load_file(str(tmp_path / "state" / "final_model.safetensors"))
    assert deployed.keys() == simulated.state.params.keys()
    for name, value in simulated.state.params.items():
        np.testing.assert_allclose(deployed[name], value, rtol=0, atol=1e-5, err_msg=name)
