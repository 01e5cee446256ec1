"""Checkpoints are verified on resume: a damaged newest round falls back to the previous
intact one with a warning; a directory with checkpoints but no run is never started over."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedforge.algorithms.base import ServerState
from fedforge.core.errors import FedforgeError
from fedforge.report.history import History, RoundRecord
from fedforge.runtime.checkpoint import CheckpointStore


def _state(round_number: int) -> ServerState:
    return ServerState(round_number, {"w": np.full(64, float(round_number), np.float32)}, {})


def _three_rounds(directory: Path) -> str:
    store = CheckpointStore(directory)
    run_id, _, history = store.open_run(7, _state(0))
    for r in range(4):
        history.append(RoundRecord(round=r, test_accuracy=0.5, test_loss=1.0))
        store.save(run_id, _state(r), history)
    store.close()
    return run_id


def _resume(directory: Path) -> tuple[str, ServerState, History]:
    store = CheckpointStore(directory)
    try:
        return store.open_run(7, _state(0))
    finally:
        store.close()


def _damage_floats(path: Path) -> None:
    """Change one stored float to another finite value (the file still parses)."""
    data = bytearray(path.read_bytes())
    data[-4:] = np.float32(123.0).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        _damage_floats,
        lambda p: p.write_bytes(p.read_bytes()[:100]),  # truncated
        lambda p: shutil.copy(p.with_name("round_000002.safetensors"), p),  # an older round
        lambda p: p.unlink(),
    ],
    ids=["finite-corruption", "truncated", "older-round-copied", "deleted"],
)
def test_a_damaged_newest_round_falls_back_to_the_previous_one(
    tmp_path: Path, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = _three_rounds(tmp_path)
    damage(tmp_path / "round_000003.safetensors")  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, "fedforge"):
        resumed, state, history = _resume(tmp_path)
    assert resumed == run_id
    assert state.round == 2
    np.testing.assert_array_equal(state.params["w"], np.full(64, 2.0, np.float32))
    assert [r.round for r in history] == [0, 1, 2]
    assert "checkpoint of round 3 is unusable" in caplog.text
    assert "resuming from round 2, the newest intact checkpoint" in caplog.text


def test_no_intact_round_is_a_clear_error(tmp_path: Path) -> None:
    _three_rounds(tmp_path)
    for name in ("round_000002.safetensors", "round_000003.safetensors"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(FedforgeError, match=r"no intact checkpoint .* --new-run"):
        _resume(tmp_path)


def test_a_lost_or_unreadable_database_is_not_started_over(tmp_path: Path) -> None:
    _three_rounds(tmp_path)
    (tmp_path / "state.sqlite").unlink()
    with pytest.raises(FedforgeError, match=r"holds checkpoints .* but no run to resume"):
        _resume(tmp_path)
    (tmp_path / "state.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(FedforgeError, match=r"state\.sqlite is unreadable"):
        _resume(tmp_path)
    CheckpointStore.discard(tmp_path)  # what --new-run does
    run_id, state, history = _resume(tmp_path)
    assert state.round == 0 and not history and run_id
