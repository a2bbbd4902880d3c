"""scripts/phantom_geometry.py: the outline measures behind docs/model-analysis.md."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from phantom_geometry import (
    FEATURES,
    cross_validated_scores,
    erosions_to_empty,
    lesion_features,
)

from inference.metrics import roc_auc


def band(length: int, thickness: int, size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    top = (size - thickness) // 2
    left = (size - length) // 2
    mask[top : top + thickness, left : left + length] = True
    return mask


def test_erosions_measure_the_greatest_thickness() -> None:
    for thickness in (1, 3, 5, 9):
        n = erosions_to_empty(band(40, thickness))
        assert 2 * n - 1 == thickness
    assert erosions_to_empty(np.zeros((8, 8), dtype=bool)) == 0


def test_elongation_tells_a_long_thin_band_from_a_short_thick_one() -> None:
    thin = lesion_features(band(48, 5)[None])
    thick = lesion_features(band(20, 13)[None])
    elongation = FEATURES.index("log area/thickness^2")
    assert np.exp(thin[elongation]) == pytest.approx(48 * 5 / 25)
    assert thin[elongation] > thick[elongation]
    volume = FEATURES.index("log volume")
    two_slices = lesion_features(np.stack([band(48, 5), band(30, 5)]))
    assert np.exp(two_slices[volume]) == pytest.approx(48 * 5 + 30 * 5)
    assert two_slices[FEATURES.index("slices")] == 2


def test_cross_validated_scores_find_signal_and_only_signal() -> None:
    rng = np.random.default_rng(1)
    y = (np.arange(200) % 2).astype(np.float64)
    x = rng.normal(size=(200, 3))
    x[:, 0] += 3 * y
    assert roc_auc(y, cross_validated_scores(x, y)) > 0.95
    noise = rng.normal(size=(200, 3))
    assert abs(roc_auc(y, cross_validated_scores(noise, y)) - 0.5) < 0.15
