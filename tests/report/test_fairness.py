"""Worst-decile accuracy, by hand."""

import math

import pytest

from fedforge.report.fairness import client_spread, worst_share_mean


def test_worst_decile_is_the_mean_of_the_lowest_tenth() -> None:
    values = [
        0.9,
        0.1,
        0.5,
        0.3,
        1.0,
        0.8,
        0.7,
        0.6,
        0.2,
        0.4,
        0.95,
        0.85,
        0.75,
        0.65,
        0.55,
        0.45,
        0.35,
        0.25,
        0.15,
        0.05,
    ]
    assert worst_share_mean(values) == (0.05 + 0.1) / 2  # 2 of 20
    assert worst_share_mean([0.7, 0.2, 0.9]) == 0.2  # at least one client
    assert math.isnan(worst_share_mean([]))


def test_client_spread_names_accuracy_metrics_only() -> None:
    out = client_spread({"accuracy": [0.5, 1.0, 0.9], "loss": [1.0, 2.0, 3.0]}, "fed_eval.")
    assert out == {
        "fed_eval.accuracy.client_mean": pytest.approx(0.8),
        "fed_eval.accuracy.worst10": 0.5,
        "fed_eval.accuracy.min": 0.5,
    }


def test_fairness_text_reports_global_and_personal() -> None:
    from fedforge.report.fairness import fairness_text

    metrics = {
        "fed_eval.accuracy.client_mean": 0.8,
        "fed_eval.accuracy.worst10": 0.4,
        "fed_eval.personal_accuracy.client_mean": 0.9,
        "fed_eval.personal_accuracy.worst10": 0.7,
    }
    assert fairness_text(metrics) == (
        "per-client accuracy: global 80.0% (worst 10% 40.0%), personal 90.0% (worst 10% 70.0%)"
    )
    assert fairness_text({}) == ""
