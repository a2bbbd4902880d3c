"""Study AUC per class for other ways of pooling a model's slice scores, on a phantom set.

    .venv/bin/python scripts/study_pooling.py models/ich-demo/model.pt var/data/phantom-select

Runs the model's networks over every slice, once as is and once mirrored left to right, and
prints each class's study AUC for: the maximum over slices of the ensemble's mean logit (what
the Predictor does without a GRU), the same with the mirrored pass averaged in (flip
test-time augmentation), each member alone, a soft maximum (log-sum-exp at temperature 1/2)
and the mean of the two highest slices. Also the subdural-against-epidural AUC on the studies
that hold exactly one of the two, the one comparison the networks find hard. Choose on a
selection set, not on the test set.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.constants import CLASSES
from inference.datasets import read_phantom_dataset
from inference.dicom_io import load_series
from inference.metrics import roc_auc
from inference.package import ModelPackage, slice_outputs
from inference.preprocess import model_input, resample_inplane


def member(m: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: a[0, m].max(0)


# (2 passes: as is, mirrored; M members; N slices; 6 classes) -> (6,) study score
POOLINGS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "max": lambda a: a[0].mean(0).max(0),
    "max, flip TTA": lambda a: a.mean((0, 1)).max(0),
    "max, member 0": member(0),
    "max, member 1": member(1),
    "log-sum-exp": lambda a: np.log(np.exp(2 * a[0].mean(0)).sum(0)) / 2,
    "top-2 mean": lambda a: np.sort(a[0].mean(0), axis=0)[-2:].mean(0),
}


@torch.no_grad()
def slice_logits(package: ModelPackage, paths: list[Path], batch: int = 8) -> np.ndarray:
    series = load_series(paths)
    grid, _ = resample_inplane(series.hu, series.pixel_spacing_mm, package.preprocess)
    x = model_input(grid, series.positions_mm, package.preprocess)
    passes = []
    for inputs in (x, torch.flip(x, dims=[-1])):
        parts = [slice_outputs(package.members, c)["logits"] for c in torch.split(inputs, batch)]
        passes.append(torch.cat(parts, dim=1).float().numpy())
    return np.stack(passes)  # (2, M, N, 6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("dataset", type=Path, help="a phantom set (ich phantom --out)")
    args = parser.parse_args()
    package = ModelPackage.load(args.model)
    items = read_phantom_dataset(args.dataset)
    logits, labels = [], []
    for i, item in enumerate(items, start=1):
        logits.append(slice_logits(package, item.paths))
        labels.append(item.labels)
        print(f"\r{i}/{len(items)} studies", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    y = np.stack(labels)
    sdh, edh = CLASSES.index("subdural"), CLASSES.index("epidural")
    one = (y[:, sdh] + y[:, edh]) == 1
    print(f"{package.name} {package.version} on {args.dataset} ({len(items)} studies)")
    print(f"{'pooling':16s}" + "".join(f"{c[:8]:>9s}" for c in CLASSES) + "     mean  SDH/EDH")
    for name, pool in POOLINGS.items():
        scores = np.stack([pool(a) for a in logits])
        aucs = [roc_auc(y[:, i], scores[:, i]) for i in range(len(CLASSES))]
        versus = roc_auc(y[one, sdh], scores[one, sdh] - scores[one, edh])
        print(
            f"{name:16s}"
            + "".join(f"{a:9.4f}" for a in aucs)
            + f"{np.nanmean(aucs):9.4f}{versus:9.3f}"
        )


if __name__ == "__main__":
    main()
