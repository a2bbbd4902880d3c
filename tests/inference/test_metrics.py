import json
from pathlib import Path

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


def test_resampling_groups_widens_the_interval_of_correlated_cases() -> None:
    """20 patients of 10 near-identical pictures each: 200 cases, but only 20 independent
    ones. Resampling patients gives the wider interval of 20 cases; one case per group
    resamples exactly as no groups do."""
    rng = np.random.default_rng(2)
    patient_label = rng.integers(0, 2, 20)
    patient_score = patient_label + rng.normal(0, 1, 20)
    groups = np.repeat(np.arange(20), 10)
    labels = patient_label[groups]
    scores = patient_score[groups] + rng.normal(0, 0.01, 200)
    auc, low, high = bootstrap_auc(labels, scores, rounds=300)
    grouped_auc, grouped_low, grouped_high = bootstrap_auc(
        labels, scores, rounds=300, groups=groups
    )
    assert grouped_auc == auc
    assert grouped_high - grouped_low > 2 * (high - low)
    alone = bootstrap_auc(labels, scores, rounds=50, groups=np.arange(200))
    assert alone == bootstrap_auc(labels, scores, rounds=50)


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
    lowest = np.sort(scores[labels == 1])[1]  # the 19th of 20 positives must be flagged
    assert at_threshold(labels, scores, lowest + 1e-9).sensitivity < 0.95
    # just under that positive, not on it: no study chosen on changes side
    assert lowest - 1e-3 < threshold < lowest
    assert not ((scores >= threshold) & (scores < lowest)).any()


def test_a_positive_scored_a_hair_lower_elsewhere_keeps_its_flag() -> None:
    """The predictor scores a validation study through another path than training did (here
    2e-5 lower, as measured): at a threshold exactly on its score it would lose its flag."""
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.36382658, 0.2, 0.1, 0.05])
    threshold = threshold_for_sensitivity(labels, scores, 1.0)
    assert 0.36382658 - 2e-5 >= threshold > 0.2
    # a lower score right under it: the threshold stays between the two
    close = np.array([0.9, 0.8, 0.36382658, 0.36382650, 0.1, 0.05])
    threshold = threshold_for_sensitivity(labels, close, 1.0)
    assert 0.36382650 < threshold < 0.36382658


def test_one_study_or_one_patient_gives_no_interval_rather_than_a_zero_wide_one() -> None:
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.1, 0.9, 0.4, 0.3])
    point, low, high = bootstrap_auc(labels, scores, rounds=50, groups=np.zeros(4))
    assert point == 0.75 and np.isnan(low) and np.isnan(high)
    point, low, high = bootstrap_auc(labels, scores, rounds=50, groups=np.arange(4))
    assert low < point and not np.isnan(high)


def test_a_perfectly_calibrated_model_has_no_calibration_error() -> None:
    labels = np.array([0, 1] * 50)
    report = calibration(labels, np.full(100, 0.5))
    assert report["ece"] == pytest.approx(0.0)
    assert report["brier"] == pytest.approx(0.25)


def test_a_card_names_pictures_as_pictures_and_says_patients_were_resampled() -> None:
    from inference.constants import CLASSES
    from inference.evaluation import _card_section

    level = {
        c: {"n": 10, "positives": 4, "auc": 0.7, "auc_95ci": [0.5, 0.9], "sensitivity": 0.5,
            "specificity": 0.6}
        for c in CLASSES
    }  # fmt: skip
    pointing = {c: {"hit_rate": None, "slices": 0} for c in CLASSES}
    pictures = {
        "dataset": {"kind": "yolo", "path": "roboflow-ich", "items": 10, "patients": 3},
        "bootstrap_resamples": {"study_level": "patients", "slice_level": "studies"},
        "study_level": level,
        "pointing_game": pointing,
        "per_item": [],
    }
    header = next(line for line in _card_section(pictures) if line.startswith("| class"))
    assert "picture AUC [95% CI, 3 patients resampled]" in header
    studies = {**pictures, "dataset": {"kind": "phantom", "path": "p", "items": 10}}
    del studies["bootstrap_resamples"]  # a report from before the key existed
    header = next(line for line in _card_section(studies) if line.startswith("| class"))
    assert "| study AUC [95% CI] |" in header


def test_pictures_of_one_patient_are_resampled_together_at_slice_level_too() -> None:
    """A picture is its own study: its slice-level interval must resample patients, as its
    study-level one does, so the two intervals of the same numbers agree."""
    from types import SimpleNamespace

    from inference.constants import CLASSES
    from inference.data import DataSource
    from inference.evaluation import Collected, _report
    from inference.package import ModelPackage
    from inference.preprocess import PreprocessConfig

    rng = np.random.default_rng(5)
    c = Collected()
    for i in range(24):  # 24 pictures of 4 patients
        labels = np.full(len(CLASSES), np.nan)
        labels[0] = i % 2
        probs = np.clip(labels[0] * 0.3 + rng.uniform(0, 0.7, len(CLASSES)), 0, 1)
        c.names.append(f"picture{i}")
        c.patients.append(f"patient{i % 4}")
        c.study_labels.append(labels)
        c.study_probs.append(probs)
        c.study_flags.append(probs > 0.5)
        c.slice_labels.append(labels[None])
        c.slice_probs.append(probs[None])
    package = ModelPackage("m", "1", PreprocessConfig(), [], None)  # identity calibration
    predictor = SimpleNamespace(name="m", version="1", package=package)
    report = _report(predictor, DataSource(kind="yolo", path="x"), c, 200)  # type: ignore[arg-type]

    assert report["bootstrap_resamples"] == {"study_level": "patients", "slice_level": "patients"}
    study, slices = report["study_level"]["any"], report["slice_level"]["any"]
    assert slices["auc"] == study["auc"]
    assert slices["auc_95ci"] == study["auc_95ci"]
    # a picture is one slice: flagged at slice level exactly as at picture level
    assert report["slice_level_threshold"]["any"] == 0.5
    assert report["slice_level_rule"].startswith("a slice is flagged where it alone")
    assert (slices["sensitivity"], slices["specificity"]) == (
        study["sensitivity"],
        study["specificity"],
    )


def test_a_card_shows_slice_level_figures_at_the_slice_thresholds_of_its_report() -> None:
    from inference.constants import CLASSES
    from inference.evaluation import SLICE_RULE, _card_section

    level = {
        c: {"n": 300, "positives": 40, "auc": 0.9, "auc_95ci": [0.8, 0.95], "sensitivity": 0.75,
            "specificity": 0.99}
        for c in CLASSES
    }  # fmt: skip
    report = {
        "dataset": {"kind": "phantom", "path": "p", "items": 10},
        "bootstrap_resamples": {"study_level": "items", "slice_level": "studies"},
        "study_level": level,
        "slice_level": level,
        "slice_level_threshold": dict.fromkeys(CLASSES, 0.0593835),
        "slice_level_rule": SLICE_RULE,
        "pointing_game": {c: {"hit_rate": None, "slices": 0} for c in CLASSES},
        "per_item": [],
    }
    lines = _card_section(report)
    rule = f"Slice level, each slice against its own labels. Slice threshold: {SLICE_RULE}."
    assert rule in lines
    assert "| Epidural | 300 (40) | 0.900 [0.800, 0.950] | 0.0594 | 0.750 | 0.990 |" in lines
    old = {**report, "slice_level_threshold": 0.5}  # a report from before slice thresholds
    del old["slice_level_rule"]
    assert "| Epidural | 300 (40) | 0.900 [0.800, 0.950] | 0.5 | 0.750 | 0.990 |" in (
        _card_section(old)
    )
    pictures = {**report, "dataset": {"kind": "yolo", "path": "r", "items": 10}}
    assert not any("Slice level" in line for line in _card_section(pictures))


def test_ich_card_and_evaluate_name_what_is_wrong_with_their_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inference.cli import main

    not_json, other, card = tmp_path / "bad.json", tmp_path / "other.json", tmp_path / "card.md"
    not_json.write_text("{")
    other.write_text('{"model": {"name": "m"}}')
    assert main(["card", str(tmp_path / "unused.pt"), str(not_json), "--out", str(card)]) == 2
    assert f"{not_json}: not JSON" in capsys.readouterr().err
    assert main(["card", str(tmp_path / "unused.pt"), str(other), "--out", str(card)]) == 2
    err = capsys.readouterr().err
    assert f"{other}: not a report of `ich evaluate` (no dataset, study_level" in err
    assert not card.exists()
    # a folder of pictures without its labels CSV: said so, not "file not found"
    args = ["evaluate", str(tmp_path / "unused.pt"), str(tmp_path), "--kind", "image_folder"]
    assert main([*args, "--out", str(tmp_path / "eval")]) == 2
    assert "an image_folder set needs its labels CSV (`--labels`" in capsys.readouterr().err


def test_copies_of_one_picture_count_once_and_the_report_names_the_thresholds_flags_used() -> None:
    from types import SimpleNamespace

    from inference.data import DataSource
    from inference.datasets import SliceItem
    from inference.evaluation import Collected, _card_section, _report, one_per_group
    from inference.package import ModelPackage
    from inference.preprocess import PreprocessConfig

    zeros = np.zeros(6, np.float32)
    items = [SliceItem(Path(f"{g}_{n}.jpg"), zeros, "p", [], g) for g in "ab" for n in range(3)]
    kept, copies = one_per_group(items)
    assert [i.group for i in kept] == ["a", "b"] and copies == 4

    c = Collected()
    for i in range(4):  # the first two flagged at one point, the last two at another for "any"
        labels = np.array([i % 2] + [np.nan] * 5)
        c.names.append(f"x{i}")
        c.patients.append(f"x{i}")
        c.study_labels.append(labels)
        c.study_probs.append(np.full(6, 0.2 + 0.2 * i))
        c.study_flags.append(np.zeros(6, bool))
        c.study_thresholds.append(np.array([0.3 if i < 2 else 0.9, 0.5, 0.5, 0.5, 0.5, 0.5]))
        c.slice_labels.append(labels[None])
        c.slice_probs.append(np.full((1, 6), 0.2 + 0.2 * i))
    package = ModelPackage("m", "1", PreprocessConfig(), [], None)
    report = _report(
        SimpleNamespace(name="m", version="1", package=package),  # type: ignore[arg-type]
        DataSource(kind="yolo", path="x"),
        c,
        50,
    )
    study = report["study_level"]
    assert study["any"]["threshold"] is None and study["any"]["thresholds_used"] == [0.3, 0.9]
    assert study["subdural"]["threshold"] == 0.5 and "thresholds_used" not in study["subdural"]
    assert report["pointing_game"]["any"]["tolerance_unit"] == "px"
    study["any"]["auc_95ci"] = [None, None]  # every resample lacked a class
    report["dataset"] = {"kind": "yolo", "path": "x", "items": 4}
    assert any(line.startswith("| Any haemorrhage | 4 (2) | ") for line in _card_section(report))


def test_ich_card_refuses_a_report_measured_on_another_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A card shows its own model's figures: the shipped model's report under another model's
    name (or version) is refused, naming both."""
    from inference.cli import main
    from inference.predictor import default_model_path

    model = default_model_path()
    shipped = json.loads((model.parent / "eval-cq500.json").read_text())
    other = {**shipped, "model": {"name": "ich-demo", "version": "0.0.1"}}
    path, card = tmp_path / "other.json", tmp_path / "card.md"
    path.write_text(json.dumps(other))
    assert main(["card", str(model), str(path), "--out", str(card)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{path}: measured on ich-demo 0.0.1, not on ich-demo {shipped['model']['version']}" in err
    )
    assert not card.exists()


def test_a_card_says_how_the_networks_began_and_which_classes_were_calibrated() -> None:
    from types import SimpleNamespace

    from inference.evaluation import _calibrated, _gating_note, _initialised

    assert _initialised({"config": {"pretrained": True}}) == "ImageNet-initialised"
    assert _initialised({"config": {"pretrained": False}}).startswith("randomly initialised")
    fitted = np.tile([2.0, -1.0], (6, 1))
    assert _calibrated(SimpleNamespace(calibration=fitted)) == "Platt-calibrated"
    fitted[4] = [1.0, 0.0]
    assert _calibrated(SimpleNamespace(calibration=fitted)) == (
        "Platt-calibrated except Epidural (fit refused: plain sigmoid)"
    )
    assert _calibrated(SimpleNamespace(calibration=np.tile([1.0, 0.0], (6, 1)))).startswith(
        "not calibrated"
    )
    assert _gating_note({"any": {"gated_by_any": True}}).endswith("are those of the flags.")
    assert 'before the "any" gate' in _gating_note({"any": {"threshold": 0.5}})
    assert _gating_note({}) == ""
