"""Classification metrics in numpy: AUC, bootstrap intervals, operating points, calibration."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, midranks for ties); NaN without both classes."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # midranks for ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_auc(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    rounds: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """AUC with a 95% percentile bootstrap interval, resampling cases, or whole groups of cases
    where ``groups`` names each case's group (the slices of one study, the pictures of one
    patient): cases of one group are not independent, and resampling them one by one would
    make the interval too narrow."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    return _bootstrap(
        lambda pick: roc_auc(labels[pick], scores[pick]), len(labels), rounds, seed, groups
    )


def paired_bootstrap_auc_difference(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    *,
    rounds: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """AUC of b minus AUC of a on the same cases, with a 95% percentile interval from resampling
    the cases once for both, so what the two models share does not widen the interval."""
    labels, scores_a, scores_b = np.asarray(labels), np.asarray(scores_a), np.asarray(scores_b)

    def difference(pick: np.ndarray) -> float:
        return roc_auc(labels[pick], scores_b[pick]) - roc_auc(labels[pick], scores_a[pick])

    return _bootstrap(difference, len(labels), rounds, seed)


def _bootstrap(
    statistic: Callable[[np.ndarray], float],
    n: int,
    rounds: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """The statistic on all n cases and its 95% percentile interval over resampled cases, or
    resampled groups of cases (resamples where it is NaN, such as those without both classes,
    are left out). Groups of one case each resample exactly as cases do."""
    point = statistic(np.arange(n))
    if np.isnan(point):
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    members: list[np.ndarray] | None = None
    if groups is not None and len(np.unique(np.asarray(groups))) < n:
        _, group_of = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(group_of == g) for g in range(int(group_of.max()) + 1)]
    if rounds < 1 or (n if members is None else len(members)) < 2:
        # One case or one group resamples to itself every time: no interval, not a 0-wide one.
        return point, float("nan"), float("nan")

    def draw() -> np.ndarray:
        if members is None:
            return rng.integers(0, n, n)
        return np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])

    samples = [statistic(draw()) for _ in range(rounds)]
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return point, float(low), float(high)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds, thresholds descending."""
    labels = np.asarray(labels, dtype=bool)
    thresholds = np.unique(scores)[::-1]
    tpr = np.array([(scores[labels] >= t).mean() for t in thresholds]) if labels.any() else None
    fpr = np.array([(scores[~labels] >= t).mean() for t in thresholds]) if (~labels).any() else None
    if tpr is None or fpr is None:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([np.inf, -np.inf])
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, tpr, 1.0], np.r_[np.inf, thresholds, -np.inf]


@dataclass
class OperatingPoint:
    threshold: float
    sensitivity: float
    specificity: float
    positives: int
    negatives: int


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> OperatingPoint:
    labels = np.asarray(labels, dtype=bool)
    flagged = np.asarray(scores) >= threshold
    pos, neg = int(labels.sum()), int((~labels).sum())
    sensitivity = float(flagged[labels].mean()) if pos else float("nan")
    specificity = float((~flagged[~labels]).mean()) if neg else float("nan")
    return OperatingPoint(threshold, sensitivity, specificity, pos, neg)


THRESHOLD_MARGIN_LOGIT = 1e-3


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """A threshold on probabilities whose sensitivity is at least ``target`` (0.5 without
    positives): just under the lowest positive score it must flag, by half the gap to the next
    lower score but at most THRESHOLD_MARGIN_LOGIT in logit. Exactly at that score, the same
    study scored a hair lower elsewhere (the predictor's path, another machine's rounding)
    would lose its flag; within the gap, every study chosen on keeps its side."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    positive_scores = np.sort(scores[labels])[::-1]
    if len(positive_scores) == 0:
        return 0.5
    needed = int(np.ceil(target * len(positive_scores)))
    lowest = float(positive_scores[max(needed, 1) - 1])
    below = scores[scores < lowest]
    floor = _logit(lowest) - THRESHOLD_MARGIN_LOGIT
    if len(below):
        floor = max(floor, (_logit(lowest) + _logit(float(below.max()))) / 2)
    return min(lowest, float(1.0 / (1.0 + np.exp(-floor))))


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return float(np.log(p / (1 - p)))


def calibration(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> dict:
    """Reliability table, expected calibration error and Brier score."""
    labels = np.asarray(labels, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if not inside.any():
            continue
        mean_p, observed = float(probabilities[inside].mean()), float(labels[inside].mean())
        ece += inside.mean() * abs(mean_p - observed)
        table.append(
            {
                "bin": [float(edges[b]), float(edges[b + 1])],
                "count": int(inside.sum()),
                "mean_probability": mean_p,
                "observed_rate": observed,
            }
        )
    brier = float(np.mean((probabilities - labels) ** 2)) if len(labels) else float("nan")
    return {"ece": float(ece), "brier": brier, "bins": table}
