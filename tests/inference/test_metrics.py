import numpy as np
import pytest

from inference.metrics import (
    at_threshold,
    bootstrap_auc,
    calibration,
    paired_bootstrap_auc_difference,
    roc_auc,
    threshold_for_sensitivity,
)


def test_auc_matches_hand_computed_values() -> None:
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert roc_auc(labels, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5  # ties count half


def test_auc_is_nan_without_both_classes() -> None:
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_the_bootstrap_interval_brackets_the_point_estimate() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = labels + rng.normal(0, 1, 200)
    auc, low, high = bootstrap_auc(labels, scores, rounds=200)
    assert low < auc < high
    assert high - low < 0.2


def test_a_paired_interval_is_narrower_than_the_two_models_own_intervals_suggest() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    shared = labels + rng.normal(0, 1, 300)  # what both models see alike
    a = shared + rng.normal(0, 0.2, 300)
    b = shared + 0.3 * labels + rng.normal(0, 0.2, 300)  # b separates the classes a little better
    difference, low, high = paired_bootstrap_auc_difference(labels, a, b, rounds=300)
    assert difference == pytest.approx(roc_auc(labels, b) - roc_auc(labels, a))
    assert 0 < low < difference < high
    _, a_low, a_high = bootstrap_auc(labels, a, rounds=300)
    assert high - low < (a_high - a_low) / 2  # unpaired intervals would overlap and tell nothing
    same = paired_bootstrap_auc_difference(labels, a, a, rounds=50)
    assert same == (0.0, 0.0, 0.0)


def test_the_operating_point_reaches_the_target_sensitivity() -> None:
    labels = np.array([1] * 20 + [0] * 20)
    scores = np.r_[np.linspace(0.3, 1.0, 20), np.linspace(0.0, 0.6, 20)]
    threshold = threshold_for_sensitivity(labels, scores, 0.95)
    point = at_threshold(labels, scores, threshold)
    assert point.sensitivity >= 0.95
    assert at_threshold(labels, scores, threshold + 1e-6).sensitivity < 0.95


def test_a_perfectly_calibrated_model_has_no_calibration_error() -> None:
    labels = np.array([0, 1] * 50)
    report = calibration(labels, np.full(100, 0.5))
    assert report["ece"] == pytest.approx(0.0)
    assert report["brier"] == pytest.approx(0.25)
