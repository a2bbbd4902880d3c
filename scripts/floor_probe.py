"""Does a floor on the ensemble's logit (or, with ``--either``, an "either" fusion) help the
subarachnoid fusion? Measured on fit studies only (never on a selection or test set); the gates
are in docs/model-analysis.md ("The ensemble's confident no", "Either reader may find it").

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
With ``--either`` the same two measures compare the "either" fusion (``convexity_fit.fit_either``:
the larger of the two readers' own calibrated logits, recalibrated) with the plain one. Both
print the positives split by where the blood lies (basal cisterns or convexity sulci: the median
distance of the class's mask pixels from the image centre, under 35 mm for the cisterns).
The gates were measured with 6.9.0 as MODEL (`git show 09096ae:models/ich-demo/model.pt`), whose
fusion is plain; given 6.13.0, "the shipped fusion" is its either fusion. The networks, and so
the cached features, are the same in both.
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

from inference.constants import CLASSES, SUBTYPES
from inference.convexity import either_logits
from inference.convexity_fit import fit_either, fit_floored_logistic, floored
from inference.datasets import read_phantom_dataset
from inference.dicom_io import load_series
from inference.metrics import roc_auc
from inference.predictor import Predictor

BASAL_MM = 35.0


def features(model: Path, sets: list[Path], cache: Path | None) -> dict[str, np.ndarray]:
    if cache is not None and cache.exists():
        return dict(np.load(cache))
    data = score_studies(model, sets)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **data)
    return data


def columns(
    data: dict[str, np.ndarray], c: int, slot: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S, 2) ensemble logit and the reader's evidence for class c, the labels (S,), and which
    studies of the set these are (those the reader could read)."""
    r = [str(s) for s in data["slots"]].index(slot)
    x = np.column_stack([data["ensemble"][:, c], data["evidence"][:, r, c]])
    keep = ~np.isnan(x).any(axis=1) & ~np.isnan(data["labels"][:, c])
    return x[keep], data["labels"][keep, c], np.flatnonzero(keep)


def fitted(form: str, x: np.ndarray, y: np.ndarray) -> tuple[str, np.ndarray, float]:
    if form == "either":
        return form, fit_either(x, y), 0.0
    w, f = fit_floored_logistic(x, y, floors=None if form == "floor" else ())
    return form, w, f


def scored(model: tuple[str, np.ndarray, float], x: np.ndarray) -> np.ndarray:
    form, w, f = model
    if form == "either":
        return either_logits(x, w)
    return floored(x, f) @ w[:-1] + w[-1]


def out_of_fold(x: np.ndarray, y: np.ndarray, seed: int, form: str) -> float:
    assignment = np.random.default_rng(seed).permutation(len(y)) % 5
    oof = np.zeros(len(y))
    for k in range(5):
        train, test = assignment != k, assignment == k
        oof[test] = scored(fitted(form, x[train], y[train]), x[test])
    return roc_auc(y, oof)


def basal(sets: list[Path], rows: np.ndarray, y: np.ndarray, name: str) -> np.ndarray:
    """Which positives' blood of class ``name`` lies in the basal cisterns (see the docstring)."""
    items = [i for folder in sets for i in read_phantom_dataset(folder)]
    bit = 1 << SUBTYPES.index(name)
    out = np.zeros(len(rows), bool)
    for j in np.flatnonzero(y == 1):
        item = items[rows[j]]
        masks = np.load(Path(item.paths[0]).parent / "masks.npz")["masks"]
        _, r, c = np.nonzero(masks & bit)
        centre = (masks.shape[1] - 1) / 2, (masks.shape[2] - 1) / 2
        spacing = load_series(item.paths[:1]).pixel_spacing_mm or (1.0, 1.0)  # phantoms have it
        distance = np.hypot(r - centre[0], c - centre[1]) * spacing[0]
        out[j] = float(np.median(distance)) < BASAL_MM
    return out


def by_place(x: np.ndarray, y: np.ndarray, cisterns: np.ndarray, scores: dict) -> None:
    for place, where in (("basal cisterns", cisterns), ("convexity sulci", ~cisterns & (y == 1))):
        keep = where | (y == 0)
        aucs = ", ".join(f"{k} {roc_auc(y[keep], v[keep]):.4f}" for k, v in scores.items())
        print(f"    {place} ({int(where.sum())} positives): {aucs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--old", type=Path, nargs="+", required=True)
    parser.add_argument("--new", type=Path, nargs="+", required=True)
    parser.add_argument("--old-cache", type=Path)
    parser.add_argument("--new-cache", type=Path)
    parser.add_argument("--class", dest="name", default="subarachnoid")
    parser.add_argument("--slot", default="sulcal", help="the reader fused with the class")
    parser.add_argument("--either", action="store_true", help="probe the either fusion")
    args = parser.parse_args()
    form = "either" if args.either else "floor"

    started = time.time()
    c = CLASSES.index(args.name)
    old = features(args.model, args.old, args.old_cache)
    new = features(args.model, args.new, args.new_cache)
    x_old, y_old, _ = columns(old, c, args.slot)
    x_new, y_new, rows_new = columns(new, c, args.slot)
    reader = getattr(Predictor.load(args.model, device="cpu").package, args.slot)
    either = reader.either is not None and not np.isnan(reader.either[c]).any()
    shipped = reader.either[c] if either else reader.fusion[c]
    form_shipped = "either" if either else "plain"
    print(f"{args.name}, fused with the {args.slot} reader; {form_shipped}: {shipped.round(3)}")
    print(f"old fit studies: {len(y_old)} ({int(y_old.sum())} positive)")
    print(f"new fit studies: {len(y_new)} ({int(y_new.sum())} positive)")

    print("\n1. fitted on the old studies, measured on the new")
    print(f"  ensemble alone: {roc_auc(y_new, x_new[:, 0]):.4f}")
    print(f"  reader alone: {roc_auc(y_new, x_new[:, 1]):.4f}")
    shipped_scores = either_logits(x_new, shipped) if either else x_new @ shipped[:2] + shipped[2]
    as_shipped = roc_auc(y_new, shipped_scores)
    print(f"  shipped fusion, as shipped: {as_shipped:.4f}")
    plain = scored(fitted("plain", x_old, y_old), x_new)
    print(f"  plain fusion refitted on the old: {roc_auc(y_new, plain):.4f}")
    model = fitted(form, x_old, y_old)
    candidate = scored(model, x_new)
    gain = roc_auc(y_new, candidate) - as_shipped
    print(f"  {form} fusion (floor {model[2]}, weights {model[1].round(3)}): gain {gain:+.4f}")
    print(f"  condition 1 (gain >= 0.005): {'holds' if gain >= 0.005 else 'fails'}")
    ranked = {"ensemble": x_new[:, 0], "reader": x_new[:, 1]}
    ranked |= {"shipped": shipped_scores, form: candidate}
    by_place(x_new, y_new, basal(args.new, rows_new, y_new, args.name), ranked)

    x, y = np.concatenate([x_old, x_new]), np.concatenate([y_old, y_new])
    print(f"\n2. out of fold on all {len(y)} fit studies ({int(y.sum())} positive)")
    base = [out_of_fold(x, y, s, "plain") for s in range(10)]
    low = [out_of_fold(x, y, s, form) for s in range(10)]
    print(f"  plain: {np.mean(base):.4f} ({min(base):.4f}-{max(base):.4f})")
    print(f"  {form}: {np.mean(low):.4f} ({min(low):.4f}-{max(low):.4f})")
    _, w, f = fitted(form, x, y)
    print(f"  {form}, fitted on all: floor {f}, weights {w.round(3)}")
    ok = np.mean(low) - np.mean(base) >= 0.005 and min(low) > np.mean(base)
    gain = float(np.mean(low) - np.mean(base))
    print(f"  condition 2 (gain {gain:+.4f}): {'holds' if ok else 'fails'}")
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
