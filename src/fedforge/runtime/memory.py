"""Will a model train in this machine's memory? Estimated before training, so that a model
far too large stops with the numbers and what to lower instead of an allocator's traceback
(or the kernel's OOM killer) in the middle of a round."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fedforge.core.errors import ConfigError

log = logging.getLogger("fedforge")

# Float32 copies of the parameters a simulation holds at once, at least: the model, the
# evaluation copy, the client program's copy, the global state, a client's trained weights
# and gradient, its record, and the float64 running sum (two copies' worth).
BASE_COPIES = 8


def training_bytes(num_params: int, optimizer_copies: int = 0, bytes_per_param: int = 4) -> int:
    """A lower estimate of the memory one simulation of a ``num_params`` model needs, with
    ``optimizer_copies`` more copies of the model in optimizer state (server Adam: 2, local
    momentum: 1)."""
    return num_params * bytes_per_param * (BASE_COPIES + optimizer_copies)


def machine_memory() -> tuple[int | None, int | None]:
    """(total, available) bytes of this machine's memory; None where it cannot tell."""
    try:
        fields = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields[name] = int(value.split()[0]) * 1024
        return fields.get("MemTotal"), fields.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None, None


def _gb(count: int) -> str:
    return f"{count / 1e9:.3g} GB"


def check_training_memory(
    num_params: int,
    *,
    optimizer_copies: int = 0,
    what_to_lower: str = "use a smaller model",
    memory: tuple[int | None, int | None] | None = None,
) -> None:
    """Refuse (ConfigError) a model whose training cannot fit in this machine's memory at
    all, with the estimate and ``what_to_lower``; warn when it exceeds what is free now."""
    total, available = memory if memory is not None else machine_memory()
    need = training_bytes(num_params, optimizer_copies)
    summary = (
        f"the model has {num_params:,} parameters ({_gb(4 * num_params)} as float32); "
        f"training it needs at least {_gb(need)} of memory"
    )
    if total is not None and need > total:
        raise ConfigError(f"{summary}, more than this machine's {_gb(total)}: {what_to_lower}")
    if available is not None and need > available:
        log.warning("%s and %s is free now: the run may swap or be killed", summary, _gb(available))
