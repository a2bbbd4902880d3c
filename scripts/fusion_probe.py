"""Out-of-fold study AUC of each extra-axial class for fusions of the ensemble with the strip
readers' evidence, on the studies a fusion is fitted on (never on a selection or test set).

    .venv/bin/python scripts/fusion_probe.py models/ich-demo/model.pt \
        var/data/cx-val var/data/cx-fit-typical

The package's ensemble gives each study's calibrated logits (before any reader joins); each of
its readers gives its study strip logits. For "any", subdural and epidural, a logistic regression
on the ensemble's logit and each subset of the readers' evidence for the class is fitted in k
folds (as ``ich convexity`` fits a fusion; its 5 folds, several fold seeds here) and the
out-of-fold study AUC printed with its mean over fold seeds. It asks whether a class would read
better from two readers at once than from the one the package fuses it with now. Studies no
reader could read are left out, as the fit leaves them out.
"""

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.constants import CLASSES
from inference.convexity import ConvexityReader, readers_study_logits, strip_features
from inference.datasets import read_phantom_dataset
from inference.dicom_io import CTSeries, load_series
from inference.metrics import roc_auc
from inference.package import READER_SLOTS
from inference.predictor import Predictor
from inference.progress import progress

PROBED = ("any", "subdural", "epidural")


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Weights (F,) and bias minimising log-loss on (S, F) features, ``l2`` on the weights."""
    features = torch.tensor(x, dtype=torch.float64)
    target = torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64)
    w[0] = 1.0  # the ensemble's logit as it is
    w.requires_grad_(True)
    optimiser = torch.optim.LBFGS([w], lr=0.5, max_iter=200)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.binary_cross_entropy_with_logits(features @ w[:-1] + w[-1], target)
        loss = loss + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return w.detach().numpy()


def out_of_fold_auc(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> float:
    assignment = np.random.default_rng(seed).permutation(len(y)) % folds
    oof = np.zeros(len(y))
    for k in range(folds):
        train, test = assignment != k, assignment == k
        w = fit_logistic(x[train], y[train])
        oof[test] = x[test] @ w[:-1] + w[-1]
    return roc_auc(y, oof)


def reader_evidence(readers: list[ConvexityReader], series: CTSeries) -> list[np.ndarray]:
    """Each reader's study evidence per class (6,), NaN where it could not read the series."""
    read = readers_study_logits(readers, series.hu, series.pixel_spacing_mm)
    return [
        np.full(len(CLASSES), np.nan)
        if logits is None
        else strip_features(logits[None], reader.net.classes)[0]
        for reader, logits in zip(readers, read, strict=True)
    ]


def score_studies(model: Path, sets: list[Path]) -> dict[str, np.ndarray]:
    """Each study of the phantom ``sets``: the ensemble's calibrated logits (S, 6), each
    reader's evidence (S, R, 6), the labels (S, 6), and the readers' slots (R,)."""
    predictor = Predictor.load(model, device="cpu")
    readers = predictor.package.readers()
    slots = [s for s in READER_SLOTS if getattr(predictor.package, s) is not None]
    items = [i for folder in sets for i in read_phantom_dataset(folder)]
    ensemble, evidence, labels = [], [], []
    for item in progress(items, desc="score studies", unit="study"):
        series = load_series(item.paths)
        ensemble.append(predictor.ensemble_logits(series))
        evidence.append(reader_evidence(readers, series))
        labels.append(np.asarray(item.labels, np.float64))
    return {
        "ensemble": np.stack(ensemble),
        "evidence": np.stack(evidence),
        "labels": np.stack(labels),
        "slots": np.array(slots),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("sets", type=Path, nargs="+", help="phantom sets (ich phantom --out)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold-seeds", type=int, default=10, help="fold seeds 0..N-1")
    args = parser.parse_args()

    started = time.time()
    scored = score_studies(args.model, args.sets)
    ens, ev, lab = scored["ensemble"], scored["evidence"], scored["labels"]  # ev (S, R, 6)
    slots = [str(s) for s in scored["slots"]]
    readers = Predictor.load(args.model, device="cpu").package.readers()
    print(f"{len(lab)} studies from {', '.join(map(str, args.sets))}; {args.model}")
    named = (f"{s} {r.net.classes}" for s, r in zip(slots, readers, strict=True))
    print(f"readers: {', '.join(named)}")
    for name in PROBED:
        c = CLASSES.index(name)
        with_evidence = [r for r in range(len(readers)) if not np.isnan(ev[:, r, c]).all()]
        readable = ~np.isnan(ev[:, with_evidence, c]).any(axis=1)
        known = readable & ~np.isnan(lab[:, c])
        y = lab[known, c]
        print(f"\n{name}: {int(known.sum())} studies, {int(y.sum())} positive")
        print(f"  ensemble alone: {roc_auc(y, ens[known, c]):.4f}")
        for size in range(1, len(with_evidence) + 1):
            for subset in itertools.combinations(with_evidence, size):
                x = np.column_stack([ens[known, c], *(ev[known, r, c] for r in subset)])
                aucs = [out_of_fold_auc(x, y, args.folds, s) for s in range(args.fold_seeds)]
                joined = " + ".join(slots[r] for r in subset)
                print(
                    f"  ensemble + {joined}: out of fold {np.mean(aucs):.4f} "
                    f"(fold seeds {min(aucs):.4f}-{max(aucs):.4f}; seed 0 {aucs[0]:.4f})"
                )
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
