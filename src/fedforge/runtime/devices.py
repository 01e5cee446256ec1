"""Simulated client devices: compute speed, bandwidths and availability.

Each client has a speed (local SGD steps per second), a download and an upload bandwidth
(bits per second) and an availability pattern (when it may be sampled). Profiles are drawn
from distributions (:func:`draw_devices`: log-normal speeds and bandwidths, a share of
always-on clients, diurnal or random on/off availability) or read from a CSV trace
(:func:`read_trace`). Everything here is a pure function of the seed and the simulated time,
so a resumed run sees the same devices.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from fedforge.core.errors import ConfigError

Pattern = Literal["always", "diurnal", "random"]
DAY = 86_400.0


class Availability(Protocol):
    """Which clients are online at simulated time ``t``."""

    def online(self, ids: np.ndarray, t: float) -> np.ndarray: ...

    @property
    def resolution(self) -> float:
        """Seconds to wait before looking again when nobody is online."""
        ...


@dataclass(frozen=True)
class AlwaysOn:
    resolution: float = 60.0

    def online(self, ids: np.ndarray, t: float) -> np.ndarray:
        return np.ones(len(ids), bool)


@dataclass(frozen=True)
class Diurnal:
    """Client i is online ``fraction`` of every ``period``, from its own ``phase[i]``;
    ``always[i]`` clients are online all the time."""

    phase: np.ndarray
    fraction: float
    always: np.ndarray
    period: float = DAY
    resolution: float = 60.0

    def online(self, ids: np.ndarray, t: float) -> np.ndarray:
        offset = np.mod(t - self.phase[ids], self.period)
        online: np.ndarray = self.always[ids] | (offset < self.fraction * self.period)
        return online


@dataclass
class RandomOnOff:
    """Time is cut into slots of ``slot`` seconds; in each slot every client is online with
    probability ``fraction``, independently (seeded by the slot: the same every run);
    ``always[i]`` clients are online all the time."""

    seed: int
    fraction: float
    always: np.ndarray
    slot: float = 600.0
    _cache: tuple[int, np.ndarray] | None = field(default=None, repr=False)

    @property
    def resolution(self) -> float:
        return self.slot

    def online(self, ids: np.ndarray, t: float) -> np.ndarray:
        index = int(t // self.slot)
        if self._cache is None or self._cache[0] != index:
            draws = np.random.default_rng((self.seed, index)).random(len(self.always))
            self._cache = (index, draws < self.fraction)
        online: np.ndarray = self.always[ids] | self._cache[1][ids]
        return online


@dataclass(frozen=True)
class Intervals:
    """Explicit online intervals ``[start, end)`` in seconds (a trace), repeating every
    ``period`` seconds (0: not repeating); clients without intervals are always online."""

    client: np.ndarray  # one row per interval
    start: np.ndarray
    end: np.ndarray
    always: np.ndarray  # per client
    period: float = DAY
    resolution: float = 60.0

    def online(self, ids: np.ndarray, t: float) -> np.ndarray:
        tm = math.fmod(t, self.period) if self.period > 0 else t
        hit = np.zeros(len(self.always), bool)
        hit[self.client[(self.start <= tm) & (tm < self.end)]] = True
        online: np.ndarray = (self.always | hit)[ids]
        return online


@dataclass(frozen=True)
class Devices:
    """One row per client: ``speed`` in local steps per second, ``down`` and ``up`` in bits
    per second, and when each client is online."""

    speed: np.ndarray
    down: np.ndarray
    up: np.ndarray
    availability: Availability = field(default_factory=AlwaysOn)

    def __post_init__(self) -> None:
        n = len(self.speed)
        if len(self.down) != n or len(self.up) != n:
            raise ConfigError("devices: speed, down and up need one value per client")
        for name in ("speed", "down", "up"):
            values = np.asarray(getattr(self, name), np.float64)
            if not (np.isfinite(values).all() and (values > 0).all()):
                raise ConfigError(f"devices: every {name} must be a positive number")

    def __len__(self) -> int:
        return len(self.speed)

    def online(self, ids: Sequence[int], t: float) -> np.ndarray:
        """Mask of ``ids`` online at time ``t``."""
        return self.availability.online(np.asarray(ids, np.int64), t)

    @property
    def always_online(self) -> bool:
        """Whether every client is online all the time (who may be sampled never changes)."""
        return always_online(self.availability, len(self))

    def durations(
        self, ids: Sequence[int], steps: np.ndarray, bytes_down: int, bytes_up: int
    ) -> np.ndarray:
        """Simulated seconds of each client's task: ``steps / speed + 8 * bytes_down / down
        + 8 * bytes_up / up``."""
        return client_seconds(
            np.asarray(steps, np.float64),
            self.speed[ids],
            self.down[ids],
            self.up[ids],
            bytes_down,
            bytes_up,
        )


def always_online(availability: Availability, num_clients: int) -> bool:
    """Whether ``availability`` keeps all ``num_clients`` clients online at every time (an
    availability that cannot say is taken as partial)."""
    if isinstance(availability, AlwaysOn):
        return True
    always = getattr(availability, "always", None)
    return always is not None and len(always) >= num_clients and bool(np.all(always))


def client_seconds(
    steps: np.ndarray,
    speed: np.ndarray,
    down_bps: np.ndarray,
    up_bps: np.ndarray,
    bytes_down: float,
    bytes_up: float,
) -> np.ndarray:
    """Compute time plus transfer times (bandwidths in bits per second)."""
    seconds: np.ndarray = steps / speed + 8.0 * bytes_down / down_bps + 8.0 * bytes_up / up_bps
    return seconds


def draw_devices(
    num_clients: int,
    rng: np.random.Generator,
    *,
    speed_median: float = 1.0,
    speed_sigma: float = 1.0,
    down_mbps: float = 20.0,
    up_mbps: float = 5.0,
    bandwidth_sigma: float = 0.5,
    pattern: Pattern = "always",
    online_fraction: float = 1.0,
    always_on: float = 0.0,
    slot_seconds: float = 600.0,
    period_seconds: float = DAY,
) -> Devices:
    """Log-normal speeds and bandwidths around their medians; availability by ``pattern``
    (``online_fraction``: the share of time a client that is not always on is online)."""
    speed = speed_median * rng.lognormal(0.0, speed_sigma, num_clients)
    down = down_mbps * 1e6 * rng.lognormal(0.0, bandwidth_sigma, num_clients)
    up = up_mbps * 1e6 * rng.lognormal(0.0, bandwidth_sigma, num_clients)
    always = rng.random(num_clients) < always_on
    availability: Availability
    if pattern == "always":
        availability = AlwaysOn()
    elif pattern == "diurnal":
        phase = rng.uniform(0.0, period_seconds, num_clients)
        availability = Diurnal(phase, online_fraction, always, period_seconds)
    else:
        seed = int(rng.integers(2**63))
        availability = RandomOnOff(seed, online_fraction, always, slot_seconds)
    return Devices(speed, down, up, availability)


TRACE_COLUMNS = ("client", "speed", "down_mbps", "up_mbps", "online")


def read_trace(path: Path, num_clients: int, period_seconds: float = DAY) -> Devices:
    """Devices from a CSV trace: a header ``client,speed,down_mbps,up_mbps,online`` and one
    row per client 0..N-1; ``online`` lists intervals ``start-end`` in seconds separated by
    ``;`` (repeating every ``period_seconds``, 0: not repeating), empty for always online."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise ConfigError(f"clock.trace: file not found: {path}") from None
    if rows and set(TRACE_COLUMNS) - set(rows[0]):
        missing = ", ".join(sorted(set(TRACE_COLUMNS) - set(rows[0])))
        raise ConfigError(f"clock.trace {path}: missing column(s) {missing}")
    speed, down, up = (np.zeros(num_clients) for _ in range(3))
    seen = np.zeros(num_clients, bool)
    owner: list[int] = []
    starts: list[float] = []
    ends: list[float] = []
    with_intervals = np.zeros(num_clients, bool)
    for line, row in enumerate(rows, start=2):
        where = f"clock.trace {path} line {line}"
        try:
            cid = int(row["client"])
            values = [float(row[k]) for k in ("speed", "down_mbps", "up_mbps")]
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: client must be an integer and rates numbers") from None
        if not 0 <= cid < num_clients or seen[cid]:
            raise ConfigError(
                f"{where}: client {cid} is out of range 0..{num_clients - 1} or repeated"
            )
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ConfigError(f"{where}: speed and bandwidths must be positive")
        seen[cid] = True
        speed[cid], down[cid], up[cid] = values[0], values[1] * 1e6, values[2] * 1e6
        for part in filter(None, (p.strip() for p in (row["online"] or "").split(";"))):
            a, sep, b = part.partition("-")
            try:
                start, end = float(a), float(b)
            except ValueError:
                raise ConfigError(f"{where}: bad interval {part!r} (want start-end)") from None
            if not sep or not 0 <= start < end:
                raise ConfigError(f"{where}: bad interval {part!r} (want 0 <= start < end)")
            owner.append(cid)
            starts.append(start)
            ends.append(end)
            with_intervals[cid] = True
    if not seen.all():
        raise ConfigError(
            f"clock.trace {path}: no row for client(s) {np.flatnonzero(~seen)[:10].tolist()} "
            f"(the run has {num_clients} clients)"
        )
    availability = Intervals(
        np.array(owner, np.int64),
        np.array(starts),
        np.array(ends),
        ~with_intervals,
        period_seconds,
    )
    return Devices(speed, down, up, availability)
