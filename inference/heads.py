"""`ich refit-heads`: one linear head over the whole ensemble, fitted on studies the networks
never trained on, in place of the members' own heads.

Each member's head was trained together with its network, on slices the network learnt by
heart, so it separates classes by features that are sharpest on the training data. A linear
head over the frozen embeddings of every member (standardised, L2-regularised logistic
regression per class), fitted on fresh labelled studies, weighs those features as they behave
on data the networks never saw. docs/model-analysis.md ("A head fitted on fresh studies")
measures what it did for the demonstration model.

The fitted head is folded into the members' own linear heads, so the package format, the
Predictor, Grad-CAM (the class evidence maps are still the heads applied before pooling) and
the atlas read it unchanged: the ensemble's mean slice logit is the new head's logit.
"""

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from inference.constants import CLASSES
from inference.data import Volume
from inference.package import ModelPackage, platt
from inference.progress import progress
from inference.training import (
    TrainConfig,
    VolumeFeatures,
    class_aucs,
    describe_operating_points,
    extract,
    fit_platt,
    mean_of,
    operating_point_record,
    operating_points,
)

DEFAULT_L2 = (1e-3, 1e-2, 1e-1)


@dataclass
class LinearHead:
    """Logits = ((x - mean) / scale) @ weight + bias over the members' concatenated embeddings."""

    mean: torch.Tensor  # (F,)
    scale: torch.Tensor  # (F,)
    weight: torch.Tensor  # (F, 6)
    bias: torch.Tensor  # (6,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.scale) @ self.weight + self.bias


def slice_matrix(features: list[VolumeFeatures]) -> torch.Tensor:
    """(M, N, E) per study -> (sum N, M * E): every member's embedding side by side."""
    return torch.cat([torch.cat(list(f.embeddings.float()), dim=-1) for f in features])


def fit_head(x: torch.Tensor, y: torch.Tensor, l2: float) -> LinearHead:
    """Per class logistic regression on standardised features, positives weighted by the square
    root of the class's imbalance; slices with an unknown label for a class do not count for it."""
    x = x.double()
    y = y.double()
    known = ~torch.isnan(y)
    target = torch.nan_to_num(y, nan=0.0)
    mean, scale = x.mean(0), x.std(0) + 1e-4
    z = (x - mean) / scale
    positives = (target * known).sum(0)
    negatives = ((1 - target) * known).sum(0)
    pos_weight = (negatives / positives.clamp(min=1)).sqrt()
    weight = torch.zeros(x.shape[1], len(CLASSES), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(CLASSES), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [weight, bias], max_iter=300, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )
    count = known.sum(0).clamp(min=1)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        losses = F.binary_cross_entropy_with_logits(
            z @ weight + bias, target, pos_weight=pos_weight, reduction="none"
        )
        loss = ((losses * known).sum(0) / count).sum() + l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return LinearHead(mean.float(), scale.float(), weight.detach().float(), bias.detach().float())


def study_logits(head: LinearHead, x: torch.Tensor, counts: list[int]) -> np.ndarray:
    """Maximum over each study's slices (rows of x, `counts` per study) of the head's logits, as
    the Predictor scores a study."""
    with torch.no_grad():
        return np.stack([part.amax(0).numpy() for part in torch.split(head(x), counts)])


def cross_fitted(
    x: torch.Tensor,
    y: torch.Tensor,
    counts: list[int],
    l2: float,
    folds: np.ndarray,
    bar: Any = None,
) -> np.ndarray:
    """Out-of-fold study logits: each study scored by a head fitted without its fold. x and y
    hold every study's slices in order, `counts` per study."""
    row_fold = torch.from_numpy(np.repeat(folds, counts))
    out = np.zeros((len(counts), len(CLASSES)))
    for fold in np.unique(folds):
        inside = row_fold != int(fold)
        head = fit_head(x[inside], y[inside], l2)
        outside = np.flatnonzero(folds == fold)
        out[outside] = study_logits(head, x[~inside], [counts[i] for i in outside])
        if bar is not None:
            bar.update(1)
    return out


def patient_folds(volumes: list[Volume], k: int, seed: int) -> np.ndarray:
    """Fold per study, all studies of a patient in one fold."""
    patients = sorted({v.patient_id for v in volumes})
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {patients[j]: int(rank % k) for rank, j in enumerate(order)}
    return np.array([fold_of[v.patient_id] for v in volumes])


def fold_into_members(package: ModelPackage, head: LinearHead) -> None:
    """Write the head into the members' own linear heads: member m's weight becomes
    M * weight_m / scale_m and every bias the head's bias less its mean term, so the mean of the
    members' logits (what the Predictor scores) is the head's logit."""
    members = package.members
    n = len(members)
    offset = 0
    shift = head.bias.clone()
    for model in members:
        dim = model.embedding_dim
        w = head.weight[offset : offset + dim] / head.scale[offset : offset + dim, None]  # (E, 6)
        shift -= head.mean[offset : offset + dim] @ w
        with torch.no_grad():
            model.fc.weight.copy_(n * w.T)
        offset += dim
    for model in members:
        with torch.no_grad():
            model.fc.bias.copy_(shift)


def refit_heads(
    package: ModelPackage,
    volumes: list[Volume],
    *,
    version: str,
    l2_grid: tuple[float, ...] = DEFAULT_L2,
    folds: int = 5,
    seed: int = 0,
    target_sensitivity: float = 0.95,
    data: list[str] | None = None,
) -> dict[str, Any]:
    """Fits the ensemble head on `volumes` (studies the networks never trained on, with slice
    labels), chooses its L2 weight by patient-grouped cross-validation (mean out-of-fold study
    AUC), calibrates and chooses the operating points on the out-of-fold study logits, and
    writes all of it into `package`. Returns the record it adds to the package's training."""
    if package.aggregator is not None:
        raise ValueError("refit-heads needs a model whose study level is the maximum over slices")
    if len(volumes) < 2 * folds:
        raise ValueError(f"refit-heads needs at least {2 * folds} studies, got {len(volumes)}")
    unlabelled = [v.key for v in volumes if np.isnan(v.slice_labels).all()]
    if unlabelled:
        raise ValueError(f"studies without slice labels: {', '.join(unlabelled[:5])}")
    started = time.time()
    features = extract(package.members, volumes, package.preprocess, torch.device("cpu"))
    labels = np.stack([v.study_labels for v in volumes])
    assignment = patient_folds(volumes, folds, seed)
    before = np.stack([f.logits.mean(0).amax(0).numpy() for f in features])
    x = slice_matrix(features)
    y = torch.from_numpy(np.concatenate([v.slice_labels for v in volumes]))
    counts = [len(v.slice_labels) for v in volumes]
    cv: dict[str, Any] = {}
    best: tuple[float, float, np.ndarray] = (-1.0, l2_grid[0], before)
    bar = progress(desc="fit heads", unit="fit", total=len(l2_grid) * folds + 1)
    for l2 in l2_grid:
        logits = cross_fitted(x, y, counts, l2, assignment, bar)
        per_class = class_aucs(logits, labels)
        mean = mean_of(per_class)
        cv[f"{l2:g}"] = {"mean": mean, **dict(zip(CLASSES, per_class, strict=True))}
        tqdm.write(f"head L2 {l2:g}: out-of-fold mean study AUC {mean:.4f}")
        if mean > best[0]:
            best = (mean, l2, logits)
    _, l2, oof = best
    head = fit_head(x, y, l2)
    bar.update(1)
    bar.close()
    fold_into_members(package, head)
    package.calibration = fit_platt(oof, labels)
    probabilities = platt(oof, package.calibration)
    config = TrainConfig(target_sensitivity=target_sensitivity)
    package.thresholds = operating_points(probabilities, labels, config)
    record = operating_point_record(probabilities, labels, package.thresholds)
    for line in describe_operating_points(record):
        tqdm.write(line)
    previous = f"{package.name} {package.version}"
    package.version = version
    per_class_before = class_aucs(before, labels)
    mean_before = mean_of(per_class_before)
    report = {
        "from": previous,
        "data": data or [],
        "studies": len(volumes),
        "slices": int(sum(counts)),
        "folds": folds,
        "l2_chosen": l2,
        "cross_validated_study_auc": cv,
        "members_own_heads_study_auc": {
            "mean": mean_before,
            **dict(zip(CLASSES, per_class_before, strict=True)),
        },
        "seconds": round(time.time() - started, 1),
    }
    package.training["heads_refit"] = report
    package.training["operating_points_on_validation"] = record
    package.training["calibrated_on"] = ["the refit-heads studies, out of fold"]
    split = package.training.setdefault("split", {})
    # a head refitted again keeps the earlier heads' studies out of evaluations too
    split["heads"] = [*split.get("heads", []), *(v.key for v in volumes)]
    return report
