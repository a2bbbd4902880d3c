"""scripts/negatives_breakdown.py: one class's study AUC against each kind of negative."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from negatives_breakdown import breakdown, main

from inference.constants import CLASSES


def _study(n: int, score: float, *held: str) -> dict:
    labels = {c: int(c in held) for c in CLASSES} | {"any": int(bool(held))}
    return {"item": f"s{n}", "labels": labels, "probabilities": {"epidural": score}}


def _report() -> dict:
    rows = [
        (0.9, ("epidural",)),
        (0.6, ("epidural", "subdural")),
        (0.7, ("subdural",)),  # outranks one epidural
        (0.3, ("subdural",)),
        (0.2, ("intraparenchymal",)),
        (0.1, ()),
        (0.5, ()),
    ]
    items = [_study(n, score, *held) for n, (score, held) in enumerate(rows)]
    items.append({"item": "unreadable", "error": "not DICOM"})  # no scores: left out
    return {"model": {"name": "m", "version": "1"}, "dataset": {"title": "t"}, "per_item": items}


def test_each_group_of_negatives_gets_its_own_auc() -> None:
    rows = {label: (count, auc) for label, count, auc in breakdown(_report(), "epidural")}
    assert rows["all"] == (5, pytest.approx(0.9))  # 9 of the 10 pairs ranked right
    assert rows["holding subdural"] == (2, pytest.approx(0.75))  # 0.6 < 0.7
    assert rows["holding intraparenchymal"] == (1, pytest.approx(1.0))
    assert rows["holding intraventricular"] == (0, None)  # no such negative
    assert rows["no bleed"] == (2, pytest.approx(1.0))
    assert "holding epidural" not in rows


def test_it_prints_a_table_per_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(_report()))
    assert main(["--class", "epidural", str(path)]) == 0
    out = capsys.readouterr().out
    assert "m 1: 2 epidural studies" in out
    assert "| holding subdural | 2 | 0.7500 |" in out
