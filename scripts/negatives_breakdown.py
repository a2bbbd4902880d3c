"""Where one class's study AUC loses: its positives against each kind of negative study.

    .venv/bin/python scripts/negatives_breakdown.py --class epidural REPORT.json [REPORT.json ...]

For each `ich evaluate` report, the class's study AUC against all its negatives, then against
the negatives split by what they hold: each other subtype (a study holding two other subtypes
counts under both), and no bleed at all. It reads the per-study labels and probabilities the
report lists, so it runs in a second and needs no model. A low AUC against one group says which
negatives outrank the class's positives; the group's size says how much of the whole AUC it can
cost. A subtype whose label a study does not give counts as not held.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.constants import CLASSES, SUBTYPES
from inference.metrics import roc_auc


def breakdown(report: dict, name: str) -> list[tuple[str, int, float | None]]:
    """(group, negatives in it, AUC of the class's positives against them), "all" first."""
    items = [  # a study that failed to read carries no scores
        i for i in report["per_item"] if "probabilities" in i and i["labels"].get(name) is not None
    ]
    y = np.array([i["labels"][name] for i in items]) == 1
    p = np.array([i["probabilities"][name] for i in items], dtype=np.float64)

    def holds(item: dict, c: str) -> bool:
        return bool(item["labels"].get(c))

    groups = [("all", ~y)]
    groups += [
        (f"holding {c}", ~y & np.array([holds(i, c) for i in items])) for c in SUBTYPES if c != name
    ]
    groups.append(("no bleed", ~y & np.array([not holds(i, "any") for i in items])))
    rows = []
    for label, negatives in groups:
        keep = y | negatives
        auc = roc_auc(y[keep], p[keep]) if y.any() and negatives.any() else None
        rows.append((label, int(negatives.sum()), auc))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--class", dest="name", default="epidural", choices=CLASSES[1:])
    args = parser.parse_args(argv)
    for path in args.reports:
        report = json.loads(path.read_text())
        title = report["dataset"].get("title") or path.parent.name
        version = report["model"]["version"]
        positives = sum(1 for i in report["per_item"] if i.get("labels", {}).get(args.name) == 1)
        print(
            f"\n{title} ({path}), {report['model']['name']} {version}:"
            f" {positives} {args.name} studies"
        )
        print("| negatives | n | AUC |\n| --- | --- | --- |")
        for label, count, auc in breakdown(report, args.name):
            print(f"| {label} | {count} | {'n/a' if auc is None else f'{auc:.4f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
