"""The study-level sequence model (`fit_aggregator`) on slice features made up for the test:
the tiny training run uses max-pooling and trains none, so its fit is exercised here."""

import json
from pathlib import Path

import numpy as np
import torch

from inference.constants import CLASSES
from inference.data import Volume
from inference.training import Run, TrainConfig, VolumeFeatures, fit_aggregator

N_SLICES, EMBEDDING = 10, 8


def _studies(n: int, seed: int) -> tuple[list[Volume], list[VolumeFeatures]]:
    """Half the studies positive for every class. The slice logits are noise; only the
    embeddings carry the bleed (channel 0 raised on three neighbouring slices), so pooling the
    logits cannot tell the studies apart and a sequence model over the features can."""
    rng = np.random.default_rng(seed)
    volumes, features = [], []
    for i in range(n):
        positive = i % 2
        embeddings = rng.normal(0.0, 1.0, (1, N_SLICES, EMBEDDING)).astype(np.float32)
        slice_labels = np.zeros((N_SLICES, len(CLASSES)), np.float32)
        if positive:
            start = int(rng.integers(0, N_SLICES - 3))
            embeddings[0, start : start + 3, 0] += 3.0
            slice_labels[start : start + 3] = 1.0
        logits = rng.normal(0.0, 1.0, (1, N_SLICES, len(CLASSES))).astype(np.float32)
        features.append(VolumeFeatures(torch.from_numpy(logits), torch.from_numpy(embeddings)))
        volumes.append(
            Volume(
                key=f"s{seed}-{i}",
                patient_id=f"p{seed}-{i}",
                hu=torch.zeros((N_SLICES, 4, 4), dtype=torch.float16),
                positions_mm=np.arange(N_SLICES, dtype=float) * 5.0,
                slice_labels=slice_labels,
                study_labels=np.full(len(CLASSES), float(positive), np.float32),
                masks=None,
                windowed_source=False,
                source="made-up",
            )
        )
    return volumes, features


def _fit(
    aggregator: str, tmp_path: Path, epochs: int = 8
) -> tuple[torch.nn.Module | None, dict, Path]:
    train_v, train_f = _studies(16, seed=1)
    val_v, val_f = _studies(16, seed=2)
    config = TrainConfig(out_dir=str(tmp_path), aggregator=aggregator, aggregator_epochs=epochs)
    run = Run(tmp_path)
    model, report = fit_aggregator(
        {"train": train_f, "val": val_f},
        {"train": train_v, "val": val_v},
        config,
        run,
        torch.device("cpu"),
    )
    return model, report, run.metrics_path


def test_auto_keeps_the_sequence_model_when_it_beats_max_pooling_on_validation(
    tmp_path: Path,
) -> None:
    model, report, metrics = _fit("auto", tmp_path)
    aucs = report["val_mean_study_auc"]
    assert aucs["gru"] > 0.9 > 0.75 > aucs["max"], aucs  # it learnt what the logits miss
    assert report["chosen"] == "gru" and model is not None
    assert report["compared_on"] == 16 and report["epochs"] >= 1
    assert json.loads(metrics.read_text().splitlines()[-1]) == {"aggregator": report}


def test_max_trains_no_sequence_model(tmp_path: Path) -> None:
    model, report, _ = _fit("max", tmp_path)
    assert model is None
    assert report["chosen"] == "max" and report["epochs"] == 0
    assert set(report["val_mean_study_auc"]) == {"max"}


def test_gru_keeps_the_sequence_model_even_where_max_pooling_would_do(tmp_path: Path) -> None:
    model, report, _ = _fit("gru", tmp_path, epochs=1)
    assert model is not None and report["chosen"] == "gru"
    assert set(report["val_mean_study_auc"]) == {"gru", "max"}
