"""How far the phantom's own shapes tell a subdural from an epidural haematoma.

    .venv/bin/python scripts/phantom_geometry.py var/data/phantom-select var/data/phantom-train-d

For every subdural and epidural lesion in the given phantom sets, reads its perfect mask
(masks.npz) and measures on the slice where it is largest: area, greatest thickness (twice the
number of 4-neighbour erosions that empty it, minus one) and area / thickness^2, a
scale-free elongation (about 0.8 x length / thickness for a lens, 0.9 x for an even band);
over all slices: volume and extent. Prints each feature's AUC for subdural against epidural
and the 5-fold cross-validated AUC of a logistic regression on all of them: what a classifier
that saw every lesion's exact outline, and nothing else, would reach. The networks see no
outline; their subdural-against-epidural AUC is printed by scripts/study_pooling.py.
"""

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.constants import SUBTYPES
from inference.metrics import roc_auc

FEATURES = (
    "log area",
    "log thickness",
    "log area/thickness^2",
    "log volume",
    "slices",
    "core share",
)


def erode(mask: np.ndarray) -> np.ndarray:
    """One 4-neighbour binary erosion of a 2D bool mask (the border counts as outside)."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0] = out[-1] = False
    out[:, 0] = out[:, -1] = False
    return out


def erosions_to_empty(mask: np.ndarray) -> int:
    n, m = 0, mask
    while m.any():
        m = erode(m)
        n += 1
    return n


def lesion_features(planes: np.ndarray) -> list[float]:
    """planes: (N, H, W) bool, one lesion over the slices. See FEATURES."""
    areas = planes.reshape(len(planes), -1).sum(1)
    largest = planes[int(areas.argmax())]
    area = float(areas.max())
    n = erosions_to_empty(largest)
    thickness = 2 * n - 1
    core = largest
    for _ in range(max(n // 2, 1)):
        core = erode(core)
    return [
        float(np.log(area)),
        float(np.log(thickness)),
        float(np.log(area / thickness**2)),
        float(np.log(areas.sum())),
        float((areas > 0).sum()),
        float(core.sum() / area),
    ]


def collect(roots: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Features (L, F) and is-subdural (L,) of every subdural and epidural lesion."""
    rows, subdural = [], []
    for root in roots:
        with open(root / "labels.csv", newline="") as f:
            for row in csv.DictReader(f):
                for name in ("subdural", "epidural"):
                    if row[name] != "1":
                        continue
                    masks = np.load(root / row["study"] / "masks.npz")["masks"]
                    bit = SUBTYPES.index(name)
                    rows.append(lesion_features(((masks >> bit) & 1).astype(bool)))
                    subdural.append(name == "subdural")
    return np.array(rows, dtype=np.float64), np.array(subdural, dtype=np.float64)


def fit_logistic(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of a logistic regression with a small L2 penalty."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        loss = loss + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return w.detach(), b.detach()


def cross_validated_scores(x: np.ndarray, y: np.ndarray, folds: int = 5) -> np.ndarray:
    """Out-of-fold logistic-regression scores (standardised features)."""
    x = (x - x.mean(0)) / x.std(0).clip(min=1e-9)
    order = np.random.default_rng(0).permutation(len(x))
    scores = np.zeros(len(x))
    for held in np.array_split(order, folds):
        fit = np.setdiff1d(order, held)
        w, b = fit_logistic(torch.tensor(x[fit]), torch.tensor(y[fit]))
        scores[held] = (torch.tensor(x[held]) @ w + b).numpy()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+", type=Path, help="phantom sets (ich phantom --out)")
    args = parser.parse_args()
    x, y = collect(args.datasets)
    print(f"{len(y)} lesions: {int(y.sum())} subdural, {int(len(y) - y.sum())} epidural")
    print("AUC for subdural against epidural, one feature at a time:")
    for j, name in enumerate(FEATURES):
        print(f"  {name:22s} {roc_auc(y, x[:, j]):.3f}")
    auc = roc_auc(y, cross_validated_scores(x, y))
    print(f"all features, 5-fold cross-validated logistic regression: {auc:.3f}")


if __name__ == "__main__":
    main()
