"""What a deployment's state directory fixes for the life of its run, checked at every start:
the client ids, the partition each id trains on, and the configuration.

Pure functions of what is stored and what is asked for; each problem is one line that says
what to change.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping, Sequence

from fedforge.config import RunConfig, to_toml
from fedforge.core.errors import ConfigError
from fedforge.report.history import History
from fedforge.report.trackers import flat_config
from fedforge.runtime.checkpoint import CheckpointStore

log = logging.getLogger("fedforge")
CONFIG_KEY = "config"  # the run's configuration (TOML) in the checkpoint's metadata

# Keys a resumed run may change: how the server operates, not what it computes.
# (``server.rounds`` may grow too: the run is extended.)
OPERATIONAL_SECTIONS = ("deploy.", "runtime.", "attack.")
ROUNDS = "server.rounds"


def assign_client_ids(stored: Mapping[str, int], registered: Sequence[str]) -> dict[str, int]:
    """Client ids that never change during a run: a name keeps the id stored for it; names
    new to the run take the next ids, in sorted order (so a new run numbers its clients in
    sorted name order). Ids of names no longer registered are never reused."""
    ids = {name: stored[name] for name in registered if name in stored}
    next_id = max(stored.values(), default=-1) + 1
    for name in sorted(set(registered) - set(stored)):
        ids[name] = next_id
        next_id += 1
    return ids


def partition_problem(
    ids: Mapping[str, int], partitions: int, new: Sequence[str], run_id: str | None
) -> str | None:
    """Why a client of ``ids`` would have no share of the built-in dataset's ``partitions``
    (None when every one has). ``new``: names this start adds; ``run_id``: the run resumed
    (None for a new run)."""
    beyond = sorted((i, name) for name, i in ids.items() if i >= partitions)
    if not beyond:
        return None
    names = ", ".join(f"{name} (id {i})" for i, name in beyond)
    needed = beyond[-1][0] + 1
    own = 'or deploy.client_data = "own" and start the clients with --data'
    if run_id is None or not set(new) & {name for _, name in beyond}:
        return (
            f"{len(ids)} clients are registered but partition.num_clients = {partitions}: "
            f"{names} would have no share of the built-in dataset; set "
            f"partition.num_clients = {needed} (or more), {own}"
        )
    return (
        f"run {run_id} splits the built-in dataset into {partitions} shares "
        f"(partition.num_clients, fixed for the run), so the newly registered {names} would "
        f"have none: start a new run with partition.num_clients = {needed} (another "
        "deploy.state_dir, or --new-run), or remove the client's certificate from the keys "
        "directory's clients/"
    )


def config_change_problem(stored_toml: str, config: RunConfig, completed: int) -> str | None:
    """Why ``config`` cannot resume the run configured by ``stored_toml`` (None when it can).

    A run keeps what it computes with: only ``[deploy]``, ``[runtime]`` and ``[attack]``
    (which the server ignores) may change, and ``server.rounds`` may grow
    (down to ``completed``, the rounds done)."""
    try:
        stored = RunConfig.model_validate(tomllib.loads(stored_toml))
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"the stored configuration of the run is unreadable: {exc}") from None
    before = flat_config(stored.model_dump(mode="json"))
    after = flat_config(config.model_dump(mode="json"))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    refused = [k for k in changed if k != ROUNDS and not k.startswith(OPERATIONAL_SECTIONS)]
    if refused:
        key = refused[0]
        more = f" (and {len(refused) - 1} more: {', '.join(refused[1:])})" if refused[1:] else ""
        return (
            f"{key} = {after.get(key)} differs from the run's {before.get(key)}{more}: a "
            "run's configuration is fixed (only [deploy], [runtime] and server.rounds may "
            "change); restore it, or start a new run in another deploy.state_dir or with "
            "--new-run"
        )
    if config.server.rounds < completed:
        return (
            f"server.rounds = {config.server.rounds}, but the run has completed {completed} "
            f"rounds: server.rounds may grow, not shrink below {completed}"
        )
    return None


def settle_run(
    store: CheckpointStore,
    config: RunConfig,
    registered: Sequence[str],
    partitions: int | None,
    run_id: str,
    history: History,
) -> dict[str, int]:
    """At a server's start: refuse a configuration the stored run cannot take (one line
    naming the key), say when ``server.rounds`` extends it, fix the registered clients' ids
    (see :func:`assign_client_ids`) and refuse ids without a share of the built-in dataset;
    record the ids and the configuration. ``partitions`` None: a run on the sites' own data
    (a workload, ``data.sites`` or ``data.loader``), which has no built-in shares. Returns
    name -> id."""
    resumed = bool(history)
    if resumed:
        stored = store.meta(CONFIG_KEY)
        legacy = store.directory / "config.toml"  # state directories from before it was kept
        if stored is None and legacy.is_file():
            stored = legacy.read_text()
        if stored is not None:
            completed = history[-1].round
            problem = config_change_problem(stored, config, completed)
            if problem:
                raise ConfigError(f"{store.directory} holds run {run_id}: {problem}")
            before = RunConfig.model_validate(tomllib.loads(stored)).server.rounds
            if before != config.server.rounds:
                log.info(
                    "run %s: server.rounds %d -> %d (%d completed)",
                    run_id,
                    before,
                    config.server.rounds,
                    completed,
                )
    stored_ids = store.clients() if resumed else {}
    ids = assign_client_ids(stored_ids, registered)
    new = sorted(set(ids) - set(stored_ids))
    if config.deploy.client_data == "builtin" and partitions is not None:
        problem = partition_problem(ids, partitions, new, run_id if resumed else None)
        if problem:
            raise ConfigError(problem)
    if resumed and new:
        log.warning(
            "run %s: newly registered %s join with the next ids; the other clients keep theirs",
            run_id,
            ", ".join(f"{name} (id {ids[name]})" for name in new),
        )
    store.set_clients(ids)
    store.set_meta(CONFIG_KEY, to_toml(config))
    return ids


def site_config_toml(config: RunConfig) -> str:
    """The configuration a site receives: what its training needs, without the server's
    ``[deploy]`` section (file paths, addresses, other sites' sizes), its ``[runtime]``
    beyond the thread count, or the simulation-only ``[attack]``."""
    import tomli_w

    raw = config.model_dump(mode="json", exclude_none=True)
    for section in ("deploy", "attack", "project_dir"):  # (the server's own paths)
        raw.pop(section, None)
    threads = raw.pop("runtime", {}).get("threads")
    if threads is not None:
        raw["runtime"] = {"threads": threads}
    return tomli_w.dumps(raw)
