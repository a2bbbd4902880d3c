"""Parts of `ich train` on made-up inputs, quicker than the tiny training run: the study-level
sequence model (`fit_aggregator`; the tiny run uses max-pooling and trains none) and the
per-epoch slice validation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import inference.training as training
from inference.constants import CLASSES
from inference.data import Volume
from inference.models import build_slice_model
from inference.preprocess import PreprocessConfig
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
    assert aucs["gru"] > 0.9 and aucs["max"] < 0.75, aucs  # it learnt what the logits miss
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


def _grid_volumes(size: int) -> list[Volume]:
    """Three volumes of random Hounsfield units on the model grid; the second has no labelled
    slice, and a few slices of the others are unlabelled."""
    rng = np.random.default_rng(7)
    volumes = []
    for i, n in enumerate((5, 4, 6)):
        labels = rng.integers(0, 2, (n, len(CLASSES))).astype(np.float32)
        labels[0] = np.nan
        if i == 1:
            labels[:] = np.nan
        volumes.append(
            Volume(
                key=f"v{i}",
                patient_id=f"p{i}",
                hu=torch.from_numpy(rng.uniform(-100, 120, (n, size, size))).half(),
                positions_mm=np.arange(n, dtype=float) * 5.0,
                slice_labels=labels,
                study_labels=np.nanmax(labels, 0) if i != 1 else np.full(6, np.nan, np.float32),
                masks=None,
                windowed_source=False,
                source="made-up",
            )
        )
    return volumes


def test_validation_inputs_kept_between_epochs_score_as_computed_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = PreprocessConfig(image_size=64, spacing_mm=4.0)
    volumes = _grid_volumes(64)
    kept = training.kept_validation_inputs(volumes, config)
    assert kept is not None and [len(x) for x, _ in kept] == [4, 5]  # labelled slices only
    torch.manual_seed(0)
    model = build_slice_model("efficientnet_lite0", pretrained=False)
    cpu = torch.device("cpu")
    computed = training.validate_slices(model, training.validation_inputs(volumes, config), cpu)
    again = training.validate_slices(model, kept, cpu)
    assert json.dumps(again, sort_keys=True) == json.dumps(computed, sort_keys=True)  # NaN too

    monkeypatch.setattr(training, "VALIDATION_INPUTS_MAX_BYTES", 8 * 64 * 64 * 3 * 4)
    assert training.kept_validation_inputs(volumes, config) is None  # 9 slices: over the limit


def test_an_unknown_study_level_is_refused_when_the_config_is_read() -> None:
    with pytest.raises(ValueError, match="aggregator is one of auto, gru, max, not 'mean'"):
        TrainConfig.from_dict({"aggregator": "mean"})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"epoch": 3}, "unknown training settings: epoch"),
        (
            {"sources": [{"kind": "phantom", "path": "p", "foo": 1}]},
            "unknown [[sources]] settings: foo",
        ),
        ({"sources": [{"kind": "phantom"}]}, "[[sources]] needs path"),
        ({"augment": {"flip": 0.5}}, "unknown [augment] settings: flip"),
        ({"preprocess": {"size": 128}}, "unknown [preprocess] settings: size"),
        ({"preprocess": 128}, "[preprocess]: a table of settings, not 128"),
    ],
)
def test_a_config_names_the_setting_it_does_not_know(config: dict, message: str) -> None:
    """Every table of a config is checked as the top level is: a misspelt setting is named,
    never silently dropped and never a TypeError from deep inside."""
    with pytest.raises(ValueError) as error:
        TrainConfig.from_dict(config)
    assert message in str(error.value)


def test_a_config_that_is_not_toml_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("epochs = \n")
    with pytest.raises(ValueError, match=r"bad\.toml: not valid TOML \(Invalid value"):
        TrainConfig.from_toml(path)


def test_a_config_reads_the_window_of_its_pictures_as_a_window() -> None:
    config = TrainConfig.from_dict({"preprocess": {"windowed_source": [35, 90]}})
    assert config.preprocess.windowed_source.level == 35
    assert config.preprocess.windowed_source.width == 90
    assert config.preprocess.windowed_source.low == -10


def test_metrics_are_strict_json_and_a_validation_part_without_positives_picks_by_loss(
    tmp_path: Path,
) -> None:
    """A validation part with no positive of a class has no AUC for it: metrics.jsonl says
    null (a bare NaN is not JSON), and where no class has an AUC at all, the best checkpoint
    and early stopping follow the validation loss instead of never improving."""
    nan = float("nan")
    run = Run(tmp_path)
    run.log({"epoch": 1, "val_slice_auc": {"any": nan, "subdural": 0.75}, "val_mean_auc": nan})

    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    line = json.loads(run.metrics_path.read_text(), parse_constant=refuse)
    assert line == {
        "epoch": 1,
        "val_slice_auc": {"any": None, "subdural": 0.75},
        "val_mean_auc": None,
    }
    assert training.selection_score(0.8, 0.3) == (0.8, "val_mean_auc")
    assert training.selection_score(nan, 0.3) == (-0.3, "val_loss")
    assert training.selection_score(nan, 0.2) > training.selection_score(nan, 0.3)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"epochs": 0}, "epochs must be a whole number of at least 1, not 0"),
        ({"batch_size": 0}, "batch_size must be a whole number of at least 1, not 0"),
        ({"samples_per_epoch": -5}, "samples_per_epoch must be a whole number of at least 1"),
        ({"patience": 0}, "patience must be a whole number of at least 1, not 0"),
        ({"aggregator_epochs": 0}, "aggregator_epochs must be at least 1 (0 only with"),
        ({"target_sensitivity": 0}, "target_sensitivity must be above 0 and at most 1, not 0"),
        ({"target_sensitivity": 1.5}, "target_sensitivity must be above 0 and at most 1"),
    ],
)
def test_a_setting_that_would_crash_training_is_refused_when_the_config_is_read(
    setting: dict, message: str
) -> None:
    """batch_size 0 divided by zero at once; aggregator_epochs 0 crashed only after the networks
    had trained (hours on the demo model)."""
    with pytest.raises(ValueError) as error:
        TrainConfig.from_dict(setting)
    assert message in str(error.value)


def test_a_max_pooling_study_level_needs_no_aggregator_epochs() -> None:
    assert TrainConfig.from_dict({"aggregator": "max", "aggregator_epochs": 0}).epochs == 6


def _volume(patient: str, slice_labels: np.ndarray) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(patient_id=patient, slice_labels=slice_labels)


def test_a_patient_given_by_two_sources_cannot_train_in_one_and_validate_in_the_other() -> None:
    labelled = np.zeros((2, 6), np.float32)
    parts = {"train": [_volume("p1", labelled)], "val": [_volume("p2", labelled)], "test": []}
    training._refuse_shared_patients(parts)  # type: ignore[arg-type]
    parts["val"].append(_volume("p1", labelled))
    with pytest.raises(ValueError, match="is in the train and the val parts: two sources"):
        training._refuse_shared_patients(parts)  # type: ignore[arg-type]


def test_a_validation_part_without_slice_labels_is_refused_before_training() -> None:
    unlabelled = np.full((3, 6), np.nan, np.float32)
    with pytest.raises(ValueError, match="no validation study has slice labels"):
        training._need_labelled_validation_slices([_volume("p", unlabelled)])  # type: ignore[list-item]
    training._need_labelled_validation_slices(
        [_volume("p", unlabelled), _volume("q", np.zeros((1, 6), np.float32))]  # type: ignore[list-item]
    )
