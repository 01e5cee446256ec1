"""The run report: learning curves, time and traffic per round, every recorded metric, and the
partition's label distribution."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedforge.report.history import DP_SGD_MAX, History

TIME_LABELS = (
    "client training (the fit exchange: local training and transport)",
    "server: validation, aggregation and update",
    "evaluation (central and federated)",
)


def plot_report(
    history: History, label_counts: np.ndarray | None, path: Path, title: str = ""
) -> None:
    """Write a PNG of what the run recorded."""
    import matplotlib.pyplot as plt

    fig = report_figure(history, label_counts, title)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def report_figure(history: History, label_counts: np.ndarray | None, title: str = "") -> Any:
    """The report as a matplotlib figure: accuracy and loss per round (round 0 is the
    initial model), accuracy against cumulative traffic and wall time, time per round by
    part, cumulative traffic, stage and client metrics, and the partition's labels (for RL
    agents, whose records report ``trajectories``: the return against the trajectories each
    agent has collected so far)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in history]
    accuracy = [100 * r.test_accuracy for r in history]
    score = _workload_score(history)  # a workload's own central evaluation, if it has one
    if score is not None:
        accuracy = [r.metrics.get(score, math.nan) for r in history]
    trained = [r for r in history if r.round > 0]
    clock = history.metric("clock.time")
    columns = 4 if clock else 3  # the virtual clock adds a column of its own
    fig = plt.figure(figsize=(6 * columns, 14))
    grid = fig.add_gridspec(3, columns)
    ax_acc, ax_loss, ax_comm = (fig.add_subplot(grid[0, i]) for i in range(3))
    ax_wall, ax_time, ax_bytes = (fig.add_subplot(grid[1, i]) for i in range(3))
    ax_metrics, ax_part = fig.add_subplot(grid[2, 0]), fig.add_subplot(grid[2, 1:])
    if clock:
        _clock_axes(fig.add_subplot(grid[0, 3]), fig.add_subplot(grid[1, 3]), history)
    ax_acc.plot(rounds, accuracy, marker=".", label="central test")
    for key, label in (
        ("fed_eval.accuracy", "federated eval"),
        ("fed_eval.accuracy.worst10", "federated eval, worst 10% of clients"),
        ("fed_eval.personal_accuracy", "personal models"),
        ("fed_eval.personal_accuracy.worst10", "personal models, worst 10%"),
    ):
        fed = history.metric(key)
        if fed:
            ax_acc.plot([r for r, _ in fed], [100 * v for _, v in fed], marker=".", label=label)
    ax_acc.set(title="Accuracy (round 0: the initial model)", xlabel="round", ylabel="accuracy (%)")
    ax_acc.legend(loc="lower right")
    # (DP-SGD: the largest epsilon any client has reported so far)
    epsilon = history.metric("dp.epsilon") or history.metric(DP_SGD_MAX)
    if epsilon:
        _privacy_axis(ax_acc, epsilon, history[-1].labels)
    ax_loss.plot(rounds, [r.test_loss for r in history], marker=".", label="central test")
    ax_loss.plot(
        [r.round for r in trained],
        [r.train_loss for r in trained],
        marker=".",
        label="train (mean over accepted clients' local steps)",
    )
    ax_loss.set(title="Loss", xlabel="round", ylabel="cross-entropy")
    ax_loss.legend(loc="upper right")
    megabytes = np.cumsum([(r.bytes_down + r.bytes_up) / 1e6 for r in history])
    ax_comm.plot(megabytes, accuracy, marker=".")
    ax_comm.set(
        title="Accuracy vs communication",
        xlabel="cumulative traffic, down + up (MB)",
        ylabel="accuracy (%)",
    )
    ax_wall.plot(np.cumsum([r.wall_seconds for r in history]), accuracy, marker=".")
    ax_wall.set(title="Accuracy vs time", xlabel="cumulative wall time (s)", ylabel="accuracy (%)")
    if score is not None:
        for ax in (ax_acc, ax_comm, ax_wall):
            ax.set_title(ax.get_title().replace("Accuracy", score))
            ax.set_ylabel(score)
    x = [r.round for r in trained]
    fields = ("train_seconds", "aggregate_seconds", "eval_seconds")
    seconds = np.array([[getattr(r, f) for r in trained] for f in fields]).reshape(3, -1)
    _stacked_steps(ax_time, np.asarray(x, float), seconds, TIME_LABELS)
    ax_time.set(title="Wall time per round (stacked)", xlabel="round", ylabel="seconds")
    ax_time.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    ax_bytes.plot(x, np.cumsum([r.bytes_down for r in trained]) / 1e6, label="down (model)")
    ax_bytes.plot(x, np.cumsum([r.bytes_up for r in trained]) / 1e6, label="up (updates)")
    ax_bytes.set(title="Cumulative traffic", xlabel="round", ylabel="MB")
    ax_bytes.legend()
    names = sorted(
        {k for r in history for k in r.metrics if not k.startswith(("fed_eval.", "dp.", "clock."))}
    )
    if history.metric(TRAJECTORIES):
        # (a deployment plots no label counts: its sampled agents stand for the population)
        agents = len(label_counts) if label_counts is not None else None
        _return_vs_trajectories(ax_part, history, agents or max(r.clients_sampled for r in history))
    else:
        _label_bars(ax_part, label_counts, plt)
    for name in names:
        series = history.metric(name)
        ax_metrics.plot([r for r, _ in series], [v for _, v in series], marker=".", label=name)
    ax_metrics.plot(x, [r.clients_rejected for r in trained], label="clients rejected")
    ax_metrics.plot(x, [r.clients_failed for r in trained], label="clients failed")
    ax_metrics.set(title="Stage and client metrics", xlabel="round")
    ax_metrics.legend(fontsize=8)
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig


def _clock_axes(ax_acc: Any, ax_round: Any, history: History) -> None:
    """Accuracy against simulated hours, and the simulated length of each round (virtual
    clock runs: ``runtime/clock.py``)."""
    timed = [r for r in history if "clock.time" in r.metrics or r.round == 0]
    evaluated = [r for r in timed if not math.isnan(r.test_accuracy)]
    hours = [r.metrics.get("clock.time", 0.0) / 3600 for r in evaluated]
    ax_acc.plot(hours, [100 * r.test_accuracy for r in evaluated], ".-")
    ax_acc.set(title="Accuracy on the virtual clock", xlabel="simulated hours", ylabel="%")
    seconds = history.metric("clock.seconds")
    ax_round.plot([r for r, _ in seconds], [v for _, v in seconds], ".", label="round length")
    ax_round.set(title="Simulated seconds per round", xlabel="round", ylabel="seconds")
    ax_round.legend()


def _privacy_axis(ax: Any, epsilon: list[tuple[int, float]], labels: dict[str, str]) -> None:
    """Cumulative epsilon on a second axis beside accuracy; a seeded-noise run says so."""
    twin = ax.twinx()
    twin.plot([r for r, _ in epsilon], [v for _, v in epsilon], color="tab:red", label="epsilon")
    twin.set_ylabel("epsilon (cumulative)", color="tab:red")
    twin.tick_params(axis="y", colors="tab:red")
    twin.legend(loc="lower right")
    mode = labels.get("dp.mode", "")
    seeded = "SEEDED" in labels.get("dp.noise", "")
    adjacency = labels.get("dp.adjacency", "").split(" (")[0]
    ax.set_title(
        f"Accuracy and privacy ({mode} DP{', seeded noise' if seeded else ''}"
        f"{', ' + adjacency if adjacency else ''})"
    )


def _stacked_steps(ax: Any, x: np.ndarray, values: np.ndarray, labels: Sequence[str]) -> None:
    """Stacked step areas (one polygon per series: fast for hundreds of columns)."""
    bottom = np.zeros(values.shape[1])
    for row, label in zip(values, labels, strict=True):
        ax.fill_between(x, bottom, bottom + row, step="mid", label=label, linewidth=0)
        bottom = bottom + row


MAX_LABEL_SERIES = 20  # beyond this many labels (a vocabulary), the rest is one "other"
TRAJECTORIES = "trajectories"  # an RL agent's trajectories in a round (fedforge.rl.workload)
RETURNS = (
    ("test_episode_return", "global policy, held-out physics"),
    ("fed_eval.episode_return", "global policy, agents' own environments"),
    ("episode_return", "agents' local episodes"),
)


def _workload_score(history: History) -> str | None:
    """The first ``test_<name>`` metric of a workload's own evaluation, when the run has no
    built-in accuracy."""
    if any(not math.isnan(r.test_accuracy) for r in history):
        return None
    names = sorted({k for r in history for k in r.metrics if k.startswith("test_")})
    return names[0] if names else None


def trajectories_per_agent(history: History, agents: int) -> list[tuple[int, float]]:
    """(round, trajectories per agent so far): each round adds the accepted agents' mean
    trajectories times their share of the ``agents``."""
    total, out = 0.0, [(0, 0.0)]
    for r in history:
        if r.round > 0 and TRAJECTORIES in r.metrics:
            total += r.metrics[TRAJECTORIES] * r.clients_completed / max(agents, 1)
        if r.round > 0:
            out.append((r.round, total))
    return out


def _return_vs_trajectories(ax: Any, history: History, agents: int) -> None:
    used = dict(trajectories_per_agent(history, agents))
    for key, label in RETURNS:
        series = [(used[r], v) for r, v in history.metric(key) if r in used]
        if series:
            ax.plot([u for u, _ in series], [v for _, v in series], marker=".", label=label)
    ax.set(
        title="Mean episode return vs trajectories per agent",
        xlabel="trajectories per agent so far",
        ylabel="mean episode return",
    )
    ax.legend(fontsize=8)


def _label_bars(ax: Any, label_counts: np.ndarray | None, plt: Any) -> None:
    if label_counts is None:  # sites with their own data: their labels never leave them
        ax.set(title="Examples per client by label")
        ax.text(0.5, 0.5, "each site's labels stay on the site", ha="center", va="center")
        return
    clients = np.arange(len(label_counts), dtype=float)
    labels = [str(label) for label in range(label_counts.shape[1])]
    if len(labels) > MAX_LABEL_SERIES:  # the most frequent labels, then everything else
        top = np.sort(np.argsort(-label_counts.sum(0), kind="stable")[: MAX_LABEL_SERIES - 1])
        rest = np.delete(label_counts, top, axis=1).sum(1, keepdims=True)
        label_counts = np.concatenate([label_counts[:, top], rest], axis=1)
        labels = [*(str(label) for label in top), "other"]
    cmap = plt.get_cmap("tab10" if label_counts.shape[1] <= 10 else "tab20")
    ax.set_prop_cycle(color=[cmap(i % cmap.N) for i in range(len(labels))])
    _stacked_steps(ax, clients, label_counts.T.astype(float), labels)
    ax.set(title="Examples per client by label", xlabel="client", ylabel="examples")
    # Beside the plot, never over the bars.
    ax.legend(
        title="label",
        fontsize=7,
        ncol=1 + len(labels) // 12,
        loc="upper left",
        bbox_to_anchor=(1.005, 1.0),
    )
