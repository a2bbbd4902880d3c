"""Study AUC per class, to four places, and their mean, for several `ich evaluate` reports.

    .venv/bin/python scripts/compare_reports.py var/eval/a/report.json var/eval/b/report.json

Prints one Markdown table row per report (model name and version, the data set's title), from
the per-study probabilities the report lists (rounded to four places there), so models measured
on the same data set compare on the same footing. A ship rule compares such rows on a selection
set, never on the test sets the model card reports.

    .venv/bin/python scripts/compare_reports.py --paired SHIPPED.json CANDIDATE.json [S2 C2 ...]

prints, for each pair of reports of the same studies, the candidate's study AUC minus the shipped
model's per class with a 95% paired bootstrap interval (the studies resampled once for both), to
show how large a difference a selection set of that size can tell from chance.

    .venv/bin/python scripts/compare_reports.py --ship SHIPPED.json CANDIDATE.json [S2 C2 ...]

checks the house ship rule on each pair of reports of the same selection set and exits 1 unless
every check holds on every pair: a higher mean study AUC, subdural and "any" study AUC not lower,
and for "any" at each model's saved operating point a sensitivity + specificity not lower than the
shipped model's and a specificity of at least 0.90.

Rule history (docs/model-analysis.md): a 352 px candidate once met a rule on AUC alone while its
"any" flag marked most negative studies, so the rule gained an "any" specificity check (version
1: not more than 0.05 under the shipped model's). That check also failed the 6.1.0 candidate,
whose operating point gained more sensitivity (0.92 to 0.98) than it lost specificity (1.00 to
0.93) on a selection set: version 1 forbade moving towards the sensitivity the operating point
is chosen for. Version 2 (this one, 2026-11-28) weighs the two together and keeps a floor under
specificity. Under version 2 that candidate still fails the same selection set (0.910 against
0.915), so the change does not pass it.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.constants import CLASSES
from inference.datasets import CQ500_FINDINGS
from inference.metrics import paired_bootstrap_auc_difference, roc_auc

SHORT = {**CQ500_FINDINGS, "any": "any"}  # IPH, IVH, SDH, EDH, SAH


def labelled_scores(report: dict, c: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels, scores and item names of the scored items with a known label for class c."""
    items = [i for i in report["per_item"] if "probabilities" in i and i["labels"].get(c) in (0, 1)]
    labels = np.array([i["labels"][c] for i in items], dtype=bool)
    scores = np.array([i["probabilities"][c] for i in items], dtype=np.float64)
    return labels, scores, [i["item"] for i in items]


def study_aucs(report: dict) -> dict[str, float]:
    """Per class study AUC from the report's per-item probabilities; NaN without both labels."""
    return {c: roc_auc(*labelled_scores(report, c)[:2]) for c in CLASSES}


def paired_differences(shipped: dict, candidate: dict) -> dict[str, tuple[float, float, float]]:
    """Per class, the candidate's study AUC minus the shipped model's on the same studies, with a
    95% paired bootstrap interval: how much of a difference one selection set can tell."""
    out = {}
    for c in CLASSES:
        labels, old, names = labelled_scores(shipped, c)
        _, scores, items = labelled_scores(candidate, c)
        new = dict(zip(items, scores, strict=True))
        out[c] = paired_bootstrap_auc_difference(labels, old, np.array([new[n] for n in names]))
    return out


def print_paired(paths: list[Path]) -> None:
    for shipped, candidate in _pairs(paths):
        print(f"{_title(candidate)}: {_version(candidate)} minus {_version(shipped)}")
        for c, (d, low, high) in paired_differences(shipped, candidate).items():
            print(f"  {SHORT[c]:4s} {d:+.4f} [{low:+.4f}, {high:+.4f}]")


def mean_auc(aucs: dict[str, float]) -> float:
    """The mean over the classes that have an AUC."""
    return float(np.nanmean(list(aucs.values())))


def table(paths: list[Path]) -> str:
    head = ["model", "data", *(SHORT[c] for c in CLASSES), "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for path in paths:
        report = json.loads(path.read_text())
        aucs = study_aucs(report)
        mean = mean_auc(aucs)
        model = f"{report['model']['name']} {_version(report)}"
        cells = [model, _title(report), *(f"{aucs[c]:.4f}" for c in CLASSES), f"**{mean:.4f}**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SPECIFICITY_FLOOR = 0.90


def ship_checks(shipped: dict, candidate: dict) -> list[tuple[str, bool]]:
    """The ship rule on one selection set: (each check with both figures, whether it held)."""
    old, new = study_aucs(shipped), study_aucs(candidate)
    old_mean, new_mean = mean_auc(old), mean_auc(new)
    old_any, new_any = shipped["study_level"]["any"], candidate["study_level"]["any"]
    old_j = old_any["sensitivity"] + old_any["specificity"]
    new_j = new_any["sensitivity"] + new_any["specificity"]
    return [
        (f"mean study AUC {new_mean:.4f} > {old_mean:.4f}", new_mean > old_mean),
        (
            f"subdural AUC {new['subdural']:.4f} >= {old['subdural']:.4f}",
            new["subdural"] >= old["subdural"],
        ),
        (f"any AUC {new['any']:.4f} >= {old['any']:.4f}", new["any"] >= old["any"]),
        (
            f"any sensitivity + specificity at the operating point {new_any['sensitivity']:.3f} + "
            f"{new_any['specificity']:.3f} >= {old_any['sensitivity']:.3f} + "
            f"{old_any['specificity']:.3f}",
            new_j >= old_j,
        ),
        (
            f"any specificity at the operating point {new_any['specificity']:.3f} >= "
            f"{SPECIFICITY_FLOOR}",
            new_any["specificity"] >= SPECIFICITY_FLOOR,
        ),
    ]


def _pairs(paths: list[Path]) -> list[tuple[dict, dict]]:
    """(shipped, candidate) reports from SHIPPED CANDIDATE [...], each pair on the same studies."""
    if not paths or len(paths) % 2:
        raise SystemExit("pairs of reports, please: SHIPPED CANDIDATE [SHIPPED CANDIDATE ...]")
    pairs = []
    for old_path, new_path in zip(paths[::2], paths[1::2], strict=True):
        shipped, candidate = json.loads(old_path.read_text()), json.loads(new_path.read_text())
        if {i["item"] for i in shipped["per_item"]} != {i["item"] for i in candidate["per_item"]}:
            raise SystemExit(f"{old_path} and {new_path} did not measure the same studies")
        pairs.append((shipped, candidate))
    return pairs


def _title(report: dict) -> str:
    return report["dataset"].get("title") or report["dataset"]["path"]


def _version(report: dict) -> str:
    return report["model"]["version"]


def ship(paths: list[Path]) -> bool:
    """Prints every check for each (shipped, candidate) pair; True when all of them hold."""
    passed = True
    for shipped, candidate in _pairs(paths):
        print(f"{_title(candidate)}: {_version(candidate)} against {_version(shipped)}")
        for text, held in ship_checks(shipped, candidate):
            print(f"  {'ok  ' if held else 'FAIL'} {text}")
            passed &= held
    print("ship" if passed else "do not ship")
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files from ich evaluate")
    parser.add_argument("--ship", action="store_true", help="check the ship rule on report pairs")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="per class AUC difference of each report pair with a 95%% paired bootstrap interval",
    )
    args = parser.parse_args()
    if args.ship:
        raise SystemExit(0 if ship(args.reports) else 1)
    if args.paired:
        print_paired(args.reports)
        return
    print(table(args.reports))


if __name__ == "__main__":
    main()
