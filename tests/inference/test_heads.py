"""`ich refit-heads`: a linear head over the ensemble's embeddings, fitted on fresh studies and
folded into the members' own heads."""

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.constants import CLASSES
from inference.heads import LinearHead, fit_head, fold_into_members
from inference.metrics import roc_auc
from inference.models import EfficientNetLite
from inference.package import ModelPackage, slice_outputs
from inference.predictor import default_model_path
from inference.preprocess import PreprocessConfig


def _package(n_members: int = 2) -> ModelPackage:
    torch.manual_seed(0)
    members = [
        EfficientNetLite(v, output_stride=16).eval()
        for v in ("efficientnet_lite0", "efficientnet_lite1")[:n_members]
    ]
    return ModelPackage("t", "1", PreprocessConfig(image_size=64), members, None)


def test_the_folded_head_is_what_the_ensemble_scores_and_explains(tmp_path: Path) -> None:
    package = _package()
    dim = sum(m.embedding_dim for m in package.members)
    generator = torch.Generator().manual_seed(1)
    head = LinearHead(
        mean=torch.randn(dim, generator=generator),
        scale=torch.rand(dim, generator=generator) + 0.1,
        weight=torch.randn(dim, len(CLASSES), generator=generator) * 0.05,
        bias=torch.randn(len(CLASSES), generator=generator) * 3,
    )
    fold_into_members(package, head)
    package.save(tmp_path / "m.pt")
    loaded = ModelPackage.load(tmp_path / "m.pt")
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        out = slice_outputs(loaded.members, x, class_maps=True)
        expected = head(torch.cat(list(out["embeddings"]), dim=-1))
        # the Predictor's slice logit: the members' mean
        assert torch.allclose(out["logits"].mean(0), expected, atol=1e-3, rtol=1e-4)
        # and each member's evidence map still averages to its logit (Grad-CAM's premise)
        assert torch.allclose(out["class_maps"].mean(dim=(-1, -2)), out["logits"], atol=1e-3)
    # the head is saved in float32: the folded bias carries a large standardising offset
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert state["members"][0]["state"]["fc.weight"].dtype == torch.float32
    assert state["members"][0]["state"]["conv_stem.weight"].dtype == torch.float16


def test_fit_head_learns_a_class_from_features_and_ignores_unknown_labels() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(600, 20))
    x = torch.from_numpy(features).float()
    y = torch.full((600, len(CLASSES)), float("nan"))
    y[:, 0] = torch.from_numpy(features[:, 3] + 0.5 * rng.normal(size=600) > 0.8).float()
    y[:400, 3] = (x[:400, 7] < -0.5).float()  # known on two thirds of the slices only
    head = fit_head(x[:400], y[:400], l2=1e-3)
    scores = head(x[400:]).detach().numpy()
    assert roc_auc(y[400:, 0].numpy(), scores[:, 0]) > 0.9
    truth = (x[400:, 7] < -0.5).numpy()
    assert roc_auc(truth, scores[:, 3]) > 0.95
    # a class with no known label keeps a finite head
    assert np.isfinite(scores).all()


SHIPPED = default_model_path()


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.is_file(), reason=f"no model package at {SHIPPED}")
def test_ich_refit_heads_writes_a_calibrated_package_and_refuses_seen_studies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inference.cli import main
    from inference.phantom import write_dataset
    from inference.predictor import Predictor

    fresh = tmp_path / "fresh"
    write_dataset(fresh, 10, seed=77, progress=False, favour=["subdural"])
    out = tmp_path / "out"
    assert (
        main(
            [
                "refit-heads",
                str(SHIPPED),
                "--data",
                f"phantom:{fresh}",
                "--out",
                str(out),
                "--version",
                "9.9.9",
                "--folds",
                "2",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    package = ModelPackage.load(out / "model.pt")
    record = package.training["heads_refit"]
    assert package.version == "9.9.9" and record["studies"] == 10
    assert record["from"].endswith(ModelPackage.load(SHIPPED).version)
    assert set(record["cross_validated_study_auc"]) == {"0.001", "0.01", "0.1"}
    assert package.training["split"]["heads"] == [f"phantom-{77 * 100000 + i}" for i in range(10)]
    assert set(package.training["operating_points_on_validation"]) == set(CLASSES)
    # the new package reads a study, and its slice scores are the refitted head's
    prediction = Predictor(package, torch.device("cpu")).predict(
        sorted((fresh / "phantom-7700000").glob("*.dcm")), heatmaps=False, basis=False
    )
    assert set(prediction.probabilities) == set(CLASSES)

    # studies the model was trained on are refused, with the reason
    seen = tmp_path / "seen"
    write_dataset(seen, 2, seed=1, progress=False)  # seed 1: the shipped model's training set
    capsys.readouterr()
    assert (
        main(
            [
                "refit-heads",
                str(SHIPPED),
                "--data",
                f"phantom:{seen}",
                "--out",
                str(out),
                "--version",
                "9.9.9",
            ]
        )
        == 2
    )
    assert "already used" in capsys.readouterr().err
