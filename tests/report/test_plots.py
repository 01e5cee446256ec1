"""The run report: settings in the title, round 0 plotted, communication and time panels,
the time parts explained, and the label legend beside (never over) the bars."""

from __future__ import annotations

import numpy as np

from fedforge.report.history import History, RoundRecord
from fedforge.report.plots import TIME_LABELS, report_figure


def history() -> History:
    return History(
        [RoundRecord(0, 0.1, 2.3, wall_seconds=0.5)]
        + [
            RoundRecord(
                r,
                0.1 + 0.2 * r,
                2.0 - 0.3 * r,
                train_loss=1.9 - 0.3 * r,
                bytes_down=2_000_000,
                bytes_up=1_000_000,
                train_seconds=1.0,
                aggregate_seconds=0.25,
                eval_seconds=0.25,
                wall_seconds=1.5,
            )
            for r in (1, 2, 3)
        ]
    )


def test_report_figure_panels() -> None:
    import matplotlib.pyplot as plt

    labels = np.random.default_rng(0).integers(0, 30, (40, 10))
    fig = report_figure(history(), labels, "fedavg on digits, seed 3")
    try:
        assert fig._suptitle.get_text() == "fedavg on digits, seed 3"
        axes = {ax.get_title(): ax for ax in fig.axes}
        acc = axes["Accuracy (round 0: the initial model)"]
        np.testing.assert_allclose(acc.lines[0].get_xdata(), [0, 1, 2, 3])
        np.testing.assert_allclose(acc.lines[0].get_ydata(), [10, 30, 50, 70])
        comm = axes["Accuracy vs communication"].lines[0]
        np.testing.assert_allclose(comm.get_xdata(), [0, 3, 6, 9])  # cumulative MB
        wall = axes["Accuracy vs time"].lines[0]
        np.testing.assert_allclose(wall.get_xdata(), [0.5, 2.0, 3.5, 5.0])
        time_legend = axes["Wall time per round (stacked)"].get_legend()
        assert [t.get_text() for t in time_legend.get_texts()] == list(TIME_LABELS)
        assert "local training" in TIME_LABELS[0]
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        bars = axes["Examples per client by label"]
        legend = bars.get_legend().get_window_extent(renderer)
        assert not legend.overlaps(bars.get_window_extent(renderer))
        for ax in fig.axes:  # no panel's legend sits on another panel
            box = ax.get_legend() and ax.get_legend().get_window_extent(renderer)
            if box is None:
                continue
            others = [o for o in fig.axes if o is not ax]
            assert not any(box.overlaps(o.get_window_extent(renderer)) for o in others)
    finally:
        plt.close(fig)
