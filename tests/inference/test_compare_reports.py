"""scripts/compare_reports.py: the per-class study AUC table a ship rule compares."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from compare_reports import study_aucs, table

from inference.constants import CLASSES


def report(rows: list[tuple[int, float]], version: str = "1.0.0") -> dict:
    """Every class gets the same labels and scores, except epidural, which is never positive."""
    items = []
    for n, (label, score) in enumerate(rows):
        labels = {c: label for c in CLASSES} | {"epidural": 0}
        items.append(
            {"item": f"s{n}", "labels": labels, "probabilities": {c: score for c in CLASSES}}
        )
    items.append({"item": "unreadable", "error": "not DICOM"})  # failed items carry no scores
    return {
        "model": {"name": "m", "version": version},
        "dataset": {"path": "d", "title": "four studies"},
        "per_item": items,
    }


def test_auc_per_class_from_the_listed_probabilities() -> None:
    # positives 0.9 and 0.4, negatives 0.5 and 0.1: 3 of 4 pairs ordered right
    aucs = study_aucs(report([(1, 0.9), (1, 0.4), (0, 0.5), (0, 0.1)]))
    assert aucs["any"] == pytest.approx(0.75)
    assert aucs["subdural"] == pytest.approx(0.75)
    assert aucs["epidural"] != aucs["epidural"]  # NaN: no positive study


def test_table_has_one_row_per_report_and_a_mean_without_the_nan_class(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(report([(1, 0.9), (0, 0.1)], "2.0.0")))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(report([(1, 0.1), (0, 0.9)], "1.0.0")))
    lines = table([good, bad]).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| m 2.0.0 | four studies | 1.0000 |")
    assert lines[2].endswith("| nan | 1.0000 | **1.0000** |")
    assert lines[3].endswith("| **0.0000** |")
