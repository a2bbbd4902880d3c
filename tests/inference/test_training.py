"""A tiny training run on a few phantom studies that must really learn, and what it produces."""

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.constants import CLASSES
from inference.data import DataSource
from inference.datasets import read_phantom_dataset
from inference.evaluation import evaluate
from inference.package import ModelPackage, platt
from inference.phantom import write_dataset
from inference.predictor import Predictor
from inference.training import (
    TrainConfig,
    calibrate_and_choose,
    describe_operating_points,
    fit_platt,
    operating_point_record,
    refit_study_level,
    train,
)

# the first test builds the module fixtures (phantoms, tiny training, evaluation)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


# The tiny run's phantoms hold large bleeds only (roughly 45-100 mL; every negative study and
# every mimic as drawn). How this was chosen, and how far smaller bleeds fell short:
# docs/model-analysis.md, "The tiny training test".
TINY_MIN_SIZE = "large"
TINY_SETS = {"train": (80, 11), "test": (48, 22)}  # studies, phantom seed


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # 80 training studies (a validation share of 30% among them) and 48 held-out ones, each set
    # written by two processes at once.
    root = tmp_path_factory.mktemp("phantoms")
    for name, (n, seed) in TINY_SETS.items():
        write_dataset(root / name, n, seed, progress=False, min_size=TINY_MIN_SIZE, workers=2)
    return {name: root / name for name in TINY_SETS}


# The recipe of the tiny run (scripts/tiny_sweep.py varies it).
TINY_RECIPE = {
    "name": "tiny",
    "architectures": ["efficientnet_lite0"],
    "epochs": 8,  # 12 scored 0.94-0.99 over six draws, 8 scored 0.94-0.97 in 2.4 min less
    "samples_per_epoch": 512,
    "batch_size": 16,
    "lr": 1e-3,
    "patience": 6,
    "seed": 3,
    "split": [0.7, 0.3, 0.0],
    "aggregator": "max",  # a sequence model needs more than a dozen studies
    "threads": 1,  # one thread: the same numbers on every run of the same machine kind
    "atlas_per_class": 3,
    "preprocess": {"image_size": 128, "spacing_mm": 2.0},
}


def tiny_config(phantoms: dict[str, Path], out_dir: Path) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            **TINY_RECIPE,
            "out_dir": str(out_dir),
            "sources": [{"kind": "phantom", "path": str(phantoms["train"])}],
        }
    )


@pytest.fixture(scope="module")
def tiny_model(phantoms: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tiny_config(phantoms, tmp_path_factory.mktemp("run")), progress=False)


@pytest.fixture(scope="module")
def held_out(
    tiny_model: Path, phantoms: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict:
    out = tmp_path_factory.mktemp("evaluation")
    source = DataSource("phantom", str(phantoms["test"]))
    return {"report": evaluate(tiny_model, source, out, bootstrap_rounds=50), "out": out}


def test_a_tiny_training_run_really_learns(held_out: dict) -> None:
    report, out = held_out["report"], held_out["out"]
    game = report["pointing_game"]["any"]
    print(  # shown with -rP: the figure docs/model-analysis.md quotes for this machine kind
        f"tiny run, held-out AUC for any: study {report['study_level']['any']['auc']:.4f},"
        f" slice {report['slice_level']['any']['auc']:.4f}; pointing game"
        f" {game['hit_rate']:.3f} (chance {game['chance_rate']:.3f})"
    )
    assert report["study_level"]["any"]["auc"] >= 0.9, report["study_level"]["any"]
    assert report["slice_level"]["any"]["auc"] >= 0.8, report["slice_level"]["any"]
    assert (out / "roc_study.png").stat().st_size > 1000
    card = (out / "MODEL_CARD.md").read_text()
    assert "Triage support, not diagnosis" in card
    assert "| class | threshold | validation sensitivity | validation specificity |" in card


def test_training_writes_checkpoints_metrics_and_a_complete_package(tiny_model: Path) -> None:
    run = tiny_model.parent
    assert (run / "checkpoints" / "efficientnet_lite0-best.pt").exists()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 2
    package = ModelPackage.load(tiny_model)
    assert package.atlas is not None and len(package.atlas.classes) > 0
    assert package.thresholds.shape == (len(CLASSES),)
    assert package.preprocess.image_size == 128
    chosen_on = package.training["operating_points_on_validation"]
    assert [chosen_on[c]["threshold"] for c in CLASSES] == pytest.approx(package.thresholds)
    assert chosen_on["any"]["sensitivity"] >= 0.95  # the default target, met where chosen
    assert '"operating_points_on_validation"' in lines[-1]


def test_ich_atlas_build_rebuilds_the_atlas_from_the_training_split_only(
    tiny_model: Path,
    phantoms: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from inference.cli import main

    base = ["atlas", "build", "--model", str(tiny_model), "--per-class", "3"]
    rebuilt = tmp_path / "rebuilt.pt"
    data = ["--data", f"phantom:{phantoms['train']}", "--data", f"phantom:{phantoms['test']}"]
    assert main([*base, *data, "--out", str(rebuilt)]) == 0
    printed = capsys.readouterr().out
    split = ModelPackage.load(tiny_model).training["split"]
    assert all(k.startswith("sha256:") for keys in split.values() for k in keys)  # no study names
    trained = len(split["train"])
    assert 0 < trained < 80
    assert f"{trained} of 80 items are in the model's training split" in printed
    assert "0 of 48 items" in printed  # the held-out studies never enter the atlas
    original, again = ModelPackage.load(tiny_model).atlas, ModelPackage.load(rebuilt).atlas
    assert original is not None and again is not None
    assert sorted(again.classes.tolist()) == sorted(original.classes.tolist())
    np.testing.assert_allclose(
        np.sort(again.probabilities), np.sort(original.probabilities), rtol=1e-4
    )

    held_out_only = ["--data", f"phantom:{phantoms['test']}", "--out", str(tmp_path / "x.pt")]
    assert main([*base, *held_out_only]) == 2
    assert "none of the --data items is in the model's training split" in capsys.readouterr().err
    assert main([*base, "--data", f"image_folder:{tmp_path}", "--out", str(tmp_path / "y.pt")]) == 2
    assert "needs --labels" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


def test_grad_cam_peaks_fall_on_the_phantom_bleed_more_often_than_chance(held_out: dict) -> None:
    game = held_out["report"]["pointing_game"]["any"]
    assert game["slices"] >= 20, game
    assert 0.0 < game["chance_rate"] < 0.5, game
    assert game["hit_rate"] > 1.5 * game["chance_rate"], game


def test_the_predictor_explains_a_flagged_study(
    tiny_model: Path, phantoms: dict[str, Path]
) -> None:
    predictor = Predictor.load(tiny_model, device="cpu")
    positives = [s for s in read_phantom_dataset(phantoms["test"]) if s.labels[0] == 1]
    for positive in positives:  # the first the tiny model flags (most are; see the AUC test)
        prediction = predictor.predict(positive.paths)
        if prediction.flags["any"]:
            break
    assert prediction.flags["any"], "the tiny model flags none of the held-out bleeds"
    n = len(positive.paths)
    assert prediction.slice_probabilities.shape == (n, 6)
    flagged = {c for c, on in prediction.flags.items() if on}
    assert set(prediction.heatmaps) == flagged  # a heatmap for each flagged class, no other
    for name in flagged:
        heatmap = prediction.heatmaps[name]
        assert heatmap.shape == (n, 512, 512) and heatmap.dtype == np.uint8
        assert heatmap[prediction.key_slices[name]].max() > 0
    assert set(prediction.prediction_basis) == flagged
    atlas = predictor.package.atlas
    assert atlas is not None
    in_atlas = {CLASSES[int(c)] for c in atlas.classes}  # classes it kept slices of
    for name, basis in prediction.prediction_basis.items():
        assert bool(basis) == (name in in_atlas), name
        assert all(entry.labels[name] == 1 for entry in basis), name
        similarities = [entry.similarity for entry in basis]
        assert similarities == sorted(similarities, reverse=True)
    summary = prediction.summary()
    assert [f["class"] for f in summary["findings"]] == list(CLASSES)
    assert {"read", "preprocess", "networks", "aggregate"} <= set(summary["timings_s"])


def test_training_is_reproducible_from_its_seed(phantoms: dict[str, Path], tmp_path: Path) -> None:
    from inference.data import prepare
    from inference.training import Run, train_member

    config = TrainConfig.from_dict(
        {
            "architectures": ["efficientnet_lite0"],
            "epochs": 1,
            "samples_per_epoch": 32,
            "batch_size": 16,
            "seed": 5,
            "preprocess": {"image_size": 64, "spacing_mm": 4.0},
        }
    )
    volumes = prepare(read_phantom_dataset(phantoms["train"])[:3], config.preprocess, "phantom")
    weights = []
    for attempt in range(2):
        model = train_member(
            "efficientnet_lite0",
            volumes,
            volumes,
            config,
            Run(tmp_path / str(attempt)),
            device=torch.device("cpu"),
            progress=False,
        )
        weights.append(model.fc.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_refitting_the_study_level_keeps_the_networks_and_reproduces_the_rest(
    tiny_model: Path, phantoms: dict[str, Path], tmp_path: Path
) -> None:
    refit = ModelPackage.load(refit_study_level(tiny_config(phantoms, tmp_path), tiny_model))
    original = ModelPackage.load(tiny_model)
    for a, b in zip(original.members, refit.members, strict=True):
        for name, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[name]), name
    # The same networks (as saved: float16 weights; training fits the study level on them
    # rounded so too), data, split and seed: the same calibration and operating points, up to
    # the order of float sums. A class the tiny run barely learnt has a Platt slope near the
    # 0.05 bound under which the plain sigmoid is kept, where such a difference can put the two
    # fits either side of it.
    plain = np.array([1.0, 0.0])
    same_kind = (refit.calibration == plain).all(1) == (original.calibration == plain).all(1)
    for fit in (refit.calibration, original.calibration):
        slope = fit[~same_kind, 0]
        assert ((slope == 1.0) | (slope < 0.1)).all(), (refit.calibration, original.calibration)
    np.testing.assert_allclose(
        refit.calibration[same_kind], original.calibration[same_kind], rtol=0.05, atol=0.15
    )
    np.testing.assert_allclose(
        refit.thresholds[same_kind], original.thresholds[same_kind], atol=0.05
    )
    assert same_kind.sum() >= len(CLASSES) - 1, (refit.calibration, original.calibration)
    assert refit.training["split"] == original.training["split"]
    assert refit.training["members_from"].startswith("tiny ")
    other = tiny_config(phantoms, tmp_path / "other")
    other.preprocess.image_size = 96
    with pytest.raises(ValueError, match="other preprocessing"):
        refit_study_level(other, tiny_model)


def test_calibration_and_operating_points_come_from_the_operating_point_sources() -> None:
    """Phantom series the model separates well, and windowed pictures it barely separates: a
    calibration fitted on the mixture is flat, so it must come from the chosen sources only."""
    rng = np.random.default_rng(0)
    phantom_labels = rng.integers(0, 2, (60, len(CLASSES))).astype(float)
    phantom_logits = (phantom_labels * 2 - 1) * 2.5 + rng.normal(0, 1.5, phantom_labels.shape)
    other_labels = rng.integers(0, 2, (60, len(CLASSES))).astype(float)
    other_logits = rng.normal(0, 3, other_labels.shape)
    logits = np.concatenate([phantom_logits, other_logits])
    labels = np.concatenate([phantom_labels, other_labels])
    sources = ["phantom"] * 60 + ["yolo"] * 60

    config = TrainConfig(operating_point_sources=("phantom",))
    calibration, thresholds, record = calibrate_and_choose(logits, labels, sources, config)
    np.testing.assert_allclose(calibration, fit_platt(phantom_logits, phantom_labels))
    mixed = fit_platt(logits, labels)
    assert (calibration[:, 0] > 1.5 * mixed[:, 0]).all()  # the mixture flattens the slope
    probabilities = platt(phantom_logits, calibration)
    flags = probabilities >= thresholds  # as the package flags: a subtype only with "any"
    flags[:, 1:] &= flags[:, :1]
    for i in range(len(CLASSES)):
        positive = phantom_labels[:, i] == 1
        assert (probabilities[positive, i] >= thresholds[i]).mean() >= 0.95
        # the record describes the same thresholds' flags on the same 60 phantom series
        flagged = flags[:, i]
        entry = record[CLASSES[i]]
        assert entry["threshold"] == thresholds[i]
        assert entry["sensitivity"] == flagged[positive].mean()
        assert entry["specificity"] == (~flagged[~positive]).mean()
        assert entry["positives"] + entry["negatives"] == 60

    everything, _, _ = calibrate_and_choose(logits, labels, sources, TrainConfig())
    np.testing.assert_allclose(everything, mixed)
    with pytest.raises(ValueError, match="no validation study from rsna"):
        calibrate_and_choose(
            logits, labels, sources, TrainConfig(operating_point_sources=("rsna",))
        )


def test_an_operating_point_that_flags_most_negative_studies_is_reported_and_warned() -> None:
    """The 352 px candidate reached its validation sensitivity for "any" only with a threshold
    that flagged most negative studies (docs/model-analysis.md): training now says so."""
    labels = np.zeros((10, len(CLASSES)))
    labels[:4] = 1  # four positive, six negative studies for every class
    labels[:, 4] = np.nan  # epidural unknown everywhere: no figures, no warning
    probabilities = np.tile(
        np.array([[0.9], [0.8], [0.7], [0.2], [0.6], [0.5], [0.3], [0.25], [0.05], [0.01]]),
        (1, len(CLASSES)),
    )
    thresholds = np.full(len(CLASSES), 0.2)  # reaches the fourth positive at 0.2
    thresholds[0] = 0.7  # "any" stricter: 3 of 4 positives, no negative flagged
    flags = operating_point_record(probabilities, labels, thresholds)
    assert flags["any"] == {
        "threshold": 0.7,
        "sensitivity": 0.75,
        "specificity": 1.0,
        "positives": 4,
        "negatives": 6,
        "gated_by_any": True,
    }
    # As flags: a subtype needs "any" too, so the fourth positive (any 0.2) is missed and no
    # negative (any at most 0.6) is flagged, whatever its subdural score.
    assert (flags["subdural"]["sensitivity"], flags["subdural"]["specificity"]) == (0.75, 1.0)
    assert not any(line.startswith("WARNING") for line in describe_operating_points(flags))
    # Each class alone (a strip reader's record, whose "any" column is not the package's):
    record = operating_point_record(probabilities, labels, thresholds, gate_by_any=False)
    assert record["subdural"]["gated_by_any"] is False
    assert record["subdural"]["sensitivity"] == 1.0
    assert record["subdural"]["specificity"] == pytest.approx(2 / 6)  # 0.6-0.25 flagged
    assert record["epidural"]["positives"] == 0
    lines = describe_operating_points(record)
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 4  # every class but "any" and the unknown epidural
    assert any("the subdural flag marks 67% of the negative validation" in w for w in warnings)
    assert not any("the any flag" in w or "epidural" in w for w in warnings)
