"""Does a floor on the ensemble's logit help the subarachnoid fusion? Measured on fit studies
only (never on a selection or test set); the gate is in docs/model-analysis.md ("The
ensemble's confident no").

    .venv/bin/python scripts/floor_probe.py models/ich-demo/model.pt \
        --old var/data/cx-val var/data/cx-fit-typical --old-cache var/diag/cross-class.npz \
        --new var/data/sah-fit-classic var/data/sah-fit-typical --new-cache var/diag/sah-fit.npz

The shipped fusion of a class reads w_ensemble * (the ensemble's logit) + w_strips * (the
sulcal reader's evidence) + bias. The floored fusion reads max(the ensemble's logit, floor)
instead, the floor chosen from ``convexity_fit.FLOORS`` (or none) by log-loss on the studies it
is fitted on. Two measures:
1. the "old" fit studies (those the shipped fusion was fitted on) fit a floored fusion, which
   is compared with the shipped fusion, as shipped, on the "new" fit studies;
2. out of fold on old and new together (5 folds, fold seeds 0-9): the plain and the floored
   fusion, each refitted in every training fold.
``--*-cache`` keep each set's scored features (as scripts/cross_class_probe.py does), so a second
run takes seconds.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusion_probe import score_studies  # scripts/ is on sys.path as a script

from inference.constants import CLASSES
from inference.convexity_fit import fit_floored_logistic, floored
from inference.metrics import roc_auc
from inference.predictor import Predictor


def features(model: Path, sets: list[Path], cache: Path | None) -> dict[str, np.ndarray]:
    if cache is not None and cache.exists():
        return dict(np.load(cache))
    data = score_studies(model, sets)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **data)
    return data


def columns(data: dict[str, np.ndarray], c: int, slot: str) -> tuple[np.ndarray, np.ndarray]:
    """(S, 2) ensemble logit and the reader's evidence for class c, and the labels (S,), of
    the studies the reader could read."""
    r = [str(s) for s in data["slots"]].index(slot)
    x = np.column_stack([data["ensemble"][:, c], data["evidence"][:, r, c]])
    keep = ~np.isnan(x).any(axis=1) & ~np.isnan(data["labels"][:, c])
    return x[keep], data["labels"][keep, c]


def out_of_fold(x: np.ndarray, y: np.ndarray, seed: int, floor: bool) -> float:
    assignment = np.random.default_rng(seed).permutation(len(y)) % 5
    oof = np.zeros(len(y))
    for k in range(5):
        train, test = assignment != k, assignment == k
        w, f = fit_floored_logistic(x[train], y[train], floors=None if floor else ())
        oof[test] = floored(x[test], f) @ w[:-1] + w[-1]
    return roc_auc(y, oof)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--old", type=Path, nargs="+", required=True)
    parser.add_argument("--new", type=Path, nargs="+", required=True)
    parser.add_argument("--old-cache", type=Path)
    parser.add_argument("--new-cache", type=Path)
    parser.add_argument("--class", dest="name", default="subarachnoid")
    parser.add_argument("--slot", default="sulcal", help="the reader fused with the class")
    args = parser.parse_args()

    started = time.time()
    c = CLASSES.index(args.name)
    old = features(args.model, args.old, args.old_cache)
    new = features(args.model, args.new, args.new_cache)
    x_old, y_old = columns(old, c, args.slot)
    x_new, y_new = columns(new, c, args.slot)
    reader = getattr(Predictor.load(args.model, device="cpu").package, args.slot)
    shipped = reader.fusion[c]
    print(f"{args.name}, fused with the {args.slot} reader; shipped weights {shipped.round(3)}")
    print(f"old fit studies: {len(y_old)} ({int(y_old.sum())} positive)")
    print(f"new fit studies: {len(y_new)} ({int(y_new.sum())} positive)")

    print("\n1. fitted on the old studies, measured on the new")
    print(f"  ensemble alone: {roc_auc(y_new, x_new[:, 0]):.4f}")
    print(f"  reader alone: {roc_auc(y_new, x_new[:, 1]):.4f}")
    as_shipped = roc_auc(y_new, x_new @ shipped[:2] + shipped[2])
    print(f"  shipped fusion, as shipped: {as_shipped:.4f}")
    w, _ = fit_floored_logistic(x_old, y_old, floors=())
    print(f"  plain fusion refitted on the old: {roc_auc(y_new, x_new @ w[:-1] + w[-1]):.4f}")
    w, f = fit_floored_logistic(x_old, y_old)
    gain = roc_auc(y_new, floored(x_new, f) @ w[:-1] + w[-1]) - as_shipped
    print(f"  floored fusion (floor {f}, weights {w.round(3)}): gain {gain:+.4f}")
    print(f"  condition 1 (gain >= 0.005): {'holds' if gain >= 0.005 else 'fails'}")

    x, y = np.concatenate([x_old, x_new]), np.concatenate([y_old, y_new])
    print(f"\n2. out of fold on all {len(y)} fit studies ({int(y.sum())} positive)")
    plain = [out_of_fold(x, y, s, floor=False) for s in range(10)]
    low = [out_of_fold(x, y, s, floor=True) for s in range(10)]
    print(f"  plain: {np.mean(plain):.4f} ({min(plain):.4f}-{max(plain):.4f})")
    print(f"  floored: {np.mean(low):.4f} ({min(low):.4f}-{max(low):.4f})")
    w, f = fit_floored_logistic(x, y)
    print(f"  floored, fitted on all: floor {f}, weights {w.round(3)}")
    ok = np.mean(low) - np.mean(plain) >= 0.005 and min(low) > np.mean(plain)
    gain = float(np.mean(low) - np.mean(plain))
    print(f"  condition 2 (gain {gain:+.4f}): {'holds' if ok else 'fails'}")
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
