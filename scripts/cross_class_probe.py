"""Out-of-fold study AUC of subarachnoid and epidural when their fusion also reads the other
classes' evidence (cross-class fusion), on the studies a fusion is fitted on (never on a
selection or test set).

    .venv/bin/python scripts/cross_class_probe.py models/ich-demo/model.pt \
        var/data/cx-val var/data/cx-fit-typical --cache var/diag/cross-class.npz

Each study gives the ensemble's six calibrated logits (before any reader joins) and each
reader's strip evidence. For a probed class, a logistic regression on the features the shipped
package fuses it from (the ensemble's logit and its reader's evidence) is compared, out of fold
(5 folds, several fold seeds, as ``scripts/fusion_probe.py``), with the same regression given
further features: other classes' ensemble logits and other readers' evidence. It asks whether
evidence of another bleed explains away what a class's own evidence mistakes for it (sulcal
blood beside an epidural lens or in the ventricles). ``--cache`` keeps the scored features, so
a second run takes seconds.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusion_probe import out_of_fold_auc, score_studies  # scripts/ is on sys.path as a script

from inference.constants import CLASSES
from inference.metrics import roc_auc

# probed class -> the reader it is fused with in the shipped package, then the feature sets
# tried beside it: ("ens", class) an ensemble logit, (slot, class) a reader's evidence.
PROBES = {
    "subarachnoid": (
        "sulcal",
        {
            "+ ens epidural": [("ens", "epidural")],
            "+ ens intraventricular": [("ens", "intraventricular")],
            "+ ens epidural, intraventricular": [("ens", "epidural"), ("ens", "intraventricular")],
            "+ convexity epidural": [("convexity", "epidural")],
            "+ ens epidural, intraventricular, convexity epidural": [
                ("ens", "epidural"),
                ("ens", "intraventricular"),
                ("convexity", "epidural"),
            ],
            "+ every other ensemble logit": [("ens", c) for c in CLASSES if c != "subarachnoid"],
        },
    ),
    "epidural": (
        "convexity",
        {
            "+ ens subdural": [("ens", "subdural")],
            "+ crescent subdural": [("crescent", "subdural")],
            "+ ens subdural, crescent subdural": [("ens", "subdural"), ("crescent", "subdural")],
            "+ every other ensemble logit": [("ens", c) for c in CLASSES if c != "epidural"],
        },
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("sets", type=Path, nargs="+", help="phantom sets (ich phantom --out)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold-seeds", type=int, default=10, help="fold seeds 0..N-1")
    parser.add_argument("--cache", type=Path, help="an .npz of the scored features")
    args = parser.parse_args()

    started = time.time()
    if args.cache and args.cache.exists():
        data = dict(np.load(args.cache))
    else:
        data = score_studies(args.model, args.sets)
        if args.cache:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.cache, **data)
    ens, ev, lab = data["ensemble"], data["evidence"], data["labels"]
    slots = [str(s) for s in data["slots"]]
    print(f"{len(lab)} studies from {', '.join(map(str, args.sets))}; {args.model}")

    def column(source: str, name: str) -> np.ndarray:
        c = CLASSES.index(name)
        return ens[:, c] if source == "ens" else ev[:, slots.index(source), c]

    for name, (reader, extras) in PROBES.items():
        c = CLASSES.index(name)
        base = [("ens", name), (reader, name)]
        every = [f for fs in extras.values() for f in fs] + base
        readable = np.all([~np.isnan(column(*f)) for f in every], axis=0)
        known = readable & ~np.isnan(lab[:, c])
        y = lab[known, c]
        print(f"\n{name}: {int(known.sum())} studies, {int(y.sum())} positive")
        print(f"  ensemble alone: {roc_auc(y, ens[known, c]):.4f}")
        for label, features in [(f"ensemble + {reader} (shipped)", [])] + [
            (f"ensemble + {reader} {k}", v) for k, v in extras.items()
        ]:
            x = np.column_stack([column(*f)[known] for f in base + features])
            aucs = [out_of_fold_auc(x, y, args.folds, s) for s in range(args.fold_seeds)]
            print(
                f"  {label}: out of fold {np.mean(aucs):.4f} "
                f"(fold seeds {min(aucs):.4f}-{max(aucs):.4f})"
            )
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
