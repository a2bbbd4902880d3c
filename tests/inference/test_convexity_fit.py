"""`ich convexity`: the strip network's training, its fusion with the ensemble, and the package
and predictor that carry it."""

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from inference.constants import CLASSES
from inference.convexity import (
    ConvexityNet,
    ConvexityReader,
    StripConfig,
    either_logits,
    strip_features,
)
from inference.convexity_fit import (
    SECTOR,
    StripStore,
    fit_either,
    fit_floored_logistic,
    fit_fusion,
    train_net,
)
from inference.metrics import roc_auc
from inference.models import EfficientNetLite
from inference.package import ModelPackage
from inference.predictor import Predictor
from inference.preprocess import PreprocessConfig
from tests.inference.shipped import at_half_resolution

SUBDURAL, EPIDURAL = CLASSES.index("subdural"), CLASSES.index("epidural")
DEPTH, ANGLES = 32, 96


def _strips(count: int, seed: int) -> tuple[StripStore, np.ndarray]:
    """Brain strips (about 30 HU) of which some carry a long thin band of blood along the
    table (subdural) and some a short deep lens (epidural), at random angles."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(30, 6, (count, DEPTH, ANGLES))
    kinds = rng.integers(0, 3, count)  # 0 none, 1 subdural, 2 epidural
    labels = np.zeros((count, 2, ANGLES), np.float32)
    for i, kind in enumerate(kinds):
        start = int(rng.integers(0, ANGLES))
        length, depth = (48, 3) if kind == 1 else (12, 12)
        cols = (start + np.arange(length)) % ANGLES
        if kind:
            hu[i, :depth, cols] = rng.normal(70, 6, (length, depth))
            labels[i, kind - 1, cols] = 1
    index = torch.arange(count)
    sectors = torch.nn.functional.max_pool1d(torch.from_numpy(labels), SECTOR)
    store = StripStore(torch.from_numpy(hu).to(torch.int16), index, index, sectors)
    return store, kinds


def test_the_strip_network_learns_a_band_from_a_lens() -> None:
    torch.set_num_threads(1)
    train, _ = _strips(400, seed=0)
    net, losses = train_net(train, epochs=3, steps=25, batch=16, width=8, seed=0)
    assert losses[-1] < losses[0]
    held_out, kinds = _strips(120, seed=1)
    from inference.convexity import strip_channels

    with torch.no_grad():
        x = strip_channels(held_out.strips, torch.arange(120), held_out.below, held_out.above)
        scores = torch.sigmoid(net.slice_logits(net(x))).numpy()  # (120, 2)
    assert roc_auc(kinds == 1, scores[:, 0]) >= 0.9
    assert roc_auc(kinds == 2, scores[:, 1]) >= 0.9


def _fit_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((200, len(CLASSES))) < 0.4).astype(np.float64)
    ensemble = rng.normal(0, 1, labels.shape) + 0.8 * labels  # weak everywhere
    strips = np.stack(
        [rng.normal(0, 1, 200) + 3.0 * labels[:, SUBDURAL], rng.normal(0, 1, 200)], axis=1
    )  # informative for subdural, noise for epidural
    return ensemble, strips, labels


def test_fusion_joins_a_class_whose_strips_rank_better_and_leaves_one_they_do_not() -> None:
    ensemble, strips, labels = _fit_data()
    fusion, out_of_fold, record = fit_fusion(ensemble, strips, labels)
    assert record["subdural"]["fused_auc_out_of_fold"] > record["subdural"]["ensemble_auc"] + 0.1
    assert fusion[SUBDURAL, 1] > 0
    assert np.isnan(fusion[EPIDURAL]).all()
    np.testing.assert_array_equal(out_of_fold[:, EPIDURAL], ensemble[:, EPIDURAL])
    assert set(record) == {"any", "subdural", "epidural"}  # the classes with strip evidence
    assert np.isnan(fusion[CLASSES.index("intraparenchymal")]).all()


def test_fusion_leaves_unreadable_studies_out_of_its_fit() -> None:
    ensemble, strips, labels = _fit_data()
    strips[:20] = np.nan
    fusion, out_of_fold, _ = fit_fusion(ensemble, strips, labels)
    np.testing.assert_array_equal(out_of_fold[:20, SUBDURAL], ensemble[:20, SUBDURAL])
    assert not np.isnan(fusion[SUBDURAL]).any()


def _reader(fusion_row: tuple[float, float, float]) -> ConvexityReader:
    torch.manual_seed(0)
    fusion = np.full((len(CLASSES), 3), np.nan)
    fusion[SUBDURAL] = fusion_row
    return ConvexityReader(ConvexityNet(width=4), StripConfig(), fusion)


def _phantom_series(tmp_path: Path):
    from inference.dicom_io import load_series
    from inference.phantom import write_dataset

    write_dataset(tmp_path / "p", 1, seed=5, progress=False, favour=["subdural"])
    return load_series(sorted((tmp_path / "p").glob("*/*.dcm")))


def test_the_predictor_fuses_the_strips_as_the_package_says(tmp_path: Path) -> None:
    series = _phantom_series(tmp_path)
    members = [EfficientNetLite("efficientnet_lite0", output_stride=16).eval()]
    package = ModelPackage("t", "1", PreprocessConfig(image_size=64), members, None)
    package.convexity = _reader((0.5, 2.0, -1.0))
    package.save(tmp_path / "m.pt")
    predictor = Predictor.load(tmp_path / "m.pt", device="cpu")
    assert predictor.package.convexity is not None
    strips = predictor.package.convexity.study_logits(series.hu, series.pixel_spacing_mm)
    assert strips is not None
    ensemble = predictor.ensemble_logits(series)
    prediction = predictor.predict(series, heatmaps=False, basis=False)
    fused = 0.5 * ensemble[SUBDURAL] + 2.0 * strips[0] - 1.0
    assert prediction.probabilities["subdural"] == pytest.approx(1 / (1 + np.exp(-fused)))
    assert prediction.probabilities["epidural"] == pytest.approx(
        1 / (1 + np.exp(-ensemble[EPIDURAL]))
    )
    assert "strips" in prediction.timings
    # A windowed picture has no pixel spacing, so no strips in mm: the ensemble's answer stands.
    picture = dataclasses.replace(series, pixel_spacing_mm=None)
    assert predictor.package.convexity.study_logits(picture.hu, None) is None
    alone = predictor.predict(picture, heatmaps=False, basis=False)
    assert alone.probabilities["subdural"] == pytest.approx(
        1 / (1 + np.exp(-predictor.ensemble_logits(picture)[SUBDURAL]))
    )
    # ... and so do its operating points, not those chosen on the fused scores: the fused class
    # (subdural) goes back to its own, the others keep the package's
    predictor.package.convexity.ensemble_thresholds = np.full(len(CLASSES), -1.0)  # flag all
    predictor.package.thresholds = np.full(len(CLASSES), 2.0)  # flag nothing ...
    predictor.package.thresholds[0] = -1.0  # ... but "any"
    unread = predictor.predict(picture, heatmaps=False, basis=False)
    assert {c for c, f in unread.flags.items() if f} == {"any", "subdural"}
    # the prediction reports the operating points its flags used, not the package's
    assert unread.thresholds["subdural"] == -1.0 and unread.thresholds["epidural"] == 2.0
    summary = {f["class"]: f for f in unread.summary()["findings"]}
    for f in summary.values():
        assert f["flagged"] == (f["probability"] >= f["threshold"] and summary["any"]["flagged"])
    read = predictor.predict(series, heatmaps=False, basis=False)
    assert read.thresholds["subdural"] == 2.0  # the strips were read: the package's own
    flags = predictor.predict(series, heatmaps=False, basis=False).flags
    assert {c for c, f in flags.items() if f} == {"any"}


def test_a_picture_without_bone_is_left_to_the_ensemble() -> None:
    reader = _reader((0.5, 2.0, -1.0))
    brain_window = np.clip(np.random.default_rng(0).normal(30, 20, (3, 128, 128)), 0, 80)
    assert reader.study_logits(brain_window, (0.5, 0.5)) is None
    calibrated = np.arange(len(CLASSES), dtype=np.float64)
    np.testing.assert_array_equal(reader.fuse(calibrated, None), calibrated)


def _shipped_without(tmp_path: Path, *slots: str) -> Path:
    """The shipped package as it was before its later readers joined it (those in ``slots``
    it has, peeled from the last): a first reader that fuses a class may not be replaced under a
    later reader that fuses it too. Each peeled reader's classes get back the operating points
    they had before it. Its ensemble reads at half the resolution (``at_half_resolution``)."""
    from inference.package import READER_SLOTS
    from inference.predictor import default_model_path

    package = ModelPackage.load(default_model_path())
    for slot in [s for s in reversed(READER_SLOTS) if s in slots]:
        if getattr(package, slot) is None:
            continue
        package.thresholds = getattr(package, slot).unread_thresholds(package.thresholds)
        setattr(package, slot, None)
        package.training.pop(slot, None)
        package.training.get("split", {}).pop(slot, None)
    at_half_resolution(package)
    path = tmp_path / f"shipped-without-{'-'.join(slots) or 'none'}.pt"
    package.save(path)
    return path


def _first_reader_only(tmp_path: Path) -> Path:
    return _shipped_without(tmp_path, "sulcal", "crescent", "lens")


@pytest.fixture(scope="module")
def extra_axial_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three phantom studies to train a strip network on and six to fit its fusion on, most
    with subdural or epidural blood; the tests below only read them."""
    from inference.phantom import write_dataset

    root = tmp_path_factory.mktemp("extra-axial")
    write_dataset(root / "train", 3, seed=81, progress=False, favour=["subdural", "epidural"])
    write_dataset(root / "fit", 6, seed=82, progress=False, favour=["subdural", "epidural"])
    return root / "train", root / "fit"


def test_ich_convexity_writes_a_package_that_evaluation_keeps_off_its_studies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra_axial_sets: tuple[Path, Path]
) -> None:
    from inference.cli import main
    from inference.evaluation import _held_out, model_card
    from inference.phantom import write_dataset

    base = _first_reader_only(tmp_path)
    train, fit = extra_axial_sets
    out = tmp_path / "out"
    common = ["--epochs", "1", "--steps", "2", "--batch", "4", "--threads", "1"]
    args = ["convexity", str(base), "--train", f"phantom:{train}"]
    args += ["--fit", f"phantom:{fit}", "--out", str(out), "--version", "9.9.9", *common]
    assert main([*args, "--classes", "subdural,bleed"]) == 2
    assert "the strips read" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "--classes", "subdural,epidural,subarachnoid"]) == 0
    package = ModelPackage.load(out / "model.pt")
    assert package.version == "9.9.9" and package.convexity is not None
    shipped = ModelPackage.load(base)
    # the ensemble's own points: the replaced reader's classes get back those from before it
    own = shipped.thresholds
    if shipped.convexity is not None:
        own = shipped.convexity.unread_thresholds(shipped.thresholds)
    np.testing.assert_array_equal(package.convexity.ensemble_thresholds, own)
    for c in np.flatnonzero(np.isnan(package.convexity.fusion).any(axis=1)):
        assert package.thresholds[c] == own[c], CLASSES[c]  # a class left to the ensemble
    record = package.training["convexity"]
    assert record["train_studies"] == 3 and record["fit_studies"] == 6
    assert record["strip_classes"] == ["subdural", "epidural", "subarachnoid"]
    assert package.convexity.net.classes == ("subdural", "epidural", "subarachnoid")
    assert {"any", "subdural", "epidural"} <= set(record["classes"])
    assert len(package.training["split"]["convexity"]) == 9
    from inference.data import DataSource, read_source

    items = read_source(DataSource(kind="phantom", path=str(fit)))
    predictor = Predictor(package, torch.device("cpu"))
    assert _held_out(items, predictor) == []
    card = model_card(predictor, [])
    assert "Subdural, epidural and subarachnoid blood also read along the inner table" in card

    # The reader is replaced, so its own studies may train the next one; the ensemble's may not.
    used = tmp_path / "used"
    write_dataset(used, 1, seed=1, progress=False)  # phantom-100000: the ensemble trained on it
    again = ["convexity", str(out / "model.pt"), "--train", f"phantom:{train}"]
    again += ["--fit", f"phantom:{used}", "--out", str(tmp_path / "x"), "--version", "1", *common]
    assert main(again) == 2
    error = capsys.readouterr().err
    assert f"{used}: 1 studies were already used" in error and str(train) not in error


def test_a_reader_of_three_classes_keeps_them_and_an_old_one_reads_two() -> None:
    torch.manual_seed(0)
    classes = ("subdural", "epidural", "subarachnoid")
    fusion = np.full((len(CLASSES), 3), np.nan)
    fusion[CLASSES.index("subarachnoid")] = (1.0, 2.0, 0.0)
    reader = ConvexityReader(ConvexityNet(width=4, classes=classes), StripConfig(), fusion)
    again = ConvexityReader.from_state(reader.to_state())
    assert again.net.classes == classes
    old = reader.to_state()
    del old["classes"]  # packages before the reader could read other classes
    old["state"] = ConvexityNet(width=4).state_dict()
    assert ConvexityReader.from_state(old).net.classes == ("subdural", "epidural")
    # each class reads its own column, "any" the strongest of the three
    evidence = strip_features(np.array([[0.5, -1.0, 2.0]]), classes)[0]
    assert evidence[CLASSES.index("subarachnoid")] == 2.0
    assert evidence[CLASSES.index("any")] == 2.0
    assert evidence[CLASSES.index("epidural")] == -1.0
    assert np.isnan(evidence[CLASSES.index("intraventricular")])
    fused = again.fuse(np.zeros(len(CLASSES)), np.array([0.5, -1.0, 2.0]))
    assert fused[CLASSES.index("subarachnoid")] == pytest.approx(4.0)
    assert fused[CLASSES.index("subdural")] == 0.0  # not fused in this reader


def test_fusion_of_a_third_class_reads_its_column() -> None:
    ensemble, strips, labels = _fit_data()
    sah = CLASSES.index("subarachnoid")
    rng = np.random.default_rng(3)
    sulcal = rng.normal(0, 1, len(labels)) + 3.0 * labels[:, sah]
    classes = ("subdural", "epidural", "subarachnoid")
    fusion, _, record = fit_fusion(
        ensemble, np.column_stack([strips, sulcal]), labels, classes=classes
    )
    assert set(record) == {"any", *classes}
    assert record["subarachnoid"]["fused_auc_out_of_fold"] > record["subarachnoid"]["ensemble_auc"]
    assert fusion[sah, 1] > 0


def test_fusion_limited_to_chosen_classes_leaves_the_others() -> None:
    ensemble, strips, labels = _fit_data()
    fusion, out_of_fold, record = fit_fusion(ensemble, strips, labels, fuse=("epidural",))
    assert set(record) <= {"epidural"}
    assert np.isnan(fusion[SUBDURAL]).all() and np.isnan(fusion[0]).all()  # not asked: left
    np.testing.assert_array_equal(out_of_fold[:, SUBDURAL], ensemble[:, SUBDURAL])


def test_a_sulcal_reader_joins_after_the_first_and_moves_only_its_class(tmp_path: Path) -> None:
    series = _phantom_series(tmp_path)
    sah = CLASSES.index("subarachnoid")
    members = [EfficientNetLite("efficientnet_lite0", output_stride=16).eval()]
    package = ModelPackage("t", "1", PreprocessConfig(image_size=64), members, None)
    package.convexity = _reader((0.5, 2.0, -1.0))
    predictor = Predictor(package, torch.device("cpu"))
    first = predictor.predict(series, heatmaps=False, basis=False)
    torch.manual_seed(1)
    fusion = np.full((len(CLASSES), 3), np.nan)
    fusion[sah] = (0.8, 1.5, 0.25)
    sulcal = ConvexityReader(
        ConvexityNet(width=4, classes=("subarachnoid",)), StripConfig(), fusion
    )
    sulcal.ensemble_thresholds = package.thresholds.copy()
    package.sulcal = sulcal
    package.thresholds[sah] = 0.7
    package.save(tmp_path / "m.pt")
    predictor = Predictor.load(tmp_path / "m.pt", device="cpu")
    assert [r.net.classes for r in predictor.package.readers()] == [
        ("subdural", "epidural"),
        ("subarachnoid",),
    ]
    both = predictor.predict(series, heatmaps=False, basis=False)
    strip = predictor.package.sulcal.study_logits(series.hu, series.pixel_spacing_mm)
    assert strip is not None and strip.shape == (1,)
    before = np.log(first.probabilities["subarachnoid"] / (1 - first.probabilities["subarachnoid"]))
    fused = 0.8 * before + 1.5 * strip[0] + 0.25
    assert both.probabilities["subarachnoid"] == pytest.approx(1 / (1 + np.exp(-fused)))
    for name in CLASSES:  # the first reader's classes and the rest keep their scores
        if name != "subarachnoid":
            assert both.probabilities[name] == pytest.approx(first.probabilities[name]), name
    assert both.thresholds["subarachnoid"] == pytest.approx(0.7)
    # A series neither reader can read: each reader's classes go back to their own points.
    picture = dataclasses.replace(series, pixel_spacing_mm=None)
    predictor.package.thresholds = np.full(len(CLASSES), 2.0)  # flag nothing ...
    predictor.package.thresholds[0] = -1.0  # ... but "any", which neither reader fuses here
    predictor.package.convexity.ensemble_thresholds = np.full(len(CLASSES), -1.0)
    predictor.package.sulcal.ensemble_thresholds = np.full(len(CLASSES), -1.0)
    flags = predictor.predict(picture, heatmaps=False, basis=False).flags
    assert {c for c, f in flags.items() if f} == {"any", "subdural", "subarachnoid"}


def test_a_lens_reader_joins_fourth_for_epidural_and_refuses_a_class_another_fuses(
    tmp_path: Path,
) -> None:
    from inference.convexity_fit import check_slot
    from inference.evaluation import _training_stages

    series = _phantom_series(tmp_path)
    members = [EfficientNetLite("efficientnet_lite0", output_stride=16).eval()]
    package = ModelPackage("t", "1", PreprocessConfig(image_size=64), members, None)
    package.convexity = _reader((0.5, 2.0, -1.0))  # subdural
    first = Predictor(package, torch.device("cpu")).predict(series, heatmaps=False, basis=False)
    check_slot(package, "lens", ("epidural",), ("epidural",))  # no other reader fuses it
    with pytest.raises(ValueError, match="subdural already joins the convexity reader"):
        check_slot(package, "lens", ("subdural",), ("subdural", "epidural"))
    torch.manual_seed(2)
    fusion = np.full((len(CLASSES), 3), np.nan)
    fusion[EPIDURAL] = (-0.1, 0.7, -2.5)
    package.lens = ConvexityReader(
        ConvexityNet(width=4, classes=("epidural",)), StripConfig(), fusion
    )
    package.save(tmp_path / "m.pt")
    predictor = Predictor.load(tmp_path / "m.pt", device="cpu")
    assert predictor.package.lens is not None
    assert [r.net.classes for r in predictor.package.readers()] == [
        ("subdural", "epidural"),
        ("epidural",),
    ]
    both = predictor.predict(series, heatmaps=False, basis=False)
    strip = predictor.package.lens.study_logits(series.hu, series.pixel_spacing_mm)
    assert strip is not None and strip.shape == (1,)
    before = predictor.ensemble_logits(series)[EPIDURAL]
    fused = -0.1 * before + 0.7 * strip[0] - 2.5
    assert both.probabilities["epidural"] == pytest.approx(1 / (1 + np.exp(-fused)))
    for name in CLASSES:  # every other class keeps its score
        if name != "epidural":
            assert both.probabilities[name] == pytest.approx(first.probabilities[name]), name
    record = {
        "from": "ich-demo 6.10.0-a",
        "strip_classes": ["epidural"],
        "fuse_only": ["epidural"],
        "train_studies": 600,
        "fit_studies": 240,
        "classes": {"epidural": {"ensemble_auc": 0.917, "fused_auc_out_of_fold": 0.957}},
        "fused": ["epidural"],
    }
    lines = _training_stages({"sulcal": record, "crescent": record, "lens": record})
    assert lines[-1].startswith("- A fourth strip network (`ich convexity --reader lens`")


def test_ich_convexity_adds_a_sulcal_reader_and_refuses_what_would_move_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inference.cli import main
    from inference.evaluation import _held_out
    from inference.phantom import write_dataset

    base = _shipped_without(tmp_path)  # every reader it has
    shipped = ModelPackage.load(base)
    train, fit = tmp_path / "train", tmp_path / "fit"
    write_dataset(train, 3, seed=83, progress=False, favour=["subarachnoid"])
    write_dataset(fit, 6, seed=84, progress=False, favour=["subarachnoid"])
    out = tmp_path / "out"
    common = ["--epochs", "1", "--steps", "2", "--batch", "4", "--threads", "1"]
    args = ["convexity", str(base), "--train", f"phantom:{train}"]
    args += ["--fit", f"phantom:{fit}", "--out", str(out), "--version", "9.9.9", *common]
    args += ["--reader", "sulcal", "--classes", "subarachnoid"]
    if shipped.convexity is not None and shipped.convexity.fused_classes().size:
        assert main([*args, "--fuse", "subarachnoid,any"]) == 2  # "any" is the first reader's
        assert "already joins the convexity reader's evidence" in capsys.readouterr().err
        assert not out.exists()
    if shipped.sulcal is not None and shipped.sulcal.fused_classes().size:
        # a first reader under the shipped sulcal one may not fuse subarachnoid too
        first = ["convexity", str(base), "--train", f"phantom:{train}"]
        first += ["--fit", f"phantom:{fit}", "--out", str(out), "--version", "9.9.9", *common]
        assert main([*first, "--classes", "subdural,epidural,subarachnoid"]) == 2
        assert "joins the sulcal reader's evidence" in capsys.readouterr().err
        assert not out.exists()
    assert main(args) == 0
    package = ModelPackage.load(out / "model.pt")
    assert package.version == "9.9.9" and package.sulcal is not None
    assert package.sulcal.net.classes == ("subarachnoid",)
    # the first reader is the shipped one, untouched, and so are the other classes' points
    assert package.convexity is not None and shipped.convexity is not None
    np.testing.assert_array_equal(package.convexity.fusion, shipped.convexity.fusion)
    for c, name in enumerate(CLASSES):
        if name != "subarachnoid":
            assert package.thresholds[c] == shipped.thresholds[c], name
    fused = {CLASSES[c] for c in package.sulcal.fused_classes()}
    assert fused <= {"subarachnoid"}
    # its fallback: subarachnoid's point from before any sulcal reader, the others' as they are
    before = shipped.thresholds if shipped.sulcal is None else shipped.sulcal.ensemble_thresholds
    sah = CLASSES.index("subarachnoid")
    others = [c for c in range(len(CLASSES)) if c != sah]
    assert package.sulcal.ensemble_thresholds[sah] == before[sah]
    np.testing.assert_array_equal(
        package.sulcal.ensemble_thresholds[others], package.thresholds[others]
    )
    record = package.training["sulcal"]
    assert record["fuse_only"] == ["subarachnoid"] and record["strip_classes"] == ["subarachnoid"]
    assert len(package.training["split"]["sulcal"]) == 9
    from inference.data import DataSource, read_source

    predictor = Predictor(package, torch.device("cpu"))
    assert _held_out(read_source(DataSource(kind="phantom", path=str(fit))), predictor) == []
    # The first reader can be replaced under the second only by one that fuses other classes;
    # then the second reader, its class and its fallback for that class stay as they were.
    again = ["convexity", str(out / "model.pt"), "--train", f"phantom:{train}"]
    again += ["--fit", f"phantom:{fit}", "--out", str(tmp_path / "x"), "--version", "1", *common]
    # a shipped crescent reader keeps subdural, so the first reader may not fuse it
    crescent = set() if shipped.crescent is None else set(shipped.crescent.fused_classes())
    if CLASSES.index("subdural") in crescent:
        assert main([*again, "--seed", "1"]) == 2
        assert "subdural already joins the crescent reader's evidence" in capsys.readouterr().err
        again += ["--fuse", "any,epidural"]
    assert main([*again, "--seed", "1"]) == 0
    replaced = ModelPackage.load(tmp_path / "x" / "model.pt")
    assert replaced.convexity is not None and replaced.sulcal is not None
    assert replaced.training["convexity"]["net"]["seed"] == 1
    np.testing.assert_array_equal(replaced.sulcal.fusion, package.sulcal.fusion)
    theirs = package.sulcal.net.state_dict()
    for key, mine in replaced.sulcal.net.state_dict().items():
        torch.testing.assert_close(mine, theirs[key], rtol=0, atol=0)
    assert replaced.thresholds[sah] == package.thresholds[sah]
    fallback = replaced.sulcal.ensemble_thresholds
    assert fallback[sah] == package.sulcal.ensemble_thresholds[sah]
    np.testing.assert_array_equal(fallback[others], replaced.thresholds[others])
    first = {CLASSES[c] for c in replaced.convexity.fused_classes()}
    assert "subarachnoid" not in first
    third = {CLASSES[c] for c in crescent}
    for c in crescent:  # the crescent reader's class keeps its point
        assert replaced.thresholds[c] == package.thresholds[c], CLASSES[c]
    # a class no reader fuses now has the point it had before the replaced first reader fused it
    restored = package.convexity.unread_thresholds(package.thresholds)
    for c, name in enumerate(CLASSES):
        if name not in first | fused | third:
            assert replaced.thresholds[c] == restored[c], name


def test_fusion_limited_to_some_classes_fits_them_as_the_full_fit_does() -> None:
    """Each class's fusion is fitted on its own: limiting the classes (`--fuse`) leaves the
    others' rows and out-of-fold scores exactly as a fit of every class gives them."""
    ensemble, strips, labels = _fit_data()
    full, full_oof, _ = fit_fusion(ensemble, strips, labels)
    assert not np.isnan(full[SUBDURAL]).any()
    for fuse in (("any", "epidural"), ("subdural",)):
        part, oof, _ = fit_fusion(ensemble, strips, labels, fuse=fuse)
        for c in (CLASSES.index(name) for name in fuse):
            np.testing.assert_array_equal(part[c], full[c])
            np.testing.assert_array_equal(oof[:, c], full_oof[:, c])


def test_fusion_folds_keep_a_patients_studies_together() -> None:
    from inference.convexity_fit import _folds

    plain = _folds(12, 5, seed=3)
    np.testing.assert_array_equal(_folds(12, 5, 3, [f"p{i}" for i in range(12)]), plain)
    grouped = _folds(12, 5, 3, ["a", "b", "a", "c", "b", "d", "e", "a", "f", "g", "h", "i"])
    assert grouped[0] == grouped[2] == grouped[7] and grouped[1] == grouped[4]
    assert len(set(grouped)) == 5


def test_fusion_refuses_scores_that_are_not_finite() -> None:
    ensemble, strips, labels = _fit_data()
    broken = ensemble.copy()
    broken[3, SUBDURAL] = np.nan
    with pytest.raises(ValueError, match=r"not finite for fit studies \[3\]"):
        fit_fusion(broken, strips, labels)
    infinite = strips.copy()
    infinite[5, 0] = np.inf
    with pytest.raises(ValueError, match=r"infinite for fit studies \[5\]"):
        fit_fusion(ensemble, infinite, labels)


def test_a_network_taken_from_a_reader_splits_it_into_two_that_score_as_it_did(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra_axial_sets: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--net-from`: a trained strip network is fused again without training. The first
    reader refitted with its own network for "any" and epidural, and the same network added as
    a crescent reader for subdural, score every study as the one reader did. (Whether the tiny
    network here earns a fusion on six studies is up to the data; that each class's fusion is
    fitted alone is `test_fusion_limited_to_some_classes_fits_them_as_the_full_fit_does`.)"""
    from inference.cli import main
    from inference.data import DataSource, read_source
    from inference.dicom_io import load_series
    from inference.predictor import default_model_path

    train, fit = extra_axial_sets  # their ensemble embeddings are cached by the test above
    # On six fit studies the ensemble ranks as well as any fusion could, so a fusion would
    # never be kept and every row compared below would be NaN: here each is kept, as fitted.
    monkeypatch.setattr("inference.convexity_fit.KEEP_ONLY_BETTER", False)
    training = ["--epochs", "1", "--steps", "2", "--batch", "4"]
    fits = ["--fit", f"phantom:{fit}", "--threads", "1"]
    # the shipped package before any crescent reader, its first reader trained again
    one = tmp_path / "one" / "model.pt"
    shipped_base = _shipped_without(tmp_path, "crescent", "lens")
    assert main(["convexity", str(shipped_base), "--train", f"phantom:{train}", *fits,
                 *training, "--out", str(one.parent), "--version", "1"]) == 0  # fmt: skip
    original = ModelPackage.load(one)
    assert original.convexity is not None
    assert original.training["convexity"]["net"]["epochs"] == 1  # given
    assert original.training["convexity"]["net"]["width"] == 16  # train_net's default
    fused = {CLASSES[c] for c in original.convexity.fused_classes()}
    assert fused == {"any", "subdural", "epidural"}
    base = ["convexity", str(one), *fits, "--version", "2"]
    bad = tmp_path / "bad"
    # a package whose reader trained on a study of the ensemble, one whose training sets are
    # gone, and one whose training set no longer holds what it trained on
    shipped_split = ModelPackage.load(default_model_path()).training["split"]["train"]
    tampered = {}
    trained_on = original.training["convexity"]["net_trained_on"]
    for name, change in (
        ("ensemble", {"net_trained_on": [*trained_on, shipped_split[0]]}),
        ("gone", {"data": {"train": [f"phantom:{tmp_path / 'nowhere'}"]}}),
        ("changed", {"data": {"train": [f"phantom:{fit}"]}}),
    ):
        package = ModelPackage.load(one)
        package.training["convexity"] = {**package.training["convexity"], **change}
        if name != "ensemble":
            del package.training["convexity"]["net_trained_on"]  # as before 6.9.0
        package.save(tmp_path / f"{name}.pt")
        tampered[name] = f"{tmp_path / name}.pt:convexity"
    for extra, error in (
        (["--train", f"phantom:{train}", "--net-from", f"{one}:convexity"], "or --net-from"),
        (["--net-from", f"{one}:sulcus"], "expected PACKAGE:SLOT"),
        (
            ["--net-from", f"{one}:convexity", "--fuse", "subarachnoid"],
            "--fuse subarachnoid: the strip network reads subdural, epidural",
        ),
        (
            ["--net-from", f"{one}:convexity", "--fit", f"phantom:{fit}"],
            "a fit study is given twice",
        ),
        (["--net-from", f"{one}:crescent"], "has no crescent reader"),
        (["--net-from", f"{one}:convexity", "--classes", "subdural"], "not subdural"),
        (["--net-from", f"{one}:convexity", "--epochs", "2"], "--epochs would train one"),
        (["--net-from", tampered["ensemble"]], "trained on 1 studies of"),
        (["--net-from", tampered["gone"]], "are not here"),
        (["--net-from", tampered["changed"]], "no longer hold the 3 studies"),
        # its fit studies may not be studies the network trained on
        (
            ["--net-from", f"{one}:convexity", "--fit", f"phantom:{train}"],
            "the strip network trains",
        ),
    ):
        assert main([*base, *extra, "--out", str(bad)]) == 2, extra
        assert error in capsys.readouterr().err, extra
    assert not bad.exists()
    # the same network, whichever order its classes are named in
    swapped = ["--net-from", f"{one}:convexity", "--classes", "epidural,subdural", "--fuse", "any"]
    assert main([*base, *swapped, "--out", str(tmp_path / "swapped")]) == 0

    first = tmp_path / "first" / "model.pt"
    keep = ["--net-from", f"{one}:convexity", "--fuse", "any,epidural", "--out", str(first.parent)]
    assert main([*base, *keep]) == 0
    refitted = ModelPackage.load(first)
    assert refitted.convexity is not None
    for key, mine in refitted.convexity.net.state_dict().items():
        torch.testing.assert_close(mine, original.convexity.net.state_dict()[key], rtol=0, atol=0)
    sdh = CLASSES.index("subdural")
    kept = [c for c in range(len(CLASSES)) if c != sdh]
    np.testing.assert_array_equal(refitted.convexity.fusion[kept], original.convexity.fusion[kept])
    np.testing.assert_array_equal(refitted.thresholds[kept], original.thresholds[kept])
    assert np.isnan(refitted.convexity.fusion[sdh]).all()
    assert refitted.thresholds[sdh] == original.convexity.ensemble_thresholds[sdh]
    record = refitted.training["convexity"]
    assert record["train_studies"] == 3 and record["fit_seed"] == 0
    assert record["net"]["taken_from"] == "ich-demo 1, convexity reader"
    assert (
        record["net"]["loss_per_epoch"] == original.training["convexity"]["net"]["loss_per_epoch"]
    )
    assert len(record["net_trained_on"]) == 3
    # subdural's restored point: what it did on validation is what it did before `one` fused it
    before = original.training["convexity"]["operating_points_before"]
    chosen = refitted.training["operating_points_on_validation"]
    if "subdural" in fused:
        assert chosen.get("subdural") == before.get("subdural")

    two = tmp_path / "two" / "model.pt"
    crescent = ["convexity", str(first), *fits, "--version", "3", "--reader", "crescent"]
    crescent += ["--net-from", f"{one}:convexity", "--out", str(two.parent)]
    shipped = ModelPackage.load(shipped_base)
    if shipped.convexity is not None and sdh in shipped.convexity.fused_classes():
        # under a first reader that fuses subdural, a crescent reader may not fuse it too
        taken = ["--net-from", f"{one}:convexity", "--fuse", "subdural", "--out", str(bad)]
        assert main(["convexity", str(shipped_base), *fits, "--version", "3",
                     "--reader", "crescent", *taken]) == 2  # fmt: skip
        assert "subdural already joins the convexity reader's evidence" in capsys.readouterr().err
        assert not bad.exists()
    assert main([*crescent, "--fuse", "subdural"]) == 0
    split = ModelPackage.load(two)
    assert split.crescent is not None and split.sulcal is not None
    assert [r.net.classes for r in split.readers()][2] == ("subdural", "epidural")
    np.testing.assert_array_equal(split.crescent.fusion[sdh], original.convexity.fusion[sdh])
    np.testing.assert_array_equal(split.thresholds, original.thresholds)
    assert {CLASSES[c] for c in split.crescent.fused_classes()} == fused & {"subdural"}
    assert len(split.training["split"]["crescent"]) == 9
    assert split.training["crescent"]["net"]["taken_from"] == "ich-demo 1, convexity reader"
    # the network of a reader that was itself taken knows what it trained on
    chained = ["--net-from", f"{two}:crescent", "--fuse", "any", "--fit", f"phantom:{train}"]
    assert main([*base, *chained, "--out", str(bad)]) == 2
    assert "studies the strip network trains on" in capsys.readouterr().err

    (item,) = read_source(DataSource(kind="phantom", path=str(fit)))[:1]
    series = load_series(item.paths)
    picture = dataclasses.replace(series, pixel_spacing_mm=None)  # no reader reads it
    for seen in (series, picture):
        before = Predictor(original, torch.device("cpu")).predict(seen, heatmaps=False, basis=False)
        after = Predictor(split, torch.device("cpu")).predict(seen, heatmaps=False, basis=False)
        for name in CLASSES:
            assert after.probabilities[name] == pytest.approx(before.probabilities[name]), name
        assert after.flags == before.flags


def test_the_model_card_says_what_the_sulcal_reader_joined() -> None:
    from inference.evaluation import _training_stages

    record = {
        "from": "ich-demo 6.5.0",
        "strip_classes": ["subarachnoid"],
        "fuse_only": ["subarachnoid"],
        "train_studies": 900,
        "fit_studies": 240,
        "classes": {"subarachnoid": {"ensemble_auc": 0.93, "fused_auc_out_of_fold": 0.96}},
        "fused": ["subarachnoid"],
    }
    (line,) = _training_stages({"sulcal": record})
    assert "joins only subarachnoid" in line and "subarachnoid 0.930 to 0.960" in line


def test_the_model_card_names_a_third_reader_and_where_its_network_came_from() -> None:
    from inference.evaluation import _training_stages

    def record(classes: list[str], fused: str, **net: str) -> dict:
        return {
            "from": "ich-demo 6.7.0",
            "strip_classes": classes,
            "fuse_only": [fused],
            "train_studies": 900,
            "fit_studies": 240,
            "classes": {fused: {"ensemble_auc": 0.82, "fused_auc_out_of_fold": 0.97}},
            "fused": [fused],
            "net": net,
        }

    sulcal = record(["subarachnoid"], "subarachnoid")
    crescent = record(["subdural", "epidural"], "subdural", taken_from="ich-demo 6.8.0, x reader")
    second, third = _training_stages({"sulcal": sulcal, "crescent": crescent})
    assert second.startswith("- A second strip network (`ich convexity --reader sulcal`")
    assert third.startswith("- A third strip network (`ich convexity --reader crescent`")
    assert "taken unchanged from ich-demo 6.8.0, x reader" in third
    assert "joins only subdural" in third and "subdural 0.820 to 0.970" in third
    (only,) = _training_stages({"crescent": crescent})
    assert only.startswith("- A second strip network")


def test_a_slice_reaches_its_threshold_exactly_where_it_alone_would_make_the_ensemble_flag(
    tmp_path: Path,
) -> None:
    """Slice-level sensitivity and specificity use the saved operating points carried to one
    slice: the ensemble's own threshold of each class (a strip reader's fused class goes back to
    the threshold it had before the reader joined), through the calibration, onto the
    predictor's slice probabilities. The study logit is the maximum over slices, so a study
    is flagged by the ensemble exactly when one of its slices reaches the slice threshold."""
    series = _phantom_series(tmp_path)
    torch.manual_seed(3)
    members = [EfficientNetLite("efficientnet_lite0", output_stride=16).eval()]
    package = ModelPackage("t", "1", PreprocessConfig(image_size=64), members, None)
    package.calibration = np.array(
        [[1.7, -0.4], [2.1, 0.3], [0.8, -1.0], [1.2, 0.5], [2.5, -2.0], [1.0, 0.0]]
    )
    predictor = Predictor(package, torch.device("cpu"))
    study = predictor.ensemble_logits(series)  # calibrated, the ensemble alone
    slices = predictor.predict(series, heatmaps=False, basis=False).slice_probabilities
    sign = np.array([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0])
    for side in (sign, -sign):  # each class's threshold just under, then just over the study
        ensemble = 1 / (1 + np.exp(-(study + 0.01 * side)))
        package.thresholds = ensemble.copy()
        package.convexity = None
        carried = package.slice_thresholds()
        assert carried is not None
        assert ((slices >= carried).any(0) == (side < 0)).all()
        # a reader fusing subdural moves the package's subdural threshold, not the slices'
        package.convexity = _reader((0.5, 2.0, -1.0))
        package.convexity.ensemble_thresholds = ensemble.copy()
        package.thresholds[SUBDURAL] = 0.999
        assert np.array_equal(package.ensemble_thresholds(), ensemble)
        assert np.allclose(package.slice_thresholds(), carried)  # type: ignore[arg-type]
    package.calibration[EPIDURAL, 0] = -1.0  # a falling calibration: no slice threshold
    assert package.slice_thresholds() is None


def _sah_fusion(
    ensemble: np.ndarray, sulcal: np.ndarray, labels: np.ndarray, **options: Any
) -> tuple[np.ndarray, np.ndarray, dict]:
    """fit_fusion of a sulcal reader's (S,) evidence, fused for subarachnoid only."""
    classes = ("subarachnoid",)
    return fit_fusion(ensemble, sulcal[:, None], labels, classes=classes, fuse=classes, **options)


def test_a_cross_class_fusion_explains_away_another_bleed() -> None:
    """The strips mistake epidural blood for sulcal blood: with the ensemble's epidural logit
    beside them (``own``), the fusion learns to subtract it and ranks subarachnoid better out of
    fold than the fusion of its own class alone."""
    rng = np.random.default_rng(0)
    count, sah, edh = 400, CLASSES.index("subarachnoid"), CLASSES.index("epidural")
    labels = (rng.random((count, len(CLASSES))) < 0.3).astype(np.float64)
    own = rng.normal(0, 1, labels.shape) + labels  # the ensemble's own logits: weak, ...
    own[:, edh] += 2.0 * labels[:, edh]  # ... but it knows an epidural when it sees one
    sulcal = rng.normal(0, 1, count) + 2.0 * labels[:, sah] + 2.0 * labels[:, edh]
    _, plain_oof, plain_record = _sah_fusion(own, sulcal, labels)
    fusion, oof, record = _sah_fusion(own, sulcal, labels, own=own)
    assert "cross_weights" not in plain_record["subarachnoid"]
    weights = record["subarachnoid"]["cross_weights"]
    assert set(weights) == set(CLASSES) - {"subarachnoid"}
    assert weights["epidural"] < -0.5  # epidural evidence lowers the score
    assert max(abs(w) for c, w in weights.items() if c != "epidural") < 0.5
    assert roc_auc(labels[:, sah], oof[:, sah]) > roc_auc(labels[:, sah], plain_oof[:, sah]) + 0.02
    # the weights fitted on every study reproduce the fused logit
    reader = ConvexityReader(
        ConvexityNet(width=4, classes=("subarachnoid",)),
        StripConfig(),
        fusion,
        cross=np.zeros((len(CLASSES), len(CLASSES))),
    )
    for name, weight in weights.items():
        reader.cross[sah, CLASSES.index(name)] = weight  # type: ignore[index]
    study = reader.fuse(own[7], np.array([sulcal[7]]), own[7])
    w_own, w_strips, bias = fusion[sah]
    expected = w_own * own[7, sah] + w_strips * sulcal[7] + bias
    expected += sum(w * own[7, CLASSES.index(c)] for c, w in weights.items())
    assert study[sah] == pytest.approx(expected)
    np.testing.assert_array_equal(np.delete(study, sah), np.delete(own[7], sah))


def test_a_cross_class_reader_reads_the_ensembles_own_logits_after_another_reader(
    tmp_path: Path,
) -> None:
    """In the predictor a cross-class fusion reads the ensemble's logits from before any
    reader joined (the first reader's fused epidural is not what it was fitted on); it is
    saved with the package, and packages saved before it have none."""
    series = _phantom_series(tmp_path)
    sah, edh = CLASSES.index("subarachnoid"), CLASSES.index("epidural")
    members = [EfficientNetLite("efficientnet_lite0", output_stride=16).eval()]
    package = ModelPackage("t", "1", PreprocessConfig(image_size=64), members, None)
    convexity_fusion = np.full((len(CLASSES), 3), np.nan)
    convexity_fusion[edh] = (0.5, 2.0, -1.0)  # the first reader moves epidural
    torch.manual_seed(0)
    package.convexity = ConvexityReader(ConvexityNet(width=4), StripConfig(), convexity_fusion)
    alone = Predictor(package, torch.device("cpu"))
    own = alone.ensemble_logits(series)
    fusion = np.full((len(CLASSES), 3), np.nan)
    fusion[sah] = (0.8, 1.5, 0.25)
    cross = np.zeros((len(CLASSES), len(CLASSES)))
    cross[sah, edh] = -0.7
    torch.manual_seed(1)
    package.sulcal = ConvexityReader(
        ConvexityNet(width=4, classes=("subarachnoid",)), StripConfig(), fusion, cross=cross
    )
    package.save(tmp_path / "m.pt")
    loaded = Predictor.load(tmp_path / "m.pt", device="cpu")
    assert loaded.package.sulcal is not None and loaded.package.sulcal.cross is not None
    np.testing.assert_array_equal(loaded.package.sulcal.cross, cross)
    prediction = loaded.predict(series, heatmaps=False, basis=False)
    strip = loaded.package.sulcal.study_logits(series.hu, series.pixel_spacing_mm)
    assert strip is not None
    fused = 0.8 * own[sah] + 1.5 * strip[0] + 0.25 - 0.7 * own[edh]
    assert prediction.probabilities["subarachnoid"] == pytest.approx(
        1 / (1 + np.exp(-fused)), rel=1e-4
    )
    state = loaded.package.sulcal.to_state()
    del state["cross"]  # as 6.9.0 saved its readers
    assert ConvexityReader.from_state(state).cross is None


def test_a_floored_fusion_stops_a_confident_ensemble_from_outvoting_the_strips() -> None:
    """The ensemble cannot see a third of the positives and calls them normal with confidence;
    the strips see them. A floor under the ensemble's logit, fitted with the fusion, ranks them
    better out of fold than the plain fusion; the reader applies it, saves it, and a reader
    saved before floors existed has none."""
    rng = np.random.default_rng(1)
    count, sah = 600, CLASSES.index("subarachnoid")
    labels = (rng.random((count, len(CLASSES))) < 0.3).astype(np.float64)
    y = labels[:, sah]
    hidden = (rng.random(count) < 0.35) & (y == 1)  # blood the ensemble cannot see
    own = rng.normal(0, 1, labels.shape)
    own[:, sah] = np.where(y == 1, 4.0, -4.0) + rng.normal(0, 1.5, count)
    own[hidden, sah] = rng.normal(-6.0, 1.0, int(hidden.sum()))
    sulcal = rng.normal(0, 1, count) + 2.5 * y
    _, plain_oof, plain_record = _sah_fusion(own, sulcal, labels)
    fusion, oof, record = _sah_fusion(own, sulcal, labels, floor=True)
    assert "floor" not in plain_record["subarachnoid"]
    floor = record["subarachnoid"]["floor"]
    assert floor is not None and -6.0 <= floor <= -1.0
    assert roc_auc(y, oof[:, sah]) > roc_auc(y, plain_oof[:, sah]) + 0.01  # 0.985 against 0.972
    # with no floors to choose from, the fit is the plain fusion's
    w, f = fit_floored_logistic(np.column_stack([own[:, sah], sulcal]), y, floors=())
    assert math.isinf(f) and np.allclose(w, plain_record["subarachnoid"]["weights"])
    floors = np.full(len(CLASSES), -np.inf)
    floors[sah] = floor
    reader = ConvexityReader(
        ConvexityNet(width=4, classes=("subarachnoid",)), StripConfig(), fusion, floors=floors
    )
    w_own, w_strips, bias = fusion[sah]
    for k in (int(np.argmin(own[:, sah])), int(np.argmax(own[:, sah]))):
        study = reader.fuse(own[k], np.array([sulcal[k]]))
        expected = w_own * max(own[k, sah], floor) + w_strips * sulcal[k] + bias
        assert study[sah] == pytest.approx(expected)
        np.testing.assert_array_equal(np.delete(study, sah), np.delete(own[k], sah))
    state = reader.to_state()
    np.testing.assert_array_equal(ConvexityReader.from_state(state).floors, floors)
    del state["floors"]  # as 6.9.0 saved its readers
    assert ConvexityReader.from_state(state).floors is None


def test_an_either_fusion_lets_each_reader_find_the_blood_only_it_sees() -> None:
    """Half the positives lie where only the ensemble sees them, half where only the strips do,
    and the strips read a little blood in some negatives: the "either" fusion (the larger of
    the two readers' calibrated logits) ranks them better out of fold than the weighted sum.
    The reader applies it, counts the class as fused, saves it, and refuses it with --cross."""
    rng = np.random.default_rng(2)
    count, sah = 600, CLASSES.index("subarachnoid")
    labels = (rng.random((count, len(CLASSES))) < 0.3).astype(np.float64)
    y = labels[:, sah]
    deep = (rng.random(count) < 0.5) & (y == 1)  # blood the strips never reach
    own = rng.normal(0, 1, labels.shape)
    own[:, sah] = rng.normal(-4.0, 1.0, count) + 6.0 * deep
    sulcal = rng.normal(0, 1, count) + 4.0 * ((y == 1) & ~deep)
    sulcal[y == 0] += 2.0 * (rng.random(int((y == 0).sum())) < 0.2)  # blood beside the table
    _, plain_oof, _ = _sah_fusion(own, sulcal, labels)
    fusion, oof, record = _sah_fusion(own, sulcal, labels, either=True)
    assert roc_auc(y, oof[:, sah]) > roc_auc(y, plain_oof[:, sah]) + 0.01
    params = np.array(record["subarachnoid"]["either"])
    assert params.shape == (6,) and np.isnan(fusion[sah]).all()
    x = np.column_stack([own[:, sah], sulcal])
    np.testing.assert_allclose(either_logits(x, params), either_logits(x, fit_either(x, y)))
    either = np.full((len(CLASSES), 6), np.nan)
    either[sah] = params
    reader = ConvexityReader(
        ConvexityNet(width=4, classes=("subarachnoid",)), StripConfig(), fusion, either=either
    )
    assert list(reader.fused_classes()) == [sah]
    w_e, b_e, w_s, b_s, a, b = params
    for k in range(5):
        study = reader.fuse(own[k], np.array([sulcal[k]]))
        expected = a * max(w_e * own[k, sah] + b_e, w_s * sulcal[k] + b_s) + b
        assert study[sah] == pytest.approx(expected)
        np.testing.assert_array_equal(np.delete(study, sah), np.delete(own[k], sah))
    state = reader.to_state()
    np.testing.assert_array_equal(ConvexityReader.from_state(state).either, either)
    del state["either"]  # as 6.9.0 saved its readers
    assert ConvexityReader.from_state(state).either is None
    with pytest.raises(ValueError, match="no --cross or --floor"):
        fit_fusion(own, sulcal[:, None], labels, classes=("subarachnoid",), own=own, either=True)


def test_the_model_card_says_how_a_reader_was_fused() -> None:
    from inference.evaluation import _later_reader_line

    record = {
        "from": "t 2",
        "strip_classes": ["subarachnoid"],
        "train_studies": 900,
        "fit_studies": 600,
        "fuse_only": ["subarachnoid"],
        "classes": {"subarachnoid": {"ensemble_auc": 0.92, "fused_auc_out_of_fold": 0.96}},
        "fused": ["subarachnoid"],
    }
    plain = _later_reader_line("sulcal", record)
    assert "by a logistic regression, fitted on 600 other studies" in plain
    assert "either" not in plain and "subarachnoid 0.920 to 0.960" in plain
    either = _later_reader_line("sulcal", {**record, "either": True})
    assert "larger of the ensemble's and the strips' own calibrated logits" in either
    assert "logistic regression" not in either
    floored = _later_reader_line("sulcal", {**record, "floor": True})
    assert "with a floor under the ensemble's logit" in floored
