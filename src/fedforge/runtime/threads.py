"""How many torch threads a simulation uses, chosen from what other processes leave free.

torch's intra-op thread pool synchronizes at the end of every parallel operation, so one of
its threads preempted by another process stalls all of them: on 2 cores with one busy
elsewhere, two threads ran a vectorized round 10x slower than one thread. The default is
therefore decided from measurement, not from the core count: :class:`ThreadGovernor` starts
with one thread, reads how much CPU the *other* processes used since its last look (the
machine's busy time in ``/proc/stat`` minus this process's own), and takes every core only
while the others leave them idle, fewer when they do not. It looks again before each round
(once at least :data:`WINDOW` seconds have passed) and logs every change with its reason.
An explicit thread count is used as given.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("fedforge")

WINDOW = 0.25  # seconds of measurement before a decision (the counters tick at 100 Hz)
IDLE_ENOUGH = 0.3  # cores others may use while every core is still taken


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _machine_busy() -> float | None:
    """Seconds of CPU time spent busy by every process since boot, or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Choice:
    threads: int
    reason: str


def decide(cores: int, others: float | None) -> Choice:
    """Threads for ``cores`` usable cores when other processes use ``others`` cores (None:
    unknown). Every core only when the others leave them idle; otherwise the cores they leave
    free, at least one (a thread pool sharing a core with another process loses more than
    the extra thread gains)."""
    if cores == 1:
        return Choice(1, "one usable core")
    if others is None:
        return Choice(1, "the load of other processes cannot be measured here")
    if others <= IDLE_ENOUGH:
        return Choice(cores, f"other processes use {others:.1f} of {cores} cores")
    threads = max(1, math.floor(cores - others + 0.2))
    return Choice(threads, f"other processes use {others:.1f} of {cores} cores")


class ThreadGovernor:
    """Sets torch's thread count before each round: ``fixed`` if given, else :func:`decide`
    on the other processes' CPU use since the last decision (one thread until measured)."""

    def __init__(self, fixed: int | None = None, cores: int | None = None) -> None:
        self.fixed = fixed
        self.cores = cores or usable_cores()
        self.threads = fixed or 1
        self._mark = self._sample()
        torch.set_num_threads(self.threads)
        if fixed is not None:
            log.info("torch threads: %d (runtime.threads)", fixed)
        elif self.cores > 1:
            log.info(
                "torch threads: 1 until the load of other processes is measured; then every "
                "core only while they are idle (runtime.threads fixes the count)"
            )

    @staticmethod
    def _sample() -> tuple[float, float | None, float]:
        return time.monotonic(), _machine_busy(), _own_cpu()

    def others(self) -> float | None:
        """Cores other processes used since the last decision; None before :data:`WINDOW`
        seconds have passed, or where it cannot be measured."""
        now, busy, own = self._sample()
        then, busy_then, own_then = self._mark
        if now - then < WINDOW or busy is None or busy_then is None:
            return None
        self._mark = (now, busy, own)
        return max(0.0, (busy - busy_then) - (own - own_then)) / (now - then)

    def before_round(self) -> int:
        """Decide (and set) the thread count for the next round."""
        if self.fixed is not None or self.cores == 1:
            torch.set_num_threads(self.threads)
            return self.threads
        others = self.others()
        if others is not None:
            choice = decide(self.cores, others)
            if choice.threads != self.threads:
                log.info(
                    "torch threads: %d -> %d (%s)", self.threads, choice.threads, choice.reason
                )
                self.threads = choice.threads
        torch.set_num_threads(self.threads)
        return self.threads
