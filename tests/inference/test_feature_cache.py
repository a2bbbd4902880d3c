"""The on-disk cache of the ensemble's slice embeddings that `ich convexity`, `ich refit-heads`
and `ich atlas build` read instead of running the networks again."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.constants import CLASSES
from inference.dicom_io import load_series
from inference.feature_cache import FeatureCache, member_outputs, networks_fingerprint
from inference.models import EfficientNetLite, folded_for_inference
from inference.package import ModelPackage, slice_outputs
from inference.phantom import generate_study, write_study
from inference.predictor import Predictor
from inference.preprocess import PreprocessConfig, model_input, resample_inplane

CPU = torch.device("cpu")


def _members(seed: int = 0) -> list[EfficientNetLite]:
    torch.manual_seed(seed)
    return [
        EfficientNetLite(v, output_stride=16).eval()
        for v in ("efficientnet_lite0", "efficientnet_lite1")
    ]


def _files(root: Path) -> list[Path]:
    """The cache's entries: a 40-digit hash under a folder of its first two."""
    return sorted(p for p in root.glob("*/*.npy") if re.fullmatch(r"[0-9a-f]{40}\.npy", p.name))


def test_a_second_pass_reads_what_the_first_computed_and_a_new_head_reads_it_too(
    tmp_path: Path,
) -> None:
    members = _members()
    x = torch.rand(5, 3, 64, 64)
    cache = FeatureCache(tmp_path)
    fingerprint = networks_fingerprint(members, CPU)
    args = {"batch_size": 2, "cache": cache, "fingerprint": fingerprint}
    logits, embeddings = member_outputs(members, x, CPU, **args)
    assert (cache.hits, cache.misses) == (0, 1) and len(_files(tmp_path)) == 1
    with torch.no_grad():
        direct = slice_outputs(members, x)  # the networks as trained, batch norms unfolded
    torch.testing.assert_close(embeddings, direct["embeddings"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, direct["logits"], rtol=1e-4, atol=1e-4)

    again_logits, again = member_outputs(members, x, CPU, **args)
    assert (cache.hits, cache.misses) == (1, 1)
    torch.testing.assert_close(again, embeddings, rtol=0, atol=0)
    torch.testing.assert_close(again_logits, logits, rtol=0, atol=0)

    # a refitted head: the same entry, read by the new head as forward_head would
    refitted = _members()
    with torch.no_grad():
        for m in refitted:
            m.fc.weight.mul_(-2.0)
            m.fc.bias.add_(1.0)
    assert networks_fingerprint(refitted, CPU) == fingerprint
    new_logits, _ = member_outputs(members, x, CPU, **args, heads=refitted)
    assert cache.hits == 2
    with torch.no_grad():
        expected = torch.stack([m.fc(e) for m, e in zip(refitted, embeddings, strict=True)])
    torch.testing.assert_close(new_logits, expected, rtol=0, atol=0)
    assert not torch.allclose(new_logits, logits)

    # another input, or networks that differ anywhere but in their heads: computed afresh
    member_outputs(members, x.flip(-1), CPU, **args)
    changed = _members()
    with torch.no_grad():
        changed[1].blocks[3].depthwise_conv.weight.add_(1e-3)
    other = networks_fingerprint(changed, CPU)
    assert other != fingerprint
    member_outputs(changed, x, CPU, batch_size=2, cache=cache, fingerprint=other)
    assert (cache.hits, cache.misses) == (2, 3) and len(_files(tmp_path)) == 3


def test_a_damaged_entry_is_computed_again_and_replaced(tmp_path: Path) -> None:
    members = [folded_for_inference(m) for m in _members()]
    x = torch.rand(3, 3, 64, 64)
    cache = FeatureCache(tmp_path)
    args = {"batch_size": 4, "cache": cache, "fingerprint": networks_fingerprint(members, CPU)}
    _, embeddings = member_outputs(members, x, CPU, **args)
    (entry,) = _files(tmp_path)
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    _, again = member_outputs(members, x, CPU, **args)
    assert (cache.hits, cache.misses) == (0, 2)
    torch.testing.assert_close(again, embeddings, rtol=0, atol=0)
    np.save(entry, np.zeros((2, 3, 7), np.float32))  # whole, but not of this study's shape
    _, again = member_outputs(members, x, CPU, **args)
    assert cache.misses == 3
    torch.testing.assert_close(again, embeddings, rtol=0, atol=0)
    _, again = member_outputs(members, x, CPU, **args)
    assert cache.hits == 1  # the entry was written again, whole


def test_the_cache_keeps_to_its_bound_dropping_the_least_recently_used(tmp_path: Path) -> None:
    members = [folded_for_inference(m) for m in _members()]
    fingerprint = networks_fingerprint(members, CPU)
    inputs = [torch.full((2, 3, 32, 32), v) for v in (0.1, 0.2, 0.3)]
    entry_bytes = 2 * 2 * members[0].embedding_dim * 4 + 128  # the array and the .npy header
    cache = FeatureCache(tmp_path, max_bytes=2 * entry_bytes)
    args = {"batch_size": 4, "cache": cache, "fingerprint": fingerprint}
    member_outputs(members, inputs[0], CPU, **args)
    (first,) = _files(tmp_path)
    member_outputs(members, inputs[1], CPU, **args)
    os.utime(first, (1, 1))  # long unused
    # files that are not the cache's, in a folder it was pointed at, are never pruned
    (tmp_path / "ab").mkdir(exist_ok=True)
    theirs = [tmp_path / "ab" / "volume.npy", tmp_path / "patient01" / "x.npy"]
    theirs += [tmp_path / "ab" / "notes.tmp"]
    for path in theirs:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"\0" * (3 * entry_bytes))
        os.utime(path, (1, 1))  # older than every entry, and over the bound on their own
    member_outputs(members, inputs[2], CPU, **args)
    assert len(_files(tmp_path)) == 2 and not first.exists()
    assert all(path.exists() for path in theirs)


def test_the_environment_names_the_folder_or_turns_it_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICH_FEATURE_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("ICH_FEATURE_CACHE_MB", "5")
    cache = FeatureCache.from_env()
    assert cache is not None and cache.root == tmp_path / "c" and cache.max_bytes == 5 * 2**20
    monkeypatch.setenv("ICH_FEATURE_CACHE", "off")
    assert FeatureCache.from_env() is None
    monkeypatch.setenv("ICH_FEATURE_CACHE", str(tmp_path))
    for value in ("lots", "0", "-5"):
        monkeypatch.setenv("ICH_FEATURE_CACHE_MB", value)
        with pytest.raises(ValueError, match=r"whole number of megabytes \(1 or more\)"):
            FeatureCache.from_env()


def test_the_predictors_ensemble_scores_are_the_same_read_from_the_cache(tmp_path: Path) -> None:
    package = ModelPackage("t", "1", PreprocessConfig(image_size=64), _members(), None)
    series = load_series(write_study(generate_study(5, subtypes=["subdural"]), tmp_path / "s"))
    predictor = Predictor(package, CPU)
    # what predict() scores the study with: the shared pass that also makes the class maps
    grid, _ = resample_inplane(series.hu, series.pixel_spacing_mm, package.preprocess)
    x = model_input(grid, series.positions_mm, package.preprocess)
    logits, embeddings, _ = predictor._run_members(x, 8, [])[0]
    expected = predictor._calibrated_logits(logits, embeddings)
    plain = predictor.ensemble_logits(series)
    np.testing.assert_allclose(plain, expected, rtol=0, atol=1e-6)
    cache = FeatureCache(tmp_path / "cache")
    first = Predictor(package, CPU).ensemble_logits(series, cache=cache)
    second = Predictor(package, CPU).ensemble_logits(series, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_allclose(first, plain, rtol=0, atol=0)
    np.testing.assert_allclose(second, plain, rtol=0, atol=0)
    assert plain.shape == (len(CLASSES),)


def test_an_empty_entry_or_a_cache_that_cannot_be_written_is_no_failure(tmp_path: Path) -> None:
    members = [folded_for_inference(m) for m in _members()]
    x = torch.rand(2, 3, 32, 32)
    fingerprint = networks_fingerprint(members, CPU)
    cache = FeatureCache(tmp_path / "c")
    _, embeddings = member_outputs(
        members, x, CPU, batch_size=4, cache=cache, fingerprint=fingerprint
    )
    (entry,) = _files(tmp_path / "c")
    entry.write_bytes(b"")  # as a crash between create and write could leave it
    _, again = member_outputs(members, x, CPU, batch_size=4, cache=cache, fingerprint=fingerprint)
    torch.testing.assert_close(again, embeddings, rtol=0, atol=0)
    assert cache.misses == 2
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    unwritable = FeatureCache(blocked / "cache")
    with pytest.warns(UserWarning, match="cannot be written"):
        _, computed = member_outputs(
            members, x, CPU, batch_size=4, cache=unwritable, fingerprint=fingerprint
        )
    torch.testing.assert_close(computed, embeddings, rtol=0, atol=0)
