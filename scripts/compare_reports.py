"""Study AUC per class, to four places, and their mean, for several `ich evaluate` reports.

    .venv/bin/python scripts/compare_reports.py var/eval/a/report.json var/eval/b/report.json

Prints one Markdown table row per report (model name and version, the data set's title), from
the per-study probabilities the report lists (six significant figures there), so models measured
on the same data set compare on the same footing. A ship rule compares such rows on a selection
set, never on the test sets the model card reports.

    .venv/bin/python scripts/compare_reports.py --paired SHIPPED.json CANDIDATE.json [S2 C2 ...]

prints, for each pair of reports of the same studies, the candidate's study AUC minus the shipped
model's per class with a 95% paired bootstrap interval (the studies resampled once for both), to
show how large a difference a selection set of that size can tell from chance.

    .venv/bin/python scripts/compare_reports.py --ship SHIPPED.json CANDIDATE.json [S2 C2 ...]

checks the house ship rule (version 4) and exits 1 unless every check holds. The pairs' studies
are pooled (the selection sets together) for the AUC checks: a higher mean study AUC, and for
each class a paired 95% bootstrap interval of the candidate's AUC minus the shipped model's whose
lower end is at least -0.01 for "any" and -0.02 for each subtype (non-inferiority). On each pair
alone, "any" at each model's saved operating point: a sensitivity + specificity not lower than
the shipped model's and a specificity of at least 0.90; and each class's pointing game at least
0.80 and no more than 0.05 under the shipped model's. `--rule 3` leaves the pointing game out;
`--rule 2` checks version 2 instead, on each pair alone: a higher mean study AUC, subdural and
"any" study AUC not lower, and the same two operating-point checks.

Rule history (docs/model-analysis.md): a 352 px candidate once met a rule on AUC alone while its
"any" flag marked most negative studies, so the rule gained an "any" specificity check (version
1: not more than 0.05 under the shipped model's). That check also failed the 6.1.0 candidate,
whose operating point gained more sensitivity (0.92 to 0.98) than it lost specificity (1.00 to
0.93) on a selection set: version 1 forbade moving towards the sensitivity the operating point
is chosen for. Version 2 (this one, 2026-11-28) weighs the two together and keeps a floor under
specificity. Under version 2 that candidate still fails the same selection set (0.910 against
0.915), so the change does not pass it. Version 2 turned the 6.2.0 candidate down on a 300-study
set for an "any" AUC 0.004 lower, a difference whose paired interval ran from -0.015 to +0.005:
"not lower" decided on noise. Version 3 (2026-12-02, written before the sets it first judges were
read) asks for non-inferiority within stated margins on the pooled sets instead. It passed 6.2.0
on fresh sets, whose epidural heatmaps then pointed at the bleed on 64-77% of correctly flagged
slices against 91-98% for the shipped model, under the issue's 80%: version 4 (2026-12-02) adds
the pointing game, so a rule cannot pass what the issue's own targets would fail.
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
    """Ship rule version 2 on one selection set: (each check with both figures, whether it held)."""
    old, new = study_aucs(shipped), study_aucs(candidate)
    old_mean, new_mean = mean_auc(old), mean_auc(new)
    return [
        (f"mean study AUC {new_mean:.4f} > {old_mean:.4f}", new_mean > old_mean),
        (
            f"subdural AUC {new['subdural']:.4f} >= {old['subdural']:.4f}",
            new["subdural"] >= old["subdural"],
        ),
        (f"any AUC {new['any']:.4f} >= {old['any']:.4f}", new["any"] >= old["any"]),
        *operating_point_checks(shipped, candidate),
    ]


def operating_point_checks(shipped: dict, candidate: dict) -> list[tuple[str, bool]]:
    """'Any' at each model's saved operating point on one selection set (versions 2 to 4)."""
    old_any, new_any = shipped["study_level"]["any"], candidate["study_level"]["any"]
    old_j = old_any["sensitivity"] + old_any["specificity"]
    new_j = new_any["sensitivity"] + new_any["specificity"]
    return [
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


ANY_MARGIN = -0.01  # version 3: the lowest allowed lower end of the paired interval for "any"
SUBTYPE_MARGIN = -0.02  # and for each subtype
POINTING_FLOOR = 0.80  # the pointing-game target, per class
POINTING_DROP = 0.05  # version 4: the largest allowed fall in a class's pointing game


def pointing_checks(shipped: dict, candidate: dict) -> list[tuple[str, bool]]:
    """Version 4, per set: each class's pointing game at least 0.80 and at most 0.05 under the
    shipped model's, so a better score does not come with heatmaps that point elsewhere."""
    checks = []
    for c in CLASSES:
        old = shipped.get("pointing_game", {}).get(c, {}).get("hit_rate")
        new = candidate.get("pointing_game", {}).get(c, {}).get("hit_rate")
        if old is None or new is None:
            continue  # no correctly flagged slice with a mask for this class
        floor = max(POINTING_FLOOR, old - POINTING_DROP)
        checks.append((f"{SHORT[c]} pointing game {new:.3f} >= {floor:.3f}", new >= floor))
    return checks


def pooled(reports: list[dict]) -> dict:
    """One report of every study the reports list (several selection sets taken together)."""
    items = [i for r in reports for i in r["per_item"]]
    if len({i["item"] for i in items}) != len(items):
        raise SystemExit("the selection sets share studies; they cannot be pooled")
    return reports[0] | {"per_item": items}


def pooled_ship_checks(pairs: list[tuple[dict, dict]], rule: int = 4) -> list[tuple[str, bool]]:
    """Ship rule version 3 or 4: AUC non-inferiority on the pooled pairs, operating points per
    pair, and from version 4 the pointing game per pair."""
    shipped, candidate = pooled([p[0] for p in pairs]), pooled([p[1] for p in pairs])
    old_mean, new_mean = mean_auc(study_aucs(shipped)), mean_auc(study_aucs(candidate))
    n = sum(1 for i in shipped["per_item"] if "probabilities" in i)
    checks = [
        (f"mean study AUC {new_mean:.4f} > {old_mean:.4f} ({n} studies)", new_mean > old_mean)
    ]
    for c, (d, low, high) in paired_differences(shipped, candidate).items():
        margin = ANY_MARGIN if c == "any" else SUBTYPE_MARGIN
        if d != d:  # NaN: the pooled sets lack a positive or a negative study for this class
            checks.append((f"{SHORT[c]} AUC difference not measurable", False))
            continue
        checks.append(
            (
                f"{SHORT[c]} AUC difference {d:+.4f} [{low:+.4f}, {high:+.4f}], "
                f"lower end >= {margin:+.2f}",
                low >= margin,
            )
        )
    for old, new in pairs:
        per_set = operating_point_checks(old, new)
        if rule >= 4:
            per_set += pointing_checks(old, new)
        checks += [(f"{_title(new)}: {t}", held) for t, held in per_set]
    return checks


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


def ship(paths: list[Path], rule: int = 4) -> bool:
    """Prints every check of the ship rule (version 4, or 3 or 2); True when all of them hold."""
    pairs = _pairs(paths)
    if rule >= 3:
        old, new = pairs[0]
        head = f"ship rule {rule}: {_version(new)} against {_version(old)}"
        sections = [(head, pooled_ship_checks(pairs, rule))]
    else:
        sections = [
            (
                f"ship rule 2, {_title(new)}: {_version(new)} against {_version(old)}",
                ship_checks(old, new),
            )
            for old, new in pairs
        ]
    passed = True
    for head, checks in sections:
        print(head)
        for text, held in checks:
            print(f"  {'ok  ' if held else 'FAIL'} {text}")
            passed &= held
    print("ship" if passed else "do not ship")
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files from ich evaluate")
    parser.add_argument("--ship", action="store_true", help="check the ship rule on report pairs")
    parser.add_argument(
        "--rule", type=int, choices=(2, 3, 4), default=4, help="ship rule version (default 4)"
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="per class AUC difference of each report pair with a 95%% paired bootstrap interval",
    )
    args = parser.parse_args()
    if args.ship:
        raise SystemExit(0 if ship(args.reports, args.rule) else 1)
    if args.paired:
        print_paired(args.reports)
        return
    print(table(args.reports))


if __name__ == "__main__":
    main()
