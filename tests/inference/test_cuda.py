"""CPU and CUDA read a study the same, within tolerance (the issue's "same results").

CI has no GPU, so these tests are skipped there. `bench/cuda_check.sh` runs them on a GPU
machine. `ICH_TEST_DEVICE=cpu` runs them against a second CPU predictor, which checks the
comparison itself (then the two readings must agree exactly).

The CUDA path runs the networks under bfloat16 autocast, which rounds to about 3 significant
digits. The tolerances allow that and no more: 0.03 on a probability, and the same flag unless
the CPU probability lies within that distance of the threshold.
"""

import os

import numpy as np
import pytest
import torch

from inference.constants import CLASSES
from inference.phantom import generate_study, write_study
from inference.predictor import Predictor, default_model_path

MODEL = default_model_path()
DEVICE = os.environ.get("ICH_TEST_DEVICE", "cuda")
PROBABILITY_TOLERANCE = 0.03

pytestmark = [
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device here"
    ),
    pytest.mark.skipif(not MODEL.is_file(), reason=f"no model package at {MODEL}"),
]

CASES = [
    (900001, {"subtypes": ["intraparenchymal"], "size": "large"}),
    (900011, {"subtypes": ["subdural"], "size": "medium"}),
    (900021, {"subtypes": ["epidural", "subarachnoid"], "size": "medium"}),
    (900101, {"subtypes": [], "mimics": True}),
]


@pytest.fixture(scope="module")
def readings(tmp_path_factory: pytest.TempPathFactory) -> list:
    cpu = Predictor.load(MODEL, device="cpu")
    other = Predictor.load(MODEL, device=DEVICE)
    root = tmp_path_factory.mktemp("cuda")
    out = []
    for seed, kwargs in CASES:
        paths = write_study(generate_study(seed, **kwargs), root / str(seed))  # type: ignore[arg-type]
        out.append(
            (
                seed,
                cpu.predict(paths, batch_size=8),
                other.predict(paths, batch_size=32),
                other.predict(paths, batch_size=5),
            )
        )
    return out


def test_study_probabilities_and_flags_agree(readings: list) -> None:
    for seed, cpu, other, _ in readings:
        for name in CLASSES:
            difference = abs(cpu.probabilities[name] - other.probabilities[name])
            assert difference <= PROBABILITY_TOLERANCE, (seed, name, difference)
            margin = abs(cpu.probabilities[name] - cpu.thresholds[name])
            if margin > PROBABILITY_TOLERANCE:
                assert cpu.flags[name] == other.flags[name], (seed, name)


def test_slice_probabilities_and_key_slices_agree(readings: list) -> None:
    for seed, cpu, other, _ in readings:
        assert cpu.slice_probabilities.shape == other.slice_probabilities.shape
        difference = np.abs(cpu.slice_probabilities - other.slice_probabilities).max()
        assert difference <= 2 * PROBABILITY_TOLERANCE, (seed, difference)
        for i, name in enumerate(CLASSES):
            # the same key slice, or one that scores within the tolerance of it on the CPU
            chosen = cpu.slice_probabilities[other.key_slices[name], i]
            assert chosen >= cpu.slice_probabilities[:, i].max() - PROBABILITY_TOLERANCE, (
                seed,
                name,
            )


def test_heatmaps_agree(readings: list) -> None:
    compared = 0
    for seed, cpu, other, _ in readings:
        for name, heatmap in cpu.heatmaps.items():
            if heatmap is None or other.heatmaps.get(name) is None:
                continue
            key = cpu.key_slices[name]
            a = heatmap[key].astype(np.float64).ravel()
            b = other.heatmaps[name][key].astype(np.float64).ravel()
            assert np.corrcoef(a, b)[0, 1] >= 0.95, (seed, name)
            compared += 1
    assert compared, "no flagged finding to compare heatmaps on"


def test_batch_size_does_not_change_the_reading(readings: list) -> None:
    for seed, _, batch_32, batch_5 in readings:
        for name in CLASSES:
            difference = abs(batch_32.probabilities[name] - batch_5.probabilities[name])
            assert difference <= PROBABILITY_TOLERANCE / 3, (seed, name, difference)
