"""Where and how a run executes: simulation runtimes, the virtual clock, asynchronous
training and the network deployment."""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field

from fedforge.config.base import Section, changed


class ClockConfig(Section):
    """Simulated heterogeneous devices on a virtual clock (simulation only): each client's
    speed and bandwidths are drawn log-normally around the medians (or read from ``trace``);
    a task takes ``steps / speed + bytes down / down + bytes up / up`` simulated seconds."""

    enabled: bool = False
    speed_median: float = Field(1.0, gt=0, description="local SGD steps per second (median)")
    speed_sigma: float = Field(1.0, ge=0, description="log-normal sigma of the speeds")
    down_mbps: float = Field(20.0, gt=0, description="download bandwidth, Mbit/s (median)")
    up_mbps: float = Field(5.0, gt=0, description="upload bandwidth, Mbit/s (median)")
    bandwidth_sigma: float = Field(0.5, ge=0, description="log-normal sigma of bandwidths")
    availability: Literal["always", "diurnal", "random"] = Field(
        "always", description="diurnal: a daily window; random: on/off per slot"
    )
    online_fraction: float = Field(
        0.5, gt=0, le=1, description="diurnal, random: share of time a client is online"
    )
    always_on: float = Field(0.0, ge=0, le=1, description="share of clients always online")
    slot_s: float = Field(600.0, gt=0, description="random: seconds of one on/off slot")
    period_s: float = Field(
        86_400.0, ge=0, description="diurnal and trace: seconds before availability repeats"
    )
    trace: str | None = Field(None, description="CSV of devices (see README), replaces draws")
    deadline_s: float | None = Field(None, gt=0, description="drop clients slower than this")
    over_selection: float = Field(
        1.0, ge=1, description="sample ceil(f x clients_per_round), keep the first to finish"
    )

    def problems(self) -> list[str]:
        set_keys = changed(self, "enabled")
        if not self.enabled and set_keys:
            return [f"clock.{set_keys[0]} needs clock.enabled = true"]
        if self.availability == "diurnal" and self.period_s == 0:
            return ["clock.availability = 'diurnal' needs clock.period_s > 0"]
        return []


class AsyncConfig(Section):
    """Asynchronous training: on the virtual clock in simulation (``clock.enabled``), in real
    time on a deployment's server. ``fedbuff``: a server update every ``buffer`` arrivals, at
    most ``concurrency`` clients training, stale records weighted
    ``(1 + staleness) ** -staleness_exponent``; ``server.rounds`` counts updates."""

    mode: Literal["off", "fedbuff"] = "off"
    buffer: int = Field(10, ge=1, description="arrivals per server update (K)")
    concurrency: int = Field(100, ge=1, description="clients training at once")
    staleness_exponent: float = Field(
        0.5, ge=0, description="weight (1 + staleness)^-x: 0.5 = 1/sqrt, 0 = none"
    )
    eval_every: int = Field(1, ge=1, description="server updates between central evaluations")


class RuntimeConfig(Section):
    """How clients execute in simulation."""

    backend: Literal["auto", "sequential", "vectorized", "workers", "ray"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch threads (default: per backend)")
    num_workers: int = Field(2, ge=1, description="workers / ray: processes or actors")
    memory_budget_mb: int | None = Field(None, ge=1, description="vectorized: MiB per chunk")
    device: str | None = Field(
        None, description="vectorized: torch device (default: cuda if present)"
    )
    ray_address: str | None = Field(None, description="ray: cluster address (default: local)")


def ray_installed() -> bool:
    """Whether Ray can be imported (looked up without importing it)."""
    return importlib.util.find_spec("ray") is not None


def device_problem(name: str) -> str | None:
    """Why torch device ``name`` cannot be used on this machine, or None if it can."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        return f"{name!r} is not a torch device name; use e.g. 'cpu', 'cuda' or 'cuda:0'"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return (
                f"{name!r} needs CUDA, which is not available on this machine; "
                "use 'cpu' or leave it unset"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            return (
                f"{name!r} but this machine has {torch.cuda.device_count()} CUDA "
                "device(s); use a lower index or leave it unset"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return f"{name!r} needs MPS, which is not available; use 'cpu' or leave it unset"
    return None


class DeployConfig(Section):
    """The network server (``fedforge server``); ignored by simulations."""

    address: str = Field("127.0.0.1:8443", description="host:port to listen on")
    keys: str = Field("keys", description="keys directory from `fedforge keys init`")
    state_dir: str = Field("server-state", description="checkpoints (SQLite + safetensors)")
    min_clients: int = Field(2, ge=1, description="connected clients needed to start a round")
    min_completed: int = Field(1, ge=1, description="accepted results for a round to count")
    round_timeout_s: float = Field(120.0, gt=0, description="deadline for a client's result")
    max_retries: int = Field(3, ge=0, description="re-sampled attempts of a failed round")
    heartbeat_s: float = Field(5.0, gt=0, description="idle heartbeat interval")
    max_message_mb: int = Field(16, ge=2, description="gRPC message size limit")
    chunk_kb: int = Field(1024, ge=1, description="size of one streamed chunk")
    max_payload_mb: int = Field(4096, ge=1, description="largest model or update accepted")
    max_examples: int = Field(10_000_000, ge=1, description="hard cap on a claimed sample count")
    site_examples: dict[str, int] = Field(
        default_factory=dict,
        description="the operator's training-set size per client name: a client listed here "
        "counts at most this many examples (a larger claim is clamped, not rejected)",
    )
    max_size_ratio: float = Field(
        10.0,
        ge=0,
        description="a client not in site_examples counts at most this many times the median "
        "size every connected client declares (larger claims are clamped and the client listed "
        "in clients.clamped; evaluation counts likewise); 0: no such cap",
    )
    hello_timeout_s: float = Field(
        10.0, gt=0, description="a connection that sends no Hello within this is closed"
    )
    silent_heartbeats: float = Field(
        2.5,
        gt=1,
        description="a client silent (no heartbeat) for this many heartbeat intervals is "
        "disconnected and not sampled",
    )
    linger_s: float = Field(
        30.0,
        ge=0,
        description="after the last round, keep answering late clients that the run is "
        "complete for this long",
    )
    max_concurrent_uploads: int = Field(
        0,
        ge=0,
        description="replies received at once: each holds one update in server memory from "
        "its first chunk until its last verifies; more wait (flow control holds their "
        "clients back); 0: no limit",
    )
    memory_budget_mb: int = Field(
        0,
        ge=0,
        description="refuse to start when the server's estimated peak memory (model, server "
        "state, aggregation buffers, broadcast, replies in flight) exceeds this many MB; 0: "
        "no budget (the estimate is logged either way)",
    )
    client_data: Literal["builtin", "own"] = Field(
        "builtin",
        description="builtin: clients train on their share of the run's dataset and are held "
        "to its size; own: clients bring their own data (--data) and declare its size",
    )
