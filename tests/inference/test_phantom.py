"""The synthetic head CT generator: DICOM that reads back, ground truth that agrees with itself."""

import csv
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from inference.constants import CLASSES, CT_IMAGE_STORAGE, SUBTYPES
from inference.phantom import (
    MIMICS,
    MIN_PIXELS,
    PADDING_HU,
    PhantomStudy,
    _rng,
    draw_subtypes,
    generate_study,
    write_dataset,
    write_study,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from phantom_geometry import FEATURES, lesion_features

TYPICAL_HU = {
    "intraparenchymal": (50, 95),
    "intraventricular": (35, 80),
    "subdural": (45, 90),
    "epidural": (50, 90),
    "subarachnoid": (30, 80),
}


def _bit(subtype: str) -> int:
    return 1 << SUBTYPES.index(subtype)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[..., 1:, :] |= out[..., :-1, :]
        grown[..., :-1, :] |= out[..., 1:, :]
        grown[..., :, 1:] |= out[..., :, :-1]
        grown[..., :, :-1] |= out[..., :, 1:]
        out = grown
    return out


def _read_series(paths: list[Path]) -> list[pydicom.Dataset]:
    datasets = [pydicom.dcmread(p) for p in paths]
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


@pytest.mark.parametrize("padded", [False, True])
def test_it_writes_a_series_pydicom_reads_back_in_hounsfield_units(
    tmp_path: Path, padded: bool
) -> None:
    seed = next(s for s in range(50) if generate_study(s, n_slices=1).padded is padded)
    study = generate_study(seed, n_slices=6, subtypes=["epidural"])
    paths = write_study(study, tmp_path, shuffle_names=True)

    assert len(paths) == 6
    assert sorted(p.name for p in paths) == [f"IM{i:04d}.dcm" for i in range(1, 7)]
    series = _read_series(list(tmp_path.glob("*.dcm")))
    positions = [float(ds.ImagePositionPatient[2]) for ds in series]
    np.testing.assert_allclose(positions, study.positions_mm, atol=1e-3)
    assert positions == sorted(positions)
    for i, ds in enumerate(series):
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == CT_IMAGE_STORAGE
        assert ds.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
        assert ds.Modality == "CT"
        assert ds.BodyPartExamined == "HEAD"
        assert ds.StudyDescription == "CT HEAD WO CONTRAST"
        assert ds.Manufacturer == "ICH-TRIAGE PHANTOM"
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.PixelSpacing[0]) == pytest.approx(study.pixel_spacing_mm, abs=1e-4)
        assert float(ds.SliceThickness) == study.slice_thickness_mm
        assert int(ds.InstanceNumber) == i + 1
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 80.0)
        assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
        hu = apply_modality_lut(ds.pixel_array, ds)
        assert np.abs(hu - study.hu[i]).max() <= 1
        assert ("PixelPaddingValue" in ds) is padded
    corner = series[0].pixel_array[0, 0]
    if padded:
        assert series[0].PixelRepresentation == 1
        assert corner == series[0].PixelPaddingValue
        assert study.hu[0, 0, 0] == PADDING_HU
    else:
        assert study.hu[0, 0, 0] == -1024
    assert len({ds.SeriesInstanceUID for ds in series}) == 1
    assert len({ds.SOPInstanceUID for ds in series}) == 6


def test_the_same_seed_gives_the_same_volume_labels_and_uids(tmp_path: Path) -> None:
    a = generate_study(11, n_slices=5, subtypes=["subdural"], size="small")
    b = generate_study(11, n_slices=5, subtypes=["subdural"], size="small")
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.labels == b.labels and a.volumes_ml == b.volumes_ml and a.mimics == b.mimics
    first = [pydicom.dcmread(p) for p in write_study(a, tmp_path / "a")]
    second = [pydicom.dcmread(p) for p in write_study(b, tmp_path / "b")]
    for x, y in zip(first, second, strict=True):
        assert x.SOPInstanceUID == y.SOPInstanceUID
        assert x.StudyInstanceUID == y.StudyInstanceUID
        assert x.SeriesInstanceUID == y.SeriesInstanceUID
    other = generate_study(12, n_slices=5, subtypes=["subdural"], size="small")
    assert not np.array_equal(other.hu, a.hu)


def test_one_study_id_drawn_with_other_options_gets_other_uids_and_a_default_one_keeps_its_own(
    tmp_path: Path,
) -> None:
    from inference.phantom import sop_instance_uids

    plain = generate_study(11, n_slices=3)
    typical = generate_study(11, n_slices=3, extra_axial="typical", max_size="small")
    assert plain.study_id == typical.study_id
    assert typical.variant == "n_slices=3;extra_axial=typical;max_size=small"
    assert not set(sop_instance_uids(plain)) & set(sop_instance_uids(typical))
    (a,) = write_study(plain, tmp_path / "a")[:1]
    (b,) = write_study(typical, tmp_path / "b")[:1]
    assert pydicom.dcmread(a).StudyInstanceUID != pydicom.dcmread(b).StudyInstanceUID
    # a default study keeps the UIDs sets written before the variant entered them
    assert generate_study(11).variant == ""
    assert sop_instance_uids(generate_study(11))[0] == str(
        pydicom.uid.generate_uid(entropy_srcs=["phantom-00011", "sop", "0"])
    )


@pytest.mark.parametrize("subtype", SUBTYPES)
def test_a_requested_subtype_appears_in_the_mask_and_labels_at_blood_density(subtype: str) -> None:
    study = generate_study(21, subtypes=[subtype], size="medium", n_slices=12)
    mask = (study.masks & _bit(subtype)) > 0

    assert study.labels[subtype] == 1 and study.labels["any"] == 1
    assert all(study.labels[s] == 0 for s in SUBTYPES if s != subtype)
    assert study.volumes_ml[subtype] > 0
    assert (study.masks & ~np.uint8(_bit(subtype))).max() == 0
    column = CLASSES.index(subtype)
    per_slice = mask.reshape(study.n_slices, -1).sum(1)
    np.testing.assert_array_equal(study.slice_labels[:, column], per_slice >= MIN_PIXELS)
    # blood density, away from the partial volume of the skull
    near_bone = _dilate(study.hu > 300, 3)
    blood = study.hu[mask & ~near_bone]
    low, high = TYPICAL_HU[subtype]
    assert low <= np.median(blood) <= high
    brain = study.hu[~_dilate(mask, 4) & (study.hu > 15) & (study.hu < 60)]
    assert np.median(blood) > np.median(brain) + 5


def test_an_epidural_lies_against_the_inner_table_as_a_compact_lens() -> None:
    study = generate_study(5, subtypes=["epidural"], size="medium")
    mask = (study.masks & _bit("epidural")) > 0
    px = study.pixel_spacing_mm
    bone = study.hu > 500
    touching = _dilate(mask, max(1, round(1.5 / px))) & bone
    rows = np.nonzero(mask.reshape(study.n_slices, -1).any(1))[0]
    assert len(rows) <= 10  # compact: a few slices, not the whole convexity
    for i in rows:
        if mask[i].sum() >= MIN_PIXELS:
            assert touching[i].any(), f"slice {i}: epidural not against the skull"
    # lentiform: the thickest slice is much thicker than it is at its ends
    areas = mask.reshape(study.n_slices, -1).sum(1)[rows]
    assert areas.max() > 3 * min(areas[0], areas[-1])


def test_a_negative_study_has_an_empty_mask_and_all_zero_labels() -> None:
    study = generate_study(3, subtypes=[], n_slices=8)
    assert study.masks.max() == 0
    assert study.slice_labels.max() == 0
    assert all(v == 0 for v in study.labels.values())
    assert set(study.labels) == set(CLASSES)
    assert all(v == 0.0 for v in study.volumes_ml.values())
    assert study.size is None


def test_blood_is_the_only_difference_between_a_positive_and_a_negative_of_one_seed() -> None:
    negative = generate_study(8, subtypes=[], n_slices=8)
    positive = generate_study(
        8, subtypes=["subdural", "intraventricular"], size="small", n_slices=8
    )
    assert negative.noise_sigma_hu == positive.noise_sigma_hu
    assert negative.pixel_spacing_mm == positive.pixel_spacing_mm
    lesion = _dilate(positive.masks > 0, 6)
    lesion[1:] |= lesion[:-1]  # partial volume reaches the neighbouring slabs
    lesion[:-1] |= lesion[1:]
    np.testing.assert_array_equal(negative.hu[~lesion], positive.hu[~lesion])
    assert (negative.hu != positive.hu).any()


def test_tiny_haemorrhage_is_under_five_millilitres_and_large_is_much_bigger() -> None:
    for seed in range(3):
        tiny = generate_study(seed, subtypes=["subdural", "subarachnoid"], size="tiny", n_slices=10)
        assert 0 < sum(tiny.volumes_ml.values()) < 5.0
        assert tiny.labels["subdural"] == 1 and tiny.labels["subarachnoid"] == 1
    large = generate_study(0, subtypes=["intraparenchymal"], size="large", n_slices=14)
    assert large.volumes_ml["intraparenchymal"] >= 40.0


def test_random_studies_mix_negatives_positives_sizes_and_mimics() -> None:
    studies = [generate_study(seed, n_slices=2) for seed in range(20)]
    negatives = sum(1 for s in studies if s.labels["any"] == 0)
    assert 3 <= negatives <= 14  # about 40 %
    assert {s.size for s in studies if s.labels["any"]} >= {"small", "medium"}
    mimics = {m for s in studies for m in s.mimics}
    assert mimics <= set(MIMICS) and len(mimics) >= 3
    forced = generate_study(1, subtypes=[], mimics=True, n_slices=12)
    assert forced.mimics and forced.labels["any"] == 0
    assert generate_study(1, mimics=False, n_slices=1).mimics == []


def test_favoured_subtypes_are_drawn_more_often_and_the_default_draw_is_unchanged() -> None:
    def counts(favour: tuple[str, ...]) -> dict[str, int]:
        drawn = [draw_subtypes(_rng(seed, 0), favour) for seed in range(3000)]
        assert 0.35 < sum(1 for d in drawn if not d) / len(drawn) < 0.45  # negatives as before
        return {s: sum(1 for d in drawn if s in d) for s in SUBTYPES}

    even, favoured = counts(()), counts(("subdural", "epidural"))
    for s in ("subdural", "epidural"):
        assert favoured[s] > 1.3 * even[s]
    for s in ("intraparenchymal", "intraventricular", "subarachnoid"):
        assert favoured[s] < 0.8 * even[s]
    # Without favour the draw is the one every seeded data set was made with.
    assert draw_subtypes(_rng(1001 * 100000, 0)) == ["subarachnoid", "intraparenchymal"]


def test_an_unknown_subtype_to_favour_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    from inference.cli import main

    assert main(["phantom", "--out", str(tmp_path / "out"), "--favour", "subdurl"]) == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="subdurl"):
        draw_subtypes(_rng(0, 0), ("subdurl",))


def test_min_size_draws_a_smaller_positive_again_at_that_size_with_the_same_subtypes(
    tmp_path: Path,
) -> None:
    default = generate_study(12 * 100000 + 4)  # study 4 of seed 12: a tiny positive
    assert default.size == "tiny"
    summaries = write_dataset(tmp_path, 5, seed=12, min_size="small", progress=False)
    assert [s.size for s in summaries[:4]] == [None, None, "medium", None]  # drawn as before
    redrawn = summaries[4]
    assert redrawn.size == "small"
    assert redrawn.labels == default.labels
    assert sum(redrawn.volumes_ml.values()) > 2 * sum(default.volumes_ml.values())
    with pytest.raises(ValueError, match="huge"):
        write_dataset(tmp_path / "x", 1, seed=0, min_size="huge")


def test_max_size_draws_a_larger_positive_again_at_that_size_with_the_same_subtypes(
    tmp_path: Path,
) -> None:
    default = [generate_study(12 * 100000 + i) for i in range(5)]
    assert default[2].size == "medium"  # study 2 of seed 12
    summaries = write_dataset(tmp_path, 5, seed=12, max_size="small", progress=False)
    assert [s.size for s in summaries] == [None, None, "small", None, "tiny"]
    assert [s.labels for s in summaries] == [d.labels for d in default]
    redrawn = summaries[2]
    assert sum(redrawn.volumes_ml.values()) < sum(default[2].volumes_ml.values()) / 2
    with pytest.raises(ValueError, match="larger than the largest"):
        write_dataset(tmp_path / "x", 1, seed=0, min_size="medium", max_size="small")


def _elongation(study: PhantomStudy, subtype: str) -> float:
    """Area / greatest thickness^2 of the lesion on its largest slice (scripts/phantom_geometry)."""
    planes = ((study.masks >> SUBTYPES.index(subtype)) & 1).astype(bool)
    return float(np.exp(lesion_features(planes)[FEATURES.index("log area/thickness^2")]))


def test_typical_extra_axial_shapes_draw_thinner_subdurals_and_stubbier_epidurals() -> None:
    def study(subtype: str, shapes: str) -> PhantomStudy:
        return generate_study(
            42, subtypes=[subtype], size="medium", mimics=False, extra_axial=shapes
        )

    sdh_classic, sdh_typical = study("subdural", "classic"), study("subdural", "typical")
    assert sdh_typical.volumes_ml == sdh_classic.volumes_ml  # same blood, another shape
    assert _elongation(sdh_typical, "subdural") > 1.5 * _elongation(sdh_classic, "subdural")
    edh_classic, edh_typical = study("epidural", "classic"), study("epidural", "typical")
    assert _elongation(edh_typical, "epidural") < 0.9 * _elongation(edh_classic, "epidural")
    # Typical subdurals are far more elongated than typical epidurals, classic ones less so.
    typical = _elongation(sdh_typical, "subdural") / _elongation(edh_typical, "epidural")
    classic = _elongation(sdh_classic, "subdural") / _elongation(edh_classic, "epidural")
    assert typical > 1.5 * classic
    with pytest.raises(ValueError, match="extra-axial"):
        generate_study(42, extra_axial="round")


def test_it_looks_like_a_head_with_skull_brain_and_ventricles() -> None:
    study = generate_study(4, subtypes=[], n_slices=6)
    mid = study.hu[3].astype(float)
    assert (mid > 700).mean() > 0.01  # skull
    brain = (mid > 15) & (mid < 50)
    assert brain.mean() > 0.12
    assert (mid < -900).mean() > 0.2  # air around the head
    csf = (mid > -10) & (mid < 14)
    assert csf.sum() > 500  # ventricles and sulci
    assert 0.4 <= study.pixel_spacing_mm <= 0.6
    assert study.hu.dtype == np.int16 and study.masks.dtype == np.uint8
    assert np.all(np.diff(study.positions_mm) == pytest.approx(study.slice_thickness_mm))


def test_write_dataset_labels_slice_labels_and_masks_agree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summaries = write_dataset(tmp_path, 3, seed=2)
    assert "phantom 3/3 ETA" in capsys.readouterr().err

    with open(tmp_path / "labels.csv", newline="") as f:
        labels = list(csv.DictReader(f))
    with open(tmp_path / "slice_labels.csv", newline="") as f:
        slice_rows = list(csv.DictReader(f))
    assert list(labels[0]) == ["study", *CLASSES]
    assert list(slice_rows[0]) == ["study", "sop_instance_uid", "slice_index", *CLASSES]
    assert [row["study"] for row in labels] == [s.study_id for s in summaries]

    for summary, row in zip(summaries, labels, strict=True):
        sdir = tmp_path / summary.study_id
        with np.load(sdir / "masks.npz") as npz:
            masks, uids, positions = npz["masks"], npz["sop_instance_uids"], npz["positions_mm"]
        files = sorted(sdir.glob("IM*.dcm"))
        assert len(files) == masks.shape[0] == len(uids) == summary.n_slices
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
        by_uid = {ds.SOPInstanceUID: float(ds.ImagePositionPatient[2]) for ds in headers}
        np.testing.assert_allclose([by_uid[u] for u in uids], positions, atol=1e-3)
        mine = [r for r in slice_rows if r["study"] == summary.study_id]
        assert [int(r["slice_index"]) for r in mine] == list(range(masks.shape[0]))
        assert [r["sop_instance_uid"] for r in mine] == list(uids)
        for name in CLASSES:
            column = [int(r[name]) for r in mine]
            if name == "any":
                expected = [int(any(int(r[s]) for s in SUBTYPES)) for r in mine]
            else:
                counts = ((masks & _bit(name)) > 0).reshape(masks.shape[0], -1).sum(1)
                expected = (counts >= MIN_PIXELS).astype(int).tolist()
            assert column == expected
            assert int(row[name]) == max(column) == summary.labels[name]


def test_write_dataset_with_two_workers_writes_what_one_writes(tmp_path: Path) -> None:
    one = write_dataset(tmp_path / "one", 3, seed=31, progress=False)
    two = write_dataset(tmp_path / "two", 3, seed=31, progress=False, workers=2)
    assert [s.study_id for s in two] == [s.study_id for s in one]
    for name in ("labels.csv", "slice_labels.csv"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.*"))
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.*"))
    for rel in files:
        assert (tmp_path / "two" / rel).read_bytes() == (tmp_path / "one" / rel).read_bytes(), rel
    with pytest.raises(ValueError, match="workers is at least 1"):
        write_dataset(tmp_path / "x", 1, seed=0, workers=0)


def test_ich_phantom_refuses_fewer_than_one_study_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from inference.cli import main

    for count in ("0", "-1", "100001"):
        assert main(["phantom", "--out", str(tmp_path / "x"), "--studies", count]) == 2
        assert f"studies is 1 to 100000, not {count}" in capsys.readouterr().err
    assert main(["phantom", "--out", str(tmp_path / "x"), "--seed", "-1"]) == 2
    assert "seed is 0 or more, not -1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
