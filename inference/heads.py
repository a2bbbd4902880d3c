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

That also means a new head moves the explanation: each member's Grad-CAM is its share of the
head's weights applied to its feature maps, so a head chosen for study AUC alone can put the
evidence for a class off the bleed (6.2.0's epidural pointing game fell from 96% to 67%). With
``attention_weight`` > 0 the fit adds the networks' own localisation term
(``training.localisation_loss``) on sampled bleed slices with masks: minus the log of the share
of a spatial softmax of each member's folded evidence map that lies near the bleed.
"""

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from inference.constants import CLASSES
from inference.data import Volume, slice_input
from inference.datasets import pseudonym
from inference.feature_cache import FeatureCache
from inference.package import ModelPackage, platt
from inference.progress import progress
from inference.training import (
    TrainConfig,
    VolumeFeatures,
    class_aucs,
    class_outlines,
    describe_operating_points,
    extract,
    fit_platt,
    localisation_nll,
    mean_of,
    near_bleed,
    operating_point_record,
    operating_points,
)

DEFAULT_L2 = (1e-3, 1e-2, 1e-1)
DEFAULT_ATTENTION_SLICES = 60  # bleed slices sampled per class for the attention term
# the largest fall, per class, in the out-of-fold share of Grad-CAM peaks near the bleed against
# the members' own heads that a chosen setting may have (the ship rule's pointing-game margin)
DEFAULT_MAX_ATTENTION_DROP = 0.05


ATTENTION_ENERGY = 0.995  # share of the feature maps' energy the attention term's basis keeps
ATTENTION_MAX_RANK = 256


@dataclass
class AttentionSlices:
    """Sampled bleed slices for the attention term: every member's last-stage maps with the
    locations near each class's bleed.

    The term is evaluated hundreds of times per fit, and a pass over P * L * 1280 features per
    member is what it costs, so the fit reads the maps in a basis of their leading principal
    directions (uncentred, ``ATTENTION_ENERGY`` of their energy, at most ``ATTENTION_MAX_RANK``
    of them): maps @ w ~ (maps @ V) @ (V^T w). Hit rates read the exact maps."""

    maps: list[torch.Tensor]  # per member (P, L, E) float32, L = h * w locations
    bases: list[torch.Tensor]  # per member (E, k) orthonormal columns
    projected: list[torch.Tensor]  # per member (P, L, k): maps @ basis
    cells: torch.Tensor  # (P, 6, L) float: 1 where the location is near the class's bleed
    valid: torch.Tensor  # (P, 6) bool: the slice is positive for the class and outlined
    study: np.ndarray  # (P,) index of each slice's study

    def subset(self, keep: np.ndarray) -> "AttentionSlices":
        rows = torch.from_numpy(np.flatnonzero(keep))
        return AttentionSlices(
            [m[rows] for m in self.maps],
            self.bases,
            [m[rows] for m in self.projected],
            self.cells[rows],
            self.valid[rows],
            self.study[keep],
        )


def principal_basis(maps: torch.Tensor) -> torch.Tensor:
    """(P, L, E) -> (E, k): the leading eigenvectors of the uncentred second moment of the
    location features, enough for ``ATTENTION_ENERGY`` of it."""
    flat = maps.reshape(-1, maps.shape[-1]).double()
    values, vectors = torch.linalg.eigh(flat.T @ flat)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    share = torch.cumsum(values, 0) / values.sum().clamp_min(1e-12)
    rank = min(int(torch.searchsorted(share, ATTENTION_ENERGY)) + 1, ATTENTION_MAX_RANK)
    return vectors[:, :rank].float().contiguous()


def attention_slices(
    package: ModelPackage, volumes: list[Volume], per_class: int, seed: int
) -> AttentionSlices | None:
    """Up to ``per_class`` outlined positive slices per class, drawn at random (seeded) from
    ``volumes``, run through the members; None where no study has masks."""
    rng = np.random.default_rng(seed)
    chosen: set[tuple[int, int]] = set()
    for c in range(len(CLASSES)):
        candidates = [
            (v, int(s))
            for v, volume in enumerate(volumes)
            if volume.masks is not None
            for s in np.flatnonzero(volume.slice_labels[:, c] == 1)
            if _outlined(volume.masks[s], c)
        ]
        picks = rng.permutation(len(candidates))[:per_class]
        chosen.update(candidates[int(i)] for i in picks)
    if not chosen:
        return None
    order = sorted(chosen)
    inputs, outlines = [], []
    for v, s in order:
        x, mask = slice_input(volumes[v], s, package.preprocess, None)
        inputs.append(x)
        outlines.append(class_outlines(mask, x.shape[-1]))
    labels = torch.from_numpy(np.stack([volumes[v].slice_labels[s] for v, s in order]))
    x_all = torch.stack(inputs)
    maps = []
    with torch.no_grad():
        for model in package.members:
            stage = torch.cat([model.forward_features(b).float() for b in torch.split(x_all, 32)])
            height, width = stage.shape[-2:]
            maps.append(stage.flatten(2).transpose(1, 2).contiguous())  # (P, L, E)
    cells, valid = near_bleed(torch.stack(outlines), labels, height, width)
    bases = [principal_basis(m) for m in maps]
    projected = [m @ b for m, b in zip(maps, bases, strict=True)]
    study = np.array([v for v, _ in order])
    return AttentionSlices(maps, bases, projected, cells, valid, study)


def _outlined(mask: np.ndarray, c: int) -> bool:
    """Whether a slice's bit-flag mask outlines class c: bit c - 1 (the bits follow SUBTYPES,
    CLASSES without "any"), any bit for "any", as ``training.class_outlines`` reads it."""
    if c == 0:
        return bool(mask.any())
    return bool(((mask >> (c - 1)) & 1).any())


def member_maps(
    attention: AttentionSlices, weight: torch.Tensor, scale: torch.Tensor, *, exact: bool = False
) -> list[torch.Tensor]:
    """Each member's folded evidence maps (P, 6, L), less the constant bias, for a head with
    ``weight`` over standardised features: member m's head is M * weight_m / scale_m (see
    ``fold_into_members``). In the principal basis unless ``exact``."""
    out, offset, n = [], 0, len(attention.maps)
    for stage, basis, projected in zip(
        attention.maps, attention.bases, attention.projected, strict=True
    ):
        dim = stage.shape[-1]
        w = (weight[offset : offset + dim] / scale[offset : offset + dim, None]).float()
        maps = stage @ w if exact else projected @ (basis.T @ w)
        out.append((n * maps).transpose(1, 2))
        offset += dim
    return out


def attention_term(
    attention: AttentionSlices, weight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Per class, the mean over members and outlined slices of the localisation loss, summed
    over classes (as the classification loss is)."""
    total = torch.zeros((), dtype=torch.float64)
    counts = attention.valid.sum(0)
    for maps in member_maps(attention, weight, scale):
        nll = localisation_nll(maps, attention.cells).masked_fill(~attention.valid, 0.0)
        total = total + (nll.sum(0) / counts.clamp(min=1)).sum().double()
    return total / len(attention.maps)


def attention_hits(
    attention: AttentionSlices, weight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """(P, 6) bool: the ensemble's Grad-CAM peak (mean over members of ReLU(map) scaled to a
    peak of 1, as ``gradcam.class_activation``) lies on a location near the bleed."""
    with torch.no_grad():
        cams = []
        for maps in member_maps(attention, weight, scale, exact=True):
            cam = torch.relu(maps)  # the map less its bias, as Grad-CAM sees it
            cams.append(cam / cam.amax(-1, keepdim=True).clamp_min(1e-8))
        peak = torch.stack(cams).mean(0).argmax(-1, keepdim=True)  # (P, 6, 1)
        return attention.cells.gather(-1, peak)[..., 0] > 0


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


def fit_head(
    x: torch.Tensor,
    y: torch.Tensor,
    l2: float,
    attention: AttentionSlices | None = None,
    attention_weight: float = 0.0,
) -> LinearHead:
    """Per class logistic regression on standardised features, positives weighted by the square
    root of the class's imbalance; slices with an unknown label for a class do not count for it.
    With ``attention`` and a positive ``attention_weight``, plus that weight times
    ``attention_term``: the folded head's evidence maps pulled onto the bleeds."""
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
        if attention is not None and attention_weight > 0:
            loss = loss + attention_weight * attention_term(attention, weight, scale)
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
    attention: AttentionSlices | None = None,
    attention_weight: float = 0.0,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """Out-of-fold study logits: each study scored by a head fitted without its fold. x and y
    hold every study's slices in order, `counts` per study. With ``attention``, also whether
    each attention slice's Grad-CAM peak lies near its bleed under the head fitted without its
    study's fold, (P, 6) bool."""
    row_fold = torch.from_numpy(np.repeat(folds, counts))
    out = np.zeros((len(counts), len(CLASSES)))
    hits = None if attention is None else torch.zeros(attention.valid.shape, dtype=torch.bool)
    for fold in np.unique(folds):
        inside = row_fold != int(fold)
        fit_on = None if attention is None else attention.subset(folds[attention.study] != fold)
        head = fit_head(x[inside], y[inside], l2, fit_on, attention_weight)
        outside = np.flatnonzero(folds == fold)
        out[outside] = study_logits(head, x[~inside], [counts[i] for i in outside])
        if attention is not None and hits is not None:
            held = folds[attention.study] == fold
            rows = torch.from_numpy(np.flatnonzero(held))
            hits[rows] = attention_hits(attention.subset(held), head.weight, head.scale)
        if bar is not None:
            bar.update(1)
    return out, hits


def hit_rates(hits: torch.Tensor, valid: torch.Tensor) -> dict[str, float | None]:
    """Share of outlined slices whose attention peak lies near the bleed, per class."""
    return {
        name: float(hits[valid[:, c], c].float().mean()) if valid[:, c].any() else None
        for c, name in enumerate(CLASSES)
    }


def within_drop(rates: dict[str, float | None], own: dict[str, float | None], drop: float) -> bool:
    """Whether every class's share of peaks near the bleed is at most ``drop`` under ``own``."""
    return all(
        rate >= own_rate - drop
        for name, rate in rates.items()
        if rate is not None and (own_rate := own.get(name)) is not None
    )


def patient_folds(volumes: list[Volume], k: int, seed: int) -> np.ndarray:
    """Fold per study, all studies of a patient in one fold."""
    patients = sorted({v.patient_id for v in volumes})
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {patients[j]: int(rank % k) for rank, j in enumerate(order)}
    return np.array([fold_of[v.patient_id] for v in volumes])


def fold_weights(package: ModelPackage) -> tuple[torch.Tensor, torch.Tensor]:
    """The members' own heads as (weight, scale) for ``member_maps``: weight_m = fc_m / M over
    unscaled features, so member m's folded head is its own."""
    n = len(package.members)
    weight = torch.cat([m.fc.weight.detach().float().T / n for m in package.members])
    return weight, torch.ones(weight.shape[0])


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
    attention_weights: tuple[float, ...] = (0.0,),
    attention_per_class: int = DEFAULT_ATTENTION_SLICES,
    max_attention_drop: float = DEFAULT_MAX_ATTENTION_DROP,
    cache: FeatureCache | None = None,
) -> dict[str, Any]:
    """Fits the ensemble head on `volumes` (studies the networks never trained on, with slice
    labels), chooses its L2 weight by patient-grouped cross-validation (mean out-of-fold study
    AUC), calibrates and chooses the operating points on the out-of-fold study logits, and
    writes all of it into `package`. With an attention weight > 0, every fit also pulls the
    evidence maps onto the bleeds of ``attention_per_class`` sampled outlined slices per class,
    and the record reports how often, out of fold, the Grad-CAM peak lies near the bleed.

    Several ``attention_weights`` are cross-validated from one pass of the networks. Where
    attention slices exist, a setting (L2, weight) is eligible when, for every class, its
    out-of-fold share of peaks near the bleed is at most ``max_attention_drop`` under the
    members' own heads' share on the same slices; the eligible setting with the highest
    out-of-fold mean study AUC is chosen. If none is eligible, the highest-AUC setting is
    chosen with a warning, and the record says so. Returns the record it adds to the
    package's training."""
    if package.aggregator is not None:
        raise ValueError("refit-heads needs a model whose study level is the maximum over slices")
    if package.readers():
        raise ValueError(
            f"{package.name} {package.version} has strip readers, fitted on its present heads:"
            " refit the heads of the package they were added to, then add the readers again"
            " (ich convexity)"
        )
    if folds < 2:
        raise ValueError(f"refit-heads needs at least 2 folds, not {folds}")
    patients = len({v.patient_id for v in volumes})
    if patients < folds:
        raise ValueError(f"{folds} folds need at least {folds} patients, got {patients}")
    if len(volumes) < 2 * folds:
        raise ValueError(f"refit-heads needs at least {2 * folds} studies, got {len(volumes)}")
    unlabelled = [v.key for v in volumes if np.isnan(v.slice_labels).all()]
    if unlabelled:
        raise ValueError(f"studies without slice labels: {', '.join(unlabelled[:5])}")
    started = time.time()
    features = extract(package.members, volumes, package.preprocess, torch.device("cpu"), cache)
    labels = np.stack([v.study_labels for v in volumes])
    assignment = patient_folds(volumes, folds, seed)
    before = np.stack([f.logits.mean(0).amax(0).numpy() for f in features])
    x = slice_matrix(features)
    y = torch.from_numpy(np.concatenate([v.slice_labels for v in volumes]))
    counts = [len(v.slice_labels) for v in volumes]
    attention = None
    if max(attention_weights) > 0:
        attention = attention_slices(package, volumes, attention_per_class, seed)
        if attention is None:
            raise ValueError("--attention-weight needs studies with bleed masks (phantom output)")
    own_hits = None
    if attention is not None:
        own_hits = hit_rates(attention_hits(attention, *fold_weights(package)), attention.valid)
        tqdm.write(
            "members' own heads: attention peak near the bleed "
            + ", ".join(f"{name} {rate:.2f}" for name, rate in own_hits.items() if rate is not None)
        )
    total = len(l2_grid) * len(attention_weights) * folds + 1
    bar = progress(desc="fit heads", unit="fit", total=total)
    sweep = []
    for weight in attention_weights:
        for l2 in l2_grid:
            logits, hits = cross_fitted(x, y, counts, l2, assignment, bar, attention, weight)
            per_class = class_aucs(logits, labels)
            entry: dict[str, Any] = {
                "l2": l2,
                "attention_weight": weight,
                "mean": mean_of(per_class),
                **dict(zip(CLASSES, per_class, strict=True)),
            }
            line = f"head L2 {l2:g}"
            if len(attention_weights) > 1:
                line += f", attention weight {weight:g}"
            line += f": out-of-fold mean study AUC {entry['mean']:.4f}"
            if attention is not None and own_hits is not None and hits is not None:
                rates = hit_rates(hits, attention.valid)
                entry["attention_near_bleed"] = rates
                entry["attention_within_drop"] = within_drop(rates, own_hits, max_attention_drop)
                line += ", attention peak near the bleed " + ", ".join(
                    f"{name} {rate:.2f}" for name, rate in rates.items() if rate is not None
                )
            tqdm.write(line)
            sweep.append((entry, logits))
    eligible = [s for s in sweep if s[0].get("attention_within_drop", True)]
    chosen, oof = max(eligible or sweep, key=lambda s: s[0]["mean"])
    if not eligible:
        tqdm.write(
            f"WARNING: every setting puts some class's Grad-CAM peak near the bleed more than"
            f" {max_attention_drop:g} less often than the members' own heads; chose the highest"
            " out-of-fold AUC anyway. Check the explanations before shipping this model"
        )
    l2, attention_weight = chosen["l2"], chosen["attention_weight"]
    head = fit_head(x, y, l2, attention, attention_weight)
    bar.update(1)
    bar.close()
    cv = {
        f"{e['l2']:g}": {k: v for k, v in e.items() if k not in ("l2", "attention_weight")}
        for e, _ in sweep
        if e["attention_weight"] == attention_weight
    }
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
        "attention_weight": attention_weight,
        "seconds": round(time.time() - started, 1),
    }
    if len(attention_weights) > 1:
        report["attention_weight_sweep"] = [e for e, _ in sweep]
    if own_hits is not None:
        report["max_attention_drop"] = max_attention_drop
        report["attention_within_drop"] = bool(eligible)
    if attention is not None:
        report["attention_slices"] = {
            "per_class": attention_per_class,
            "slices": len(attention.study),
            "outlined_per_class": dict(
                zip(CLASSES, (int(n) for n in attention.valid.sum(0)), strict=True)
            ),
            "members_own_heads_near_bleed": own_hits,
        }
    package.training["heads_refit"] = report
    package.training["operating_points_on_validation"] = record
    package.training["calibrated_on"] = ["the refit-heads studies, out of fold"]
    split = package.training.setdefault("split", {})
    # a head refitted again keeps the earlier heads' studies out of evaluations too
    split["heads"] = [*split.get("heads", []), *(pseudonym(v.key) for v in volumes)]
    return report
