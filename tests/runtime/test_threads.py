"""The default thread count follows what other processes leave free, and says why."""

import logging
import subprocess
import sys
import time

import pytest
import torch

from fedforge.runtime.threads import ThreadGovernor, decide, usable_cores


def test_every_core_only_while_the_others_leave_them_idle() -> None:
    assert decide(8, 0.1).threads == 8
    assert decide(2, 1.0).threads == 1  # `yes` on one of two cores: one thread
    assert decide(16, 3.5).threads == 12
    assert decide(4, 9.0).threads == 1  # never fewer than one
    assert decide(2, None).threads == 1  # unknown load: the safe choice
    assert "other processes use 1.0 of 2 cores" in decide(2, 1.0).reason


def test_busy_cores_make_the_governor_take_fewer_threads(caplog: pytest.LogCaptureFixture) -> None:
    """With a busy process per core, a measured window gives fewer threads than cores, and
    the change (or the one-thread start) is in the log; a set count is used as given."""
    previous = torch.get_num_threads()
    cores = max(2, usable_cores())
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        with caplog.at_level(logging.INFO, logger="fedforge"):
            governor = ThreadGovernor(cores=cores)
            time.sleep(0.4)  # one measurement window, while they spin
            assert governor.before_round() < cores
            assert torch.get_num_threads() == governor.threads
        assert "torch threads: 1" in caplog.text
        assert ThreadGovernor(fixed=3).before_round() == 3
    finally:
        for p in busy:
            p.kill()
            p.wait()
        torch.set_num_threads(previous)
