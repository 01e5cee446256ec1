"""What a deployment's state directory fixes for its run: client ids, partitions, the
configuration; and what a site is told of it."""

from __future__ import annotations

import tomllib

from fedforge.config import RunConfig, load_config, to_toml
from fedforge.net.deployment import (
    assign_client_ids,
    config_change_problem,
    partition_problem,
    site_config_toml,
)


def test_ids_are_kept_for_the_run_and_new_names_come_after() -> None:
    assert assign_client_ids({}, ["bob", "alice"]) == {"alice": 0, "bob": 1}
    # aaron sorts first but joins a running run: alice and bob keep 0 and 1.
    assert assign_client_ids({"alice": 0, "bob": 1}, ["aaron", "alice", "bob"]) == {
        "alice": 0,
        "bob": 1,
        "aaron": 2,
    }
    # bob left the run: his id is not reused.
    assert assign_client_ids({"alice": 0, "bob": 1}, ["alice", "carol"]) == {"alice": 0, "carol": 2}


def test_clients_without_a_partition_are_refused_with_what_to_change() -> None:
    ids = {"alice": 0, "bob": 1, "carol": 2}
    assert partition_problem(ids, 3, [], None) is None
    new_run = partition_problem(ids, 2, list(ids), None)
    assert new_run is not None and "set partition.num_clients = 3 (or more)" in new_run
    assert 'deploy.client_data = "own"' in new_run
    resumed = partition_problem(ids, 2, ["carol"], "r1")
    assert resumed is not None and "carol (id 2) would have none: start a new run" in resumed


def test_a_stored_run_accepts_operational_changes_and_more_rounds_only() -> None:
    stored = to_toml(load_config(None, ["server.rounds=5"]))
    same = load_config(None, ["server.rounds=5"])
    assert config_change_problem(stored, same, completed=5) is None
    operational = [
        "server.rounds=8",
        "deploy.round_timeout_s=10",
        "deploy.address=0.0.0.0:9000",
        "runtime.threads=2",
    ]
    assert config_change_problem(stored, load_config(None, operational), completed=5) is None
    changed = load_config(None, ["server.rounds=5", "partition.num_clients=30", "client.lr=0.5"])
    problem = config_change_problem(stored, changed, completed=5)
    assert problem is not None
    assert problem.startswith("client.lr = 0.5 differs from the run's 0.05 (and 1 more: partition")
    shorter = config_change_problem(stored, load_config(None, ["server.rounds=4"]), completed=5)
    assert shorter is not None and "may grow, not shrink below 5" in shorter


def test_a_site_is_told_what_it_trains_with_not_the_servers_paths_or_other_sites() -> None:
    config = load_config(
        None,
        [
            "deploy.keys=/srv/secret/keys",
            "deploy.state_dir=/srv/state",
            "deploy.site_examples={alice = 900, bob = 12}",
            "runtime.threads=2",
            'runtime.backend="ray"',
            'runtime.ray_address="10.0.0.9:6379"',
        ],
    )
    text = site_config_toml(config)
    assert "/srv" not in text and "900" not in text and "10.0.0.9" not in text
    site = RunConfig.model_validate(tomllib.loads(text))
    assert site.runtime.threads == 2 and site.model == config.model
    assert site.privacy == config.privacy and site.client == config.client
