"""`ich refit-heads`: a linear head over the ensemble's embeddings, fitted on fresh studies and
folded into the members' own heads."""

from pathlib import Path

import numpy as np
import pytest
import torch

from inference.constants import CLASSES
from inference.datasets import pseudonym
from inference.gradcam import _normalise
from inference.heads import (
    AttentionSlices,
    LinearHead,
    attention_hits,
    fit_head,
    fold_into_members,
    fold_weights,
    hit_rates,
    principal_basis,
    within_drop,
)
from inference.metrics import roc_auc
from inference.models import EfficientNetLite
from inference.package import ModelPackage, slice_outputs
from inference.predictor import default_model_path
from inference.preprocess import PreprocessConfig
from tests.inference.shipped import at_half_resolution


def _package(n_members: int = 2) -> ModelPackage:
    torch.manual_seed(0)
    members = [
        EfficientNetLite(v, output_stride=16).eval()
        for v in ("efficientnet_lite0", "efficientnet_lite1")[:n_members]
    ]
    return ModelPackage("t", "1", PreprocessConfig(image_size=64), members, None)


def _random_head(
    package: ModelPackage, generator: torch.Generator, bias_scale: float
) -> LinearHead:
    """A random head over the package's pooled embeddings, drawn from the generator."""
    dim = sum(m.embedding_dim for m in package.members)
    return LinearHead(
        mean=torch.randn(dim, generator=generator),
        scale=torch.rand(dim, generator=generator) + 0.1,
        weight=torch.randn(dim, len(CLASSES), generator=generator) * 0.05,
        bias=torch.randn(len(CLASSES), generator=generator) * bias_scale,
    )


def test_the_folded_head_is_what_the_ensemble_scores_and_explains(tmp_path: Path) -> None:
    package = _package()
    generator = torch.Generator().manual_seed(1)
    head = _random_head(package, generator, bias_scale=3.0)
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


def _attention(maps: list[torch.Tensor], cells: torch.Tensor) -> AttentionSlices:
    bases = [principal_basis(m) for m in maps]
    projected = [m @ b for m, b in zip(maps, bases, strict=True)]
    valid = cells.amax(-1) > 0
    return AttentionSlices(maps, bases, projected, cells, valid, np.zeros(len(cells), dtype=int))


def test_attention_hits_reads_the_peak_of_the_folded_ensembles_grad_cam() -> None:
    package = _package()
    generator = torch.Generator().manual_seed(2)
    head = _random_head(package, generator, bias_scale=1.0)
    fold_into_members(package, head)
    # last-stage maps (B, E, h, w) as forward_features gives them (ReLU6: in [0, 6])
    stages = [
        6 * torch.rand(4, m.embedding_dim, 4, 4, generator=generator) for m in package.members
    ]
    with torch.no_grad():
        # Grad-CAM as the Predictor computes it (before up-sampling): per member ReLU(map - bias)
        # scaled to a peak of 1, averaged over members
        cams = torch.stack(
            [
                _normalise(
                    torch.relu(m.forward_maps(f) - m.fc.bias[None, :, None, None]).flatten(0, 1)
                )
                for m, f in zip(package.members, stages, strict=True)
            ]
        ).mean(0)
    peak = cams.flatten(1).argmax(-1).view(4, len(CLASSES))
    length = cams.shape[-1] * cams.shape[-2]
    on_peak = torch.nn.functional.one_hot(peak, length).float()  # (4, 6, L)
    maps = [f.flatten(2).transpose(1, 2).contiguous() for f in stages]
    # the head over standardised features and the members' own (folded) heads agree
    for weight, scale in ((head.weight, head.scale), fold_weights(package)):
        assert attention_hits(_attention(maps, on_peak), weight, scale).all()
        assert not attention_hits(_attention(maps, 1 - on_peak), weight, scale).any()


def test_the_attention_term_moves_the_evidence_onto_the_bleed() -> None:
    """A context feature (location 10) tells bleed slices from the rest better than the blood
    feature (location 3, where the bleed is outlined): a head fitted for the labels alone puts
    the Grad-CAM peak on the context, the attention term moves it onto the bleed, and the head
    still separates the classes about as well as the blood feature alone can (AUC ~0.88)."""
    rng = np.random.default_rng(3)
    n, length, channels = 400, 16, 4
    label = rng.random(n) < 0.5
    maps = np.abs(rng.normal(0, 0.05, size=(n, length, channels)))
    maps[:, 10, 0] += np.where(label, 2.0, 1.0) + rng.normal(0, 0.1, n)
    maps[:, 3, 1] += np.where(label, 0.5, 0.0) + rng.normal(0, 0.3, n)
    members = [torch.from_numpy(maps).float(), torch.from_numpy(maps[..., ::-1].copy()).float()]
    x = torch.cat([m.mean(1) for m in members], dim=1)
    y = torch.from_numpy(np.repeat(label[:, None], len(CLASSES), axis=1)).float()
    cells = torch.zeros(int(label.sum()), len(CLASSES), length)
    cells[..., 3] = 1
    attention = _attention([m[torch.from_numpy(label)] for m in members], cells)
    plain = fit_head(x, y, 1e-3)
    guided = fit_head(x, y, 1e-3, attention, attention_weight=0.5)
    before = hit_rates(attention_hits(attention, plain.weight, plain.scale), attention.valid)
    after = hit_rates(attention_hits(attention, guided.weight, guided.scale), attention.valid)
    assert max(r for r in before.values() if r is not None) < 0.2
    assert min(r for r in after.values() if r is not None) > 0.9
    scores = guided(x).detach().numpy()
    assert roc_auc(label, scores[:, 0]) > 0.8


def test_principal_basis_keeps_the_maps_energy() -> None:
    generator = torch.Generator().manual_seed(4)
    low_rank = torch.rand(30, 16, 5, generator=generator) @ torch.rand(5, 64, generator=generator)
    basis = principal_basis(low_rank)
    assert basis.shape[1] <= 6
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-4)
    rebuilt = (low_rank @ basis) @ basis.T
    assert torch.linalg.norm(rebuilt - low_rank) / torch.linalg.norm(low_rank) < 0.08


SHIPPED = default_model_path()


@pytest.fixture(scope="module")
def small_shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped package, its ensemble reading at half the resolution (``at_half_resolution``)."""
    package = at_half_resolution(ModelPackage.load(SHIPPED))
    path = tmp_path_factory.mktemp("small-shipped") / "model.pt"
    package.save(path)
    return path


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.is_file(), reason=f"no model package at {SHIPPED}")
def test_ich_refit_heads_writes_a_calibrated_package_and_refuses_seen_studies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], small_shipped: Path
) -> None:
    from inference.cli import main
    from inference.package import READER_SLOTS
    from inference.phantom import write_dataset
    from inference.predictor import Predictor

    fresh = tmp_path / "fresh"
    write_dataset(fresh, 6, seed=77, progress=False, favour=["subdural"])
    out = tmp_path / "out"
    # its strip readers' fusions were fitted on the present heads: refused, nothing read
    refused = ["refit-heads", str(small_shipped), "--data", f"phantom:{fresh}", "--out", str(out)]
    assert main([*refused, "--version", "9.9.9"]) == 2
    assert "has strip readers, fitted on its present heads" in capsys.readouterr().err
    assert not out.exists()
    bare = ModelPackage.load(small_shipped)  # the ensemble as it was before its readers
    bare.thresholds = bare.ensemble_thresholds()
    for slot in READER_SLOTS:
        setattr(bare, slot, None)
    bare.save(tmp_path / "bare.pt")
    assert (
        main(
            [
                "refit-heads",
                str(tmp_path / "bare.pt"),
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
                "--attention-weight",
                "0",
                "--attention-weight",
                "0.5",
                "--attention-slices",
                "4",
                "--l2",  # two of the default three: a fit fewer per fold and weight
                "0.01",
                "--l2",
                "0.1",
            ]
        )
        == 0
    )
    package = ModelPackage.load(out / "model.pt")
    record = package.training["heads_refit"]
    assert package.version == "9.9.9" and record["studies"] == 6
    assert record["from"].endswith(bare.version)
    assert set(record["cross_validated_study_auc"]) == {"0.01", "0.1"}
    # the attention term's slices and the out-of-fold share of Grad-CAM peaks near the bleed
    assert 4 <= record["attention_slices"]["slices"] <= 4 * len(CLASSES)
    rates = record["cross_validated_study_auc"]["0.01"]["attention_near_bleed"]
    assert all(r is None or 0.0 <= r <= 1.0 for r in rates.values())
    # both weights at every L2 were cross-validated; the setting chosen is the best out-of-fold
    # AUC among those whose peaks stay within 0.05 of the members' own heads (or of all of them)
    sweep = record["attention_weight_sweep"]
    assert sorted((e["attention_weight"], e["l2"]) for e in sweep) == [
        (w, l2) for w in (0.0, 0.5) for l2 in (0.01, 0.1)
    ]
    own = record["attention_slices"]["members_own_heads_near_bleed"]
    for e in sweep:
        assert e["attention_within_drop"] == all(
            r >= own[c] - 0.05 for c, r in e["attention_near_bleed"].items() if r is not None
        )
    eligible = [e for e in sweep if e["attention_within_drop"]]
    best = max(eligible or sweep, key=lambda e: e["mean"])
    assert (record["attention_weight"], record["l2_chosen"]) == (
        best["attention_weight"],
        best["l2"],
    )
    assert record["attention_within_drop"] == bool(eligible)
    assert record["cross_validated_study_auc"]["0.01"]["mean"] == next(
        e["mean"]
        for e in sweep
        if e["l2"] == 0.01 and e["attention_weight"] == best["attention_weight"]
    )
    # recorded as pseudonyms: the package names no study
    assert package.training["split"]["heads"] == [
        pseudonym(f"phantom-{77 * 100000 + i}") for i in range(6)
    ]
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
                str(tmp_path / "bare.pt"),
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


def test_within_drop_compares_every_class_with_the_members_own_heads() -> None:
    own = {"any": 0.90, "subdural": 0.78, "epidural": None}
    assert within_drop({"any": 0.86, "subdural": 0.73, "epidural": 0.1}, own, 0.05)
    assert not within_drop({"any": 0.86, "subdural": 0.72, "epidural": 0.9}, own, 0.05)
    assert not within_drop({"any": 0.84, "subdural": None}, own, 0.05)
    assert within_drop({"any": 0.84, "subdural": 0.78}, own, 0.10)


def test_the_model_card_says_how_the_head_was_fitted() -> None:
    from inference.evaluation import _heads_line

    record = {
        "from": "ich-demo 6.0.0",
        "data": ["phantom:a", "phantom:b"],
        "studies": 600,
        "folds": 5,
        "l2_chosen": 0.01,
        "cross_validated_study_auc": {
            "0.01": {"mean": 0.97, "attention_near_bleed": {"any": 0.91, "epidural": None}}
        },
        "members_own_heads_study_auc": {"mean": 0.955},
        "attention_weight": 0.5,
        "attention_slices": {"slices": 330},
    }
    line = _heads_line(record)
    assert "L2 weight 0.01 fixed" in line and "0.970, against 0.955" in line
    assert "localisation term (weight 0.5, on 330 outlined" in line and "any 91%" in line
    assert "chosen from" not in line and "No setting" not in line
    # a weight chosen from several, within the margin, and a fit where no setting kept it
    record |= {
        "attention_weight_sweep": [{"attention_weight": w} for w in (2.0, 0.5)],
        "max_attention_drop": 0.05,
        "attention_within_drop": True,
    }
    assert "weight was chosen from 0.5, 2 by cross-validation" in _heads_line(record)
    record["attention_within_drop"] = False
    line = _heads_line(record)
    assert "No setting (weights 0.5, 2) kept every class's peak" in line
    assert "chosen from" not in line
    record["attention_weight"] = 0.0
    record["cross_validated_study_auc"]["0.1"] = {"mean": 0.96}
    line = _heads_line(record)
    assert "chosen by 5-fold cross-validation" in line and "localisation" not in line
    assert "No setting" in line  # a weight of 0 chosen still says what the explanations lost


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.is_file(), reason=f"no model package at {SHIPPED}")
def test_evaluate_also_scores_a_refitted_package_from_the_same_network_pass(
    tmp_path: Path, small_shipped: Path
) -> None:
    """`ich evaluate MODEL DATA --also REFIT:OUT` writes for REFIT the report its own
    evaluation writes, and refuses a package whose networks differ."""
    import json

    from inference.data import DataSource
    from inference.evaluation import evaluate
    from inference.package import check_same_networks
    from inference.phantom import write_dataset

    data = tmp_path / "data"
    write_dataset(data, 3, seed=78, progress=False)
    shipped = ModelPackage.load(small_shipped)
    refit = ModelPackage.load(small_shipped)
    dim = sum(m.embedding_dim for m in refit.members)
    generator = torch.Generator().manual_seed(5)
    fold_into_members(
        refit,
        LinearHead(
            mean=torch.zeros(dim),
            scale=torch.ones(dim),
            weight=torch.cat([m.fc.weight.T / 2 for m in shipped.members])
            + 0.02 * torch.randn(dim, len(CLASSES), generator=generator),
            bias=shipped.members[0].fc.bias.detach().clone(),
        ),
    )
    refit.version = "9.9.8"
    refit.save(tmp_path / "refit.pt")
    source = DataSource(kind="phantom", path=str(data))
    evaluate(small_shipped, source, tmp_path / "a", bootstrap_rounds=20)
    evaluate(tmp_path / "refit.pt", source, tmp_path / "b", bootstrap_rounds=20)
    evaluate(
        small_shipped,
        source,
        tmp_path / "a2",
        bootstrap_rounds=20,
        also=[(tmp_path / "refit.pt", tmp_path / "b2")],
    )
    for own, shared in (("a", "a2"), ("b", "b2")):
        expected = json.loads((tmp_path / own / "report.json").read_text())
        got = json.loads((tmp_path / shared / "report.json").read_text())
        assert got == expected
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert a["model"] != b["model"]  # two packages, two reports
    assert [s["probabilities"] for s in a["per_item"]] != [
        s["probabilities"] for s in b["per_item"]
    ]

    other = ModelPackage.load(small_shipped)
    with torch.no_grad():
        other.members[1].conv_stem.weight.add_(0.01)
    with pytest.raises(ValueError, match="conv_stem"):
        check_same_networks(shipped, other)
