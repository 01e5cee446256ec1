"""Checkpoints are verified on resume: a damaged newest round falls back to the previous
intact one with a warning; a directory with checkpoints but no run is never started over."""

from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fedforge.algorithms.base import ServerState
from fedforge.core.errors import FedforgeError
from fedforge.report.history import History, RoundRecord
from fedforge.runtime.checkpoint import KEY_FILE, CheckpointStore, file_digest


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


def _forge(directory: Path, round_number: int, value: float) -> None:
    """What someone who can write the state directory but not read its key can do: change a
    checkpoint's floats and record the new file's SHA-256 in the database."""
    path = directory / f"round_{round_number:06d}.safetensors"
    store = CheckpointStore(directory)
    arrays = {k: np.full_like(v, value) for k, v in load_file(str(path)).items()}
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    save_file(arrays, str(path), metadata=metadata)
    with store.db:
        store.db.execute(
            "UPDATE rounds SET digest = ? WHERE round = ?", (file_digest(path), round_number)
        )
    store.close()


def test_a_modified_checkpoint_or_record_is_refused_not_only_a_corrupted_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = _three_rounds(tmp_path)
    key = tmp_path / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    _forge(tmp_path, 3, 99.0)  # digest recomputed: only the HMAC can tell
    with caplog.at_level(logging.WARNING, "fedforge"):
        resumed, state, _ = _resume(tmp_path)
    assert (resumed, state.round) == (run_id, 2)
    assert "round 3's row fails its HMAC (modified)" in caplog.text
    # A record of an earlier round edited in the database (say, to lower a reported epsilon).
    store = CheckpointStore(tmp_path)
    with store.db:
        store.db.execute("UPDATE rounds SET record = replace(record, '0.5', '0.9') WHERE round = 1")
    store.close()
    with pytest.raises(FedforgeError, match=r"round 1 .* fails its HMAC: it was modified"):
        _resume(tmp_path)
    # Without its key, a keyed run cannot be authenticated: refused, not re-keyed.
    _three_rounds(tmp_path / "other")
    (tmp_path / "other" / KEY_FILE).unlink()
    with pytest.raises(FedforgeError, match=r"checkpoint\.key is missing"):
        _resume(tmp_path / "other")


def test_checkpoints_from_before_keying_are_verified_then_keyed_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = _three_rounds(tmp_path)
    (tmp_path / KEY_FILE).unlink()
    store = CheckpointStore(tmp_path)
    with store.db:
        store.db.execute("UPDATE rounds SET mac = NULL")  # as an older fedforge wrote them
    store.close()
    with caplog.at_level(logging.WARNING, "fedforge"):
        assert _resume(tmp_path)[:2][0] == run_id
    assert caplog.text.count("verified by their SHA-256 and keyed now") == 1
    caplog.clear()
    resumed, state, history = _resume(tmp_path)  # keyed from now on: no second warning
    assert (resumed, state.round, len(history)) == (run_id, 3, 4) and not caplog.text
    _forge(tmp_path, 3, 5.0)
    assert _resume(tmp_path)[1].round == 2
