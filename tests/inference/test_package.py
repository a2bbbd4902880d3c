import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


def test_inference_imports_without_loading_django_or_the_web_app() -> None:
    """Every module of the package, the command line included, imported in a fresh process."""
    web = "{'django', 'rest_framework', 'channels', 'celery', 'worklist', 'ichweb'}"
    code = (
        "import importlib, pkgutil, sys, inference\n"
        "names = [m.name for m in pkgutil.walk_packages(inference.__path__, 'inference.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "assert len(names) > 15 and 'inference.cli' in names, names\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {web}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_a_package_keeps_each_members_output_stride(tmp_path: Path) -> None:
    from inference.models import EfficientNetLite
    from inference.package import ModelPackage
    from inference.preprocess import PreprocessConfig

    members = [EfficientNetLite("efficientnet_lite0", output_stride=16).eval()]
    ModelPackage("t", "1", PreprocessConfig(image_size=64), members, None).save(tmp_path / "m.pt")
    loaded = ModelPackage.load(tmp_path / "m.pt")
    assert loaded.members[0].output_stride == 16
    assert loaded.members[0].forward_features(torch.rand(1, 3, 64, 64)).shape[-1] == 4


def test_a_second_training_stage_starts_from_the_first_stages_members(tmp_path: Path) -> None:
    import pytest

    from inference.models import EfficientNetLite
    from inference.package import ModelPackage
    from inference.preprocess import PreprocessConfig
    from inference.training import TrainConfig, initial_members

    first = EfficientNetLite("efficientnet_lite0", output_stride=16).eval()
    (tmp_path / "runs").mkdir()
    ModelPackage("stage-1", "1.0", PreprocessConfig(image_size=64), [first], None).save(
        tmp_path / "runs" / "m.pt"
    )
    config = TrainConfig.from_dict(
        {"init_from": "runs/m.pt", "out_dir": "runs/two", "architectures": ["efficientnet_lite0"]},
        base=tmp_path,
    )
    # paths in a config are relative to the config file, not to where `ich train` runs
    assert config.init_from == str(tmp_path / "runs" / "m.pt")
    assert config.out_dir == str(tmp_path / "runs" / "two")
    weights, label = initial_members(config)
    assert label == "stage-1 1.0"
    for name, value in first.state_dict().items():
        # saved as float16: the start is the first stage's weights to half precision
        assert torch.allclose(weights["efficientnet_lite0"][name].float(), value.float(), atol=1e-2)
    assert initial_members(TrainConfig()) == ({}, None)  # no init_from: ImageNet as before
    both = TrainConfig.from_dict(
        {"init_from": str(tmp_path / "runs" / "m.pt")}, base=tmp_path
    )  # default: Lite0 and Lite1
    with pytest.raises(ValueError, match="no efficientnet_lite1 member"):
        initial_members(both)


def test_a_subtype_is_flagged_only_together_with_any() -> None:
    import numpy as np

    from inference.package import ModelPackage
    from inference.preprocess import PreprocessConfig

    package = ModelPackage("t", "1", PreprocessConfig(), [], None)
    package.thresholds = np.array([0.5, 0.2, 0.2, 0.02, 0.01, 0.2])
    probabilities = np.array(
        [
            [0.4, 0.3, 0.1, 0.05, 0.5, 0.1],  # subtypes above their thresholds, "any" below
            [0.6, 0.3, 0.1, 0.05, 0.005, 0.1],  # "any": its subtypes at their own thresholds
        ]
    )
    flags = package.flags(probabilities)
    assert flags.tolist() == [
        [False, False, False, False, False, False],
        [True, True, False, True, False, False],
    ]


def test_round_as_saved_gives_the_weights_a_saved_package_loads(tmp_path: Path) -> None:
    from inference.models import EfficientNetLite
    from inference.package import ModelPackage, round_as_saved
    from inference.preprocess import PreprocessConfig

    torch.manual_seed(0)
    model = EfficientNetLite("efficientnet_lite0").eval()
    with torch.no_grad():
        model.fc.weight.add_(1e-4 * torch.randn_like(model.fc.weight))  # not float16-exact
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ModelPackage("t", "1", PreprocessConfig(image_size=64), [model], None).save(tmp_path / "m.pt")
    loaded = ModelPackage.load(tmp_path / "m.pt").members[0].state_dict()
    rounded = round_as_saved(model).state_dict()
    assert not torch.equal(before["conv_stem.weight"], rounded["conv_stem.weight"])
    for key, value in rounded.items():
        assert torch.equal(value, loaded[key]), key
    assert torch.equal(rounded["fc.weight"], before["fc.weight"])  # the head stays float32


def test_a_package_keeps_its_sequence_model_and_the_predictor_reads_studies_through_it(
    tmp_path: Path,
) -> None:
    """The shipped and tiny models pool by maximum; a package whose study level is the GRU
    (`aggregator = "gru"` or a winning "auto") saves it, loads it, and the predictor and the
    training code score a study with it alike."""
    from inference.constants import CLASSES
    from inference.models import AggregatorConfig, EfficientNetLite, StudyAggregator
    from inference.package import ModelPackage, aggregator_features
    from inference.predictor import Predictor
    from inference.preprocess import PreprocessConfig
    from inference.training import VolumeFeatures, max_study_logits, study_logits

    torch.manual_seed(0)
    member = EfficientNetLite("efficientnet_lite0").eval()
    dim = member.embedding_dim + len(CLASSES)
    aggregator = StudyAggregator(AggregatorConfig(input_dim=dim)).eval()
    ModelPackage("t", "1", PreprocessConfig(image_size=64), [member], aggregator).save(
        tmp_path / "m.pt"
    )
    predictor = Predictor.load(tmp_path / "m.pt", device="cpu")
    assert predictor.package.aggregator is not None

    features = VolumeFeatures(torch.randn(1, 7, len(CLASSES)), torch.randn(1, 7, dim - 6))
    x = aggregator_features(features.logits, features.embeddings)[None]
    with torch.no_grad():
        expected = aggregator(x, torch.ones(1, 7, dtype=torch.bool))[0][0].numpy()
    read = predictor._study_logits(features.logits, features.embeddings)
    assert np.allclose(read, expected, atol=1e-6)
    assert np.allclose(study_logits(predictor.package, [features])[0], expected, atol=1e-6)
    assert not np.allclose(read, max_study_logits([features])[0], atol=1e-3)


def test_ich_predict_refuses_a_bad_model_device_or_heatmap_folder_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inference.cli import main

    series = tmp_path / "series"
    series.mkdir()
    not_a_model = tmp_path / "model.pt"
    not_a_model.write_bytes(b"this is not a torch file")
    assert main(["predict", str(series), "--model", str(not_a_model)]) == 2
    assert "model.pt: not a readable model package" in capsys.readouterr().err
    assert main(["predict", str(series), "--model", str(tmp_path)]) == 2
    assert "a folder, not a model package" in capsys.readouterr().err
    assert main(["predict", str(series), "--model", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err

    a_file = tmp_path / "overlays"
    a_file.write_text("")
    assert main(["predict", str(series), "--heatmaps", str(a_file)]) == 2
    assert "a file, not a folder" in capsys.readouterr().err
    under_a_file = a_file / "sub"
    assert main(["predict", str(series), "--heatmaps", str(under_a_file)]) == 2
    captured = capsys.readouterr()
    assert "sub: cannot be made (Not a directory)" in captured.err
    assert captured.out == ""  # refused before any prediction

    with pytest.raises(SystemExit):  # argparse: only cpu, cuda or cuda:N
        main(["predict", str(series), "--device", "gpu"])
    assert "'gpu': cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:1"):
            assert main(["predict", str(series), "--device", device]) == 2
            assert "no CUDA device" in capsys.readouterr().err

    assert main(["predict", str(tmp_path / "absent")]) == 2
    assert "absent: no such file or folder" in capsys.readouterr().err
    one_file = tmp_path / "notes.txt"
    one_file.write_text("not DICOM")
    assert main(["predict", str(one_file)]) == 2
    err = capsys.readouterr().err
    assert "notes.txt: not a DICOM file" in err
    assert "--skip-bad" not in err  # one file: skipping it would leave nothing


def test_the_atlas_returns_the_k_most_similar_entries_of_the_asked_class_only() -> None:
    from inference.package import Atlas

    vectors = np.array(
        [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]], dtype=np.float32
    )
    atlas = Atlas(
        embeddings=vectors,
        classes=np.array([1, 1, 1, 1, 3]),  # the last, identical to the query, is another class
        labels=np.zeros((5, 6), np.uint8),
        probabilities=np.full(5, 0.9, np.float32),
        thumbnails=np.zeros((5, 4, 4), np.uint8),
        attention=np.zeros((5, 4, 4), np.uint8),
        sources=["phantom"] * 5,
    )
    found = atlas.nearest(np.array([2.0, 0.0]), class_index=1, k=3)  # not unit length
    assert [i for i, _ in found] == [0, 1, 3]
    assert [s for _, s in found] == pytest.approx([1.0, 0.8, 0.6])
    assert atlas.nearest(np.array([1.0, 0.0]), class_index=3, k=3) == [(4, pytest.approx(1.0))]
    assert atlas.nearest(np.array([1.0, 0.0]), class_index=2, k=3) == []


def test_a_damaged_newer_or_unsafe_package_is_refused_with_a_short_reason(tmp_path: Path) -> None:
    import os
    import pickle

    from inference.constants import CLASSES
    from inference.models import EfficientNetLite
    from inference.package import ModelPackage
    from inference.preprocess import PreprocessConfig

    good = tmp_path / "good.pt"
    members = [EfficientNetLite("efficientnet_lite0").eval()]
    ModelPackage("t", "1", PreprocessConfig(image_size=64), members, None).save(good)
    state = torch.load(good, weights_only=True)
    del state["members"][0]["state"]["conv_stem.weight"]
    torch.save(state, tmp_path / "no-weight.pt")
    torch.save({"format_version": 1, "classes": list(CLASSES)}, tmp_path / "empty-state.pt")
    torch.save({"format_version": 9, "classes": list(CLASSES)}, tmp_path / "newer.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:50000])

    class Unsafe:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (tmp_path / "unsafe.pt").write_bytes(pickle.dumps(Unsafe()))

    for name, reason in [
        ("no-weight", "a damaged model package (Error(s) in loading state_dict"),
        ("empty-state", "a damaged model package (no 'members')"),
        ("newer", "a model package of format 9; this version of ich reads format 1 (the"),
        ("empty", "not a readable model package (empty or truncated file)"),
        ("cut", "not a readable model package (truncated, or not a PyTorch file)"),
        ("unsafe", "not a readable model package (not a PyTorch file of weights (only weights"),
    ]:
        with pytest.raises(ValueError) as raised:
            ModelPackage.load(tmp_path / f"{name}.pt")
        assert f"{name}.pt: {reason}" in str(raised.value)
        assert "weights_only" not in str(raised.value)
    assert not (tmp_path / "ran").exists()


def test_the_atlas_picks_distinct_slices_and_asks_for_at_least_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from inference.atlas import farthest_points
    from inference.cli import main

    a, b, c = np.eye(3, dtype=np.float32)
    assert farthest_points(np.stack([a, a, b]), 3) == [0, 2]  # a copy is never picked twice
    assert farthest_points(np.stack([a, b, c, a]), 3) == [0, 1, 2]
    assert farthest_points(np.stack([a, b]), 1) == [0]
    with pytest.raises(ValueError, match="at least 1 slice per class, not 0"):
        farthest_points(np.stack([a, b]), 0)
    with pytest.raises(SystemExit):
        main(["atlas", "build", "--model", "m.pt", "--data", "phantom:x", "--per-class", "0"])
    assert "'0': a whole number of at least 1" in capsys.readouterr().err


def test_a_package_saved_again_records_its_items_as_pseudonyms(tmp_path: Path) -> None:
    from inference.datasets import pseudonym, recorded
    from inference.models import EfficientNetLite
    from inference.package import ModelPackage
    from inference.preprocess import PreprocessConfig

    members = [EfficientNetLite("efficientnet_lite0").eval()]
    package = ModelPackage("t", "1", PreprocessConfig(image_size=64), members, None)
    package.training = {"split": {"train": ["CQ500-CT-7", pseudonym("p2/001.png")], "n": 3}}
    package.save(tmp_path / "m.pt")

    split = ModelPackage.load(tmp_path / "m.pt").training["split"]
    assert split["train"] == [pseudonym("CQ500-CT-7"), pseudonym("p2/001.png")]
    assert split["n"] == 3
    assert "CQ500" not in (tmp_path / "m.pt").read_bytes().decode("latin-1")
    assert recorded(split["train"]) == recorded(["CQ500-CT-7", "p2/001.png"])


def test_settings_that_would_write_a_useless_package_are_refused_before_any_work(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from inference.cli import main

    heads = ["refit-heads", "m.pt", "--data", "phantom:x", "--out", "o", "--version", "1"]
    convexity = ["convexity", "m.pt", "--fit", "phantom:x", "--out", "o", "--version", "1"]
    for args, said in [
        ([*heads, "--folds", "1"], "'1': at least 2"),
        ([*heads, "--threads", "-1"], "'-1': a whole number of at least 1"),
        ([*convexity, "--batch", "0"], "'0': a whole number of at least 1"),
        ([*convexity, "--epochs", "0"], "'0': a whole number of at least 1"),
        ([*convexity, "--width", "x"], "'x': a whole number of at least 1"),
    ]:
        with pytest.raises(SystemExit):
            main(args)
        assert said in capsys.readouterr().err, args


def test_a_new_package_may_not_overwrite_the_one_it_builds_on_or_go_under_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inference.cli import main

    model = tmp_path / "run" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(b"a package")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for command in (
        ["refit-heads", str(model), "--data", "phantom:x", "--version", "2"],
        ["convexity", str(model), "--fit", "phantom:x", "--train", "phantom:y", "--version", "2"],
    ):
        assert main([*command, "--out", str(model.parent)]) == 2
        assert "would overwrite" in capsys.readouterr().err
        assert main([*command, "--out", str(a_file)]) == 2
        assert "a file, not a folder" in capsys.readouterr().err
    assert model.read_bytes() == b"a package"
