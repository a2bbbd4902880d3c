"""Would averaging each slice's member logits over the slice and its left-right mirror image
(flip test-time augmentation) rank studies better? Measured out of fold on the studies the
package's fusions are fitted on, never on a selection or test set.

    .venv/bin/python scripts/tta_probe.py models/ich-demo/model.pt \
        var/data/cx-val var/data/cx-fit-typical

Training flips slices left-right with probability 0.5 (``Augment.flip_prob``), so a mirrored
slice is an input the members have learnt to read. For each study the script computes the
ensemble's calibrated study logits as the predictor does (members' mean slice logit, study
level, Platt calibration), and again with each member's slice logits averaged over the slice
and its mirror first. It prints, per class, the ensemble's study AUC both ways, and for each
class a strip reader of the package fuses, the out-of-fold AUC of that fusion (a logistic
regression on the ensemble's logit and the reader's evidence, 5 folds, fold seeds 0-9, as
``scripts/fusion_probe.py`` fits it) both ways; a class fused in the "either" form (6.13.0's
subarachnoid) is measured with that linear fusion too. The readers are left as they are.

Gate, written before the script was first run: flip averaging goes on to a candidate package
only if the fused epidural out-of-fold AUC (mean over fold seeds) rises by at least 0.005, and
no class's ensemble or fused AUC here falls by more than 0.002.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusion_probe import (
    out_of_fold_auc,
    reader_evidence,
)  # scripts/ is on sys.path when run as a script

from inference.constants import CLASSES
from inference.datasets import read_phantom_dataset
from inference.dicom_io import load_series
from inference.feature_cache import member_outputs
from inference.metrics import roc_auc
from inference.package import READER_SLOTS
from inference.predictor import Predictor
from inference.preprocess import model_input, resample_inplane
from inference.progress import progress


def study_logits_both(predictor: Predictor, series) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble's calibrated study logits (6,) as the predictor computes them, and with
    each member's slice logits averaged over the slice and its mirror image."""
    package = predictor.package
    grid, _ = resample_inplane(series.hu, series.pixel_spacing_mm, package.preprocess)
    x = model_input(grid, series.positions_mm, package.preprocess)  # (N, 3, S, S)
    n = len(x)
    logits, embeddings = member_outputs(
        predictor.networks(), torch.cat([x, x.flip(-1)]), predictor.device, batch_size=8
    )
    plain = predictor._calibrated_logits(logits[:, :n], embeddings[:, :n])
    averaged = predictor._calibrated_logits(
        (logits[:, :n] + logits[:, n:]) / 2, (embeddings[:, :n] + embeddings[:, n:]) / 2
    )
    return plain, averaged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("sets", type=Path, nargs="+", help="phantom sets (ich phantom --out)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold-seeds", type=int, default=10, help="fold seeds 0..N-1")
    args = parser.parse_args()

    started = time.time()
    torch.set_num_threads(torch.get_num_threads())
    predictor = Predictor.load(args.model, device="cpu")
    readers = predictor.package.readers()
    slots = [s for s in READER_SLOTS if getattr(predictor.package, s) is not None]
    items = [i for folder in args.sets for i in read_phantom_dataset(folder)]
    plain, flipped, evidence, labels = [], [], [], []
    for item in progress(items, desc="score studies", unit="study"):
        series = load_series(item.paths)
        a, b = study_logits_both(predictor, series)
        plain.append(a)
        flipped.append(b)
        evidence.append(reader_evidence(readers, series))
        labels.append(np.asarray(item.labels, np.float64))
    ens = {"plain": np.stack(plain), "flip-averaged": np.stack(flipped)}
    ev, lab = np.stack(evidence), np.stack(labels)  # ev (S, R, 6)
    print(f"{len(items)} studies from {', '.join(map(str, args.sets))}; {args.model}")
    print(
        f"{'class':<18}{'ensemble plain':>16}{'flip-averaged':>15}   fused (reader): plain -> flip"
    )
    for c, name in enumerate(CLASSES):
        known = ~np.isnan(lab[:, c])
        line = f"{name:<18}"
        for variant in ens.values():
            line += f"{roc_auc(lab[known, c], variant[known, c]):>15.4f} "
        fusing = [r for r, reader in enumerate(readers) if c in reader.fused_classes()]
        for r in fusing:
            readable = known & ~np.isnan(ev[:, r, c])
            y = lab[readable, c]
            fused = []
            for variant in ens.values():
                x = np.column_stack([variant[readable, c], ev[readable, r, c]])
                fused.append(
                    np.mean([out_of_fold_auc(x, y, args.folds, s) for s in range(args.fold_seeds)])
                )
            line += f"  {slots[r]}: {fused[0]:.4f} -> {fused[1]:.4f} ({fused[1] - fused[0]:+.4f})"
        print(line)
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
