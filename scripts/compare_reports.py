"""Study AUC per class, to four places, and their mean, for several `ich evaluate` reports.

    .venv/bin/python scripts/compare_reports.py var/eval/a/report.json var/eval/b/report.json

Prints one Markdown table row per report (model name and version, the data set's title), from
the per-study probabilities the report lists (rounded to four places there), so models measured
on the same data set compare on the same footing. A ship rule compares such rows on a selection
set, never on the test sets the model card reports.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.constants import CLASSES
from inference.datasets import CQ500_FINDINGS
from inference.metrics import roc_auc

SHORT = {**CQ500_FINDINGS, "any": "any"}  # IPH, IVH, SDH, EDH, SAH


def study_aucs(report: dict) -> dict[str, float]:
    """Per class study AUC from the report's per-item probabilities; NaN without both labels."""
    items = [i for i in report["per_item"] if "probabilities" in i]
    out = {}
    for c in CLASSES:
        rows = [
            (i["labels"][c], i["probabilities"][c]) for i in items if i["labels"].get(c) in (0, 1)
        ]
        labels = np.array([r[0] for r in rows], dtype=bool)
        scores = np.array([r[1] for r in rows], dtype=np.float64)
        out[c] = roc_auc(labels, scores)
    return out


def table(paths: list[Path]) -> str:
    head = ["model", "data", *(SHORT[c] for c in CLASSES), "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for path in paths:
        report = json.loads(path.read_text())
        aucs = study_aucs(report)
        mean = float(np.nanmean(list(aucs.values())))
        model = f"{report['model']['name']} {report['model']['version']}"
        title = report["dataset"].get("title") or report["dataset"]["path"]
        cells = [model, title, *(f"{aucs[c]:.4f}" for c in CLASSES), f"**{mean:.4f}**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files from ich evaluate")
    print(table(parser.parse_args().reports))


if __name__ == "__main__":
    main()
