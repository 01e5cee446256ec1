"""The run report: learning curves and the partition's label distribution."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedforge.report.history import History


def plot_report(history: History, label_counts: np.ndarray, path: Path) -> None:
    """Write a PNG with accuracy, loss per round, and per-client label distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in history]
    fig, (ax_acc, ax_loss, ax_part) = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_acc.plot(rounds, [100 * r.test_accuracy for r in history], marker=".")
    ax_acc.set(title="Test accuracy", xlabel="round", ylabel="accuracy (%)")
    ax_acc.grid(alpha=0.3)
    ax_loss.plot(rounds, [r.test_loss for r in history], marker=".", label="test")
    ax_loss.plot(rounds, [r.train_loss for r in history], marker=".", label="train (clients)")
    ax_loss.set(title="Loss", xlabel="round", ylabel="cross-entropy")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    clients = np.arange(len(label_counts))
    bottom = np.zeros(len(label_counts))
    cmap = plt.get_cmap("tab10" if label_counts.shape[1] <= 10 else "tab20")
    for label in range(label_counts.shape[1]):
        ax_part.bar(
            clients,
            label_counts[:, label],
            bottom=bottom,
            width=1.0,
            color=cmap(label % cmap.N),
            label=str(label),
        )
        bottom += label_counts[:, label]
    ax_part.set(title="Examples per client by label", xlabel="client", ylabel="examples")
    ax_part.legend(title="label", fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
