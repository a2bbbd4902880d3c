import math
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from inference.constants import CLASSES, SUBTYPES
from inference.datasets import (
    DatasetError,
    SliceItem,
    StudyItem,
    item_key,
    read_cq500,
    read_image_folder,
    read_phantom_dataset,
    read_rsna,
    read_study_folder,
    read_yolo_slices,
    split_by_patient,
)
from inference.dicom_io import load_series
from tests.inference.test_dicom_io import real_data_dir, write_ct

NAN = math.nan
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def labels(*values: float) -> list[float]:
    return [float(v) for v in values]


def same(array: np.ndarray, expected: list[float]) -> bool:
    return bool(np.array_equal(array, np.asarray(expected, dtype=np.float32), equal_nan=True))


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.strip() + "\n")
    return path


@pytest.fixture(scope="module")
def shared_data() -> Path:
    folder = real_data_dir()
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder} (set ICH_REAL_DATA_DIR)")
    return folder


# --- Phantom dataset ------------------------------------------------------------------------------


def test_it_reads_the_phantom_generators_output_with_masks_and_slice_labels(
    tmp_path: Path,
) -> None:
    header = "any,intraparenchymal,intraventricular,subdural,epidural,subarachnoid"
    write_csv(tmp_path / "labels.csv", f"study,{header}\nph-1,1,0,0,1,0,0\nph-2,0,0,0,0,0,0")
    uids = {}
    for study in ("ph-1", "ph-2"):
        uids[study] = [generate_uid() for _ in range(2)]
        for i, uid in enumerate(uids[study]):
            write_ct(tmp_path / study / f"{i:03}.dcm", sop_uid=uid, position=(0.0, 0.0, 5.0 * i))
    np.savez(tmp_path / "ph-1" / "masks.npz", subdural=np.zeros((2, 8, 8), dtype=bool))
    a, b = uids["ph-1"]
    write_csv(
        tmp_path / "slice_labels.csv",
        f"study,sop_instance_uid,slice_index,{header}\nph-1,{a},0,0,0,0,0,0,0\nph-1,{b},1,1,0,0,1,0,0",
    )

    first, second = read_phantom_dataset(tmp_path)

    assert first.study_id == "ph-1" and first.patient_id == "ph-1"
    assert [p.name for p in first.paths] == ["000.dcm", "001.dcm"]
    assert same(first.labels, labels(1, 0, 0, 1, 0, 0))
    assert first.masks_path == tmp_path / "ph-1" / "masks.npz"
    assert first.slice_labels is not None
    assert same(first.slice_labels[a], labels(0, 0, 0, 0, 0, 0))
    assert same(first.slice_labels[b], labels(1, 0, 0, 1, 0, 0))
    assert second.masks_path is None and second.slice_labels == {}
    assert load_series(first.paths).sop_instance_uids == [a, b]


def test_a_phantom_dataset_without_labels_csv_is_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"labels\.csv: file not found"):
        read_phantom_dataset(tmp_path)


# --- A folder of studies with labels.csv ----------------------------------------------------------


def test_it_reads_the_real_cq500_folder_with_the_labels_from_labels_csv(shared_data: Path) -> None:
    items = {item.study_id: item for item in read_study_folder(shared_data / "cq500")}

    assert sorted(items) == ["CQ500-CT-0", "CQ500-CT-412", "CQ500-CT-47", "CQ500-CT-80"]
    assert len(items["CQ500-CT-0"].paths) == 238
    assert all(len(items[s].paths) == 30 for s in ("CQ500-CT-412", "CQ500-CT-47", "CQ500-CT-80"))
    assert same(items["CQ500-CT-0"].labels, labels(0, 0, 0, 0, 0, 0))
    assert same(items["CQ500-CT-47"].labels, labels(0, 0, 0, 0, 0, 0))
    assert same(items["CQ500-CT-80"].labels, labels(1, 1, 1, 0, 0, 0))
    assert same(items["CQ500-CT-412"].labels, labels(1, 0, 0, 1, 0, 0))
    assert items["CQ500-CT-80"].patient_id == "CQ500-CT-80"


def test_missing_class_columns_are_unknown_and_any_is_derived_from_known_subtypes(
    tmp_path: Path,
) -> None:
    write_csv(
        tmp_path / "labels.csv",
        "study,patient,intraparenchymal,intraventricular,subdural,epidural,subarachnoid\n"
        "s1,p1,0,0,1,0,0\ns2,p1,0,0,0,0,0\ns3,p2,0,,0,0,0",
    )
    for study in ("s1", "s2", "s3"):
        write_ct(tmp_path / study / "1.dcm")

    s1, s2, s3 = read_study_folder(tmp_path)

    assert same(s1.labels, labels(1, 0, 0, 1, 0, 0))
    assert same(s2.labels, labels(0, 0, 0, 0, 0, 0))
    assert same(s3.labels, labels(NAN, 0, NAN, 0, 0, 0))
    assert (s1.patient_id, s3.patient_id) == ("p1", "p2")


def test_only_an_any_column_leaves_the_subtypes_unknown(tmp_path: Path) -> None:
    write_csv(tmp_path / "labels.csv", "study,any\ns1,1")
    write_ct(tmp_path / "s1" / "1.dcm")

    (item,) = read_study_folder(tmp_path)

    assert same(item.labels, labels(1, NAN, NAN, NAN, NAN, NAN))


@pytest.mark.parametrize(
    ("csv_text", "problem"),
    [
        pytest.param("study,any,subdual\ns1,1,0", "unknown column(s) ['subdual']", id="typo"),
        pytest.param("name,any\ns1,1", "missing column(s) ['study']", id="no-study"),
        pytest.param("study,patient\ns1,p", "no class column", id="no-class"),
        pytest.param("study,any\ns1,2", "line 2, column 'any': label '2' is not 0 or 1", id="two"),
        pytest.param("study,any\ns9,1", "study 's9' has no folder", id="no-folder"),
        pytest.param("study,any\n\ns1,2", "line 3, column 'any'", id="line-after-a-blank"),
        pytest.param(
            "study,any\ns1,1,1", "line 2: 3 fields where the header has 2", id="extra-field"
        ),
        pytest.param("study,any\ns1,1\ns1,0", "line 3: 's1' repeats line 2", id="repeated"),
        pytest.param(
            "study,any,subdural\ns1,0,1", "line 2: 'any' is 0 but ['subdural'] is 1", id="any-0"
        ),
    ],
)
def test_a_bad_labels_csv_is_refused_naming_the_file_and_the_problem(
    tmp_path: Path, csv_text: str, problem: str
) -> None:
    labels_csv = write_csv(tmp_path / "labels.csv", csv_text)
    write_ct(tmp_path / "s1" / "1.dcm")

    with pytest.raises(DatasetError) as raised:
        read_study_folder(tmp_path)

    assert raised.value.path == str(labels_csv)
    assert problem in str(raised.value)


# --- CQ500 ----------------------------------------------------------------------------------------

READS_HEADER = ",".join(
    ["name", "Category"]
    + [
        f"R{r}:{f}"
        for r in (1, 2, 3)
        for f in ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "MassEffect")
    ]
)


def test_a_labels_csv_that_is_not_utf8_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_bytes("study,any\nétude,1\n".encode("latin-1"))

    with pytest.raises(DatasetError, match=r"labels\.csv: not UTF-8 text"):
        read_study_folder(tmp_path)


def test_an_empty_trailing_field_is_read_and_a_subtype_makes_an_unknown_any_positive(
    tmp_path: Path,
) -> None:
    write_csv(tmp_path / "labels.csv", "study,any,subdural\ns1,,1,\ns2,,0,")
    write_ct(tmp_path / "s1" / "1.dcm")
    write_ct(tmp_path / "s2" / "1.dcm")

    one, two = read_study_folder(tmp_path)

    assert same(one.labels, labels(1, NAN, NAN, 1, NAN, NAN))
    assert same(two.labels, labels(NAN, NAN, NAN, 0, NAN, NAN))


def reads_row(name: str, *readers: str) -> str:
    """readers: per reader 7 digits for ICH IPH IVH SDH EDH SAH MassEffect."""
    return ",".join([name, "B1", *(",".join(reader) for reader in readers)])


def test_cq500_labels_are_the_majority_of_three_readers(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "reads.csv",
        "\n".join(
            [
                READS_HEADER,
                reads_row("CQ500-CT-7", "1101001", "1001000", "1100010"),
                reads_row("CQ500-CT-8", "1000010", "0000000", "0000000"),
                reads_row("CQ500-CT-9", "1000000", "1000000", "1000000"),  # not downloaded
            ]
        ),
    )
    write_ct(tmp_path / "CQ500-CT-7" / "1.dcm")
    write_ct(tmp_path / "CQ500-CT-8" / "1.dcm")

    with pytest.warns(UserWarning, match="1 of 3 studies it lists have no folder"):
        ct7, ct8 = read_cq500(tmp_path)

    # CLASSES order: any, IPH, IVH, SDH, EDH, SAH
    assert same(ct7.labels, labels(1, 1, 0, 1, 0, 0))
    assert same(ct8.labels, labels(0, 0, 0, 0, 0, 0))
    assert (ct7.study_id, ct7.patient_id) == ("CQ500-CT-7", "CQ500-CT-7")


def test_cq500_picks_the_thin_axial_series_from_the_original_nested_layout(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "reads.csv", "\n".join([READS_HEADER, reads_row("CQ500-CT-12", *["0" * 7] * 3)])
    )
    study = tmp_path / "qct01" / "CQ500CT12 CQ500CT12" / "Unknown Study"
    thick = [write_ct(study / "CT 5mm" / f"{i}.dcm", thickness=5.0) for i in range(3)]
    thin = [write_ct(study / "CT 0.625mm" / f"{i}.dcm", thickness=0.625) for i in range(2)]
    for i in range(4):
        write_ct(study / "CT SAG" / f"{i}.dcm", thickness=0.5, orientation=SAGITTAL)
    write_ct(tmp_path / "CQ500CT120 CQ500CT120" / "x" / "1.dcm")  # a prefix must not match

    (item,) = read_cq500(tmp_path)

    assert item.paths == thin
    assert thick[0] not in item.paths


def test_read_cq500_on_the_real_studies_agrees_with_labels_csv(shared_data: Path) -> None:
    from_reads = {i.study_id: i for i in read_cq500(shared_data / "cq500")}
    from_labels = {i.study_id: i for i in read_study_folder(shared_data / "cq500")}

    assert sorted(from_reads) == sorted(from_labels)
    for study, item in from_reads.items():
        assert same(item.labels, from_labels[study].labels.tolist()), study
        assert item.paths == from_labels[study].paths


def test_a_reads_csv_without_reader_columns_is_refused(tmp_path: Path) -> None:
    write_csv(tmp_path / "reads.csv", "name,ICH\nCQ500-CT-1,1")

    with pytest.raises(DatasetError, match=r"reads\.csv: expected a 'name' column"):
        read_cq500(tmp_path)


# --- RSNA -----------------------------------------------------------------------------------------


def rsna_rows(image: str, **positive: int) -> list[str]:
    rsna_order = (
        "epidural",
        "intraparenchymal",
        "intraventricular",
        "subarachnoid",
        "subdural",
        "any",
    )
    return [f"{image}_{name},{positive.get(name, 0)}" for name in rsna_order]


def test_it_groups_rsna_images_into_series_with_study_and_slice_labels(tmp_path: Path) -> None:
    images = tmp_path / "stage_2_train"
    series_a, series_b = generate_uid(), generate_uid()
    study_a, study_b = generate_uid(), generate_uid()
    rows = ["ID,Label"]
    sops = {}
    layout = [
        ("ID_aa01", series_a, study_a, "ID_p1", {}),
        ("ID_aa02", series_a, study_a, "ID_p1", {"any": 1, "subdural": 1}),
        ("ID_aa03", series_a, study_a, "ID_p1", {"any": 1, "subarachnoid": 1}),
        ("ID_bb01", series_b, study_b, "ID_p2", {}),
        ("ID_bb02", series_b, study_b, "ID_p2", {}),
    ]
    for z, (image, series, study, patient, positive) in enumerate(layout):
        sops[image] = generate_uid()
        write_ct(
            images / f"{image}{'.DCM' if image == 'ID_bb02' else '.dcm'}",  # any case
            series_uid=series,
            study_uid=study,
            patient_id=patient,
            sop_uid=sops[image],
            position=(0.0, 0.0, float(z)),
        )
        rows += rsna_rows(image, **positive)
    rows += rsna_rows("ID_gone")  # listed, not downloaded
    write_csv(tmp_path / "stage_2_train.csv", "\n".join(rows))

    with pytest.warns(UserWarning, match="1 of 6 images it lists are not under"):
        items = {item.patient_id: item for item in read_rsna(tmp_path)}

    assert sorted(items) == ["ID_p1", "ID_p2"]
    first = items["ID_p1"]
    assert first.study_id == f"{study_a}/{series_a}"
    assert [p.name for p in first.paths] == ["ID_aa01.dcm", "ID_aa02.dcm", "ID_aa03.dcm"]
    assert same(first.labels, labels(1, 0, 0, 1, 0, 1))
    assert first.slice_labels is not None
    assert same(first.slice_labels[sops["ID_aa02"]], labels(1, 0, 0, 1, 0, 0))
    assert same(first.slice_labels[sops["ID_aa01"]], labels(0, 0, 0, 0, 0, 0))
    assert same(items["ID_p2"].labels, labels(0, 0, 0, 0, 0, 0))
    assert [p.name for p in items["ID_p2"].paths] == ["ID_bb01.dcm", "ID_bb02.DCM"]


def test_an_rsna_id_without_a_known_class_is_refused(tmp_path: Path) -> None:
    write_csv(tmp_path / "stage_2_train.csv", "ID,Label\nID_aa01_bleed,1")

    with pytest.raises(DatasetError, match="line 2: ID 'ID_aa01_bleed' is not ID_<image>_<class>"):
        read_rsna(tmp_path)


def test_an_rsna_label_that_is_not_0_or_1_is_refused(tmp_path: Path) -> None:
    write_csv(tmp_path / "stage_2_train.csv", "ID,Label\nID_aa01_any,0.5")

    with pytest.raises(DatasetError, match=r"label '0\.5' is not 0 or 1"):
        read_rsna(tmp_path)


# --- YOLO slices ----------------------------------------------------------------------------------


def test_it_reads_the_real_roboflow_slices_with_the_counts_of_the_readme(
    shared_data: Path,
) -> None:
    items = read_yolo_slices(shared_data / "roboflow-ich")
    table = np.stack([item.labels for item in items])  # (833, 6)

    assert len(items) == 833
    assert int((table[:, 0] == 0).sum()) == 231
    counts = dict(zip(CLASSES, table.sum(axis=0).astype(int).tolist(), strict=True))
    assert counts == {
        "any": 602,
        "epidural": 343,
        "subdural": 142,
        "intraparenchymal": 82,
        "intraventricular": 44,
        "subarachnoid": 29,
    }
    assert int((table[:, 1:].sum(axis=1) > 1).sum()) == 35
    assert len({item.patient_id for item in items}) == 26
    assert all(item.boxes for item in items if item.labels[0] == 1)
    assert all(0 <= v <= 1 for item in items for _, *box in item.boxes for v in box)


def test_split_by_patient_never_puts_a_roboflow_patient_in_two_parts(shared_data: Path) -> None:
    items = read_yolo_slices(shared_data / "roboflow-ich")

    parts = split_by_patient(items, seed=3)

    patients = [{item.patient_id for item in part} for part in parts]
    assert all(patients)
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert sum(len(part) for part in parts) == len(items)
    groups = [{item.group for item in part} for part in parts]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


def test_yolo_class_names_come_from_data_yaml_and_map_to_subtypes(tmp_path: Path) -> None:
    write_csv(tmp_path / "data.yaml", "train: a/images\nnames:\n  - SDH\n  - EDH\nnc: 2")
    for split, stem, text in [
        ("train", "7_12_jpg.rf.abc", "0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.4 0.4"),
        ("train", "7_12_jpg.rf.def", ""),
        ("test", "8_3", ""),
    ]:
        (tmp_path / split / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / split / "images" / f"{stem}.jpg").write_bytes(b"jpeg")
        write_csv(tmp_path / split / "labels" / f"{stem}.txt", text)

    items = {item.image_path.stem: item for item in read_yolo_slices(tmp_path)}

    boxed = items["7_12_jpg.rf.abc"]
    assert (boxed.patient_id, boxed.group) == ("7", "7_12")
    assert [box[0] for box in boxed.boxes] == [SUBTYPES.index(s) for s in ("subdural", "epidural")]
    corners = [box[1:] for box in boxed.boxes]
    assert np.allclose(corners, [(0.4, 0.3, 0.6, 0.7), (0.0, 0.0, 0.3, 0.3)])  # clipped to 0..1
    assert same(boxed.labels, labels(1, 0, 0, 1, 1, 0))
    assert same(items["7_12_jpg.rf.def"].labels, labels(0, 0, 0, 0, 0, 0))
    assert items["7_12_jpg.rf.def"].group == "7_12"
    assert items["8_3"].patient_id == "8"


def test_an_unknown_yolo_class_name_is_refused(tmp_path: Path) -> None:
    write_csv(tmp_path / "data.yaml", "names: ['EDH', 'tumour']")

    with pytest.raises(DatasetError, match="class 1 'tumour' is not a known subtype"):
        read_yolo_slices(tmp_path)


# --- Image folder ---------------------------------------------------------------------------------


def test_it_reads_an_image_folder_with_only_an_any_column(tmp_path: Path) -> None:
    for name in ("a/1.png", "a/2.png", "b/1.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"png")
    write_csv(tmp_path / "slices.csv", "image,patient,any\na/1.png,pa,1\na/2.png,pa,0\nb/1.png,,0")

    first, second, third = read_image_folder(tmp_path, "slices.csv")

    assert first.image_path == tmp_path / "a" / "1.png"
    assert same(first.labels, labels(1, NAN, NAN, NAN, NAN, NAN))
    assert (first.patient_id, second.patient_id) == ("pa", "pa")
    assert third.patient_id == "b/1.png" and third.group == "b/1.png"
    assert first.boxes == []
    # named by their path under the root: b/1.png is not a/1.png, though both are "1"
    assert [item_key(i) for i in (first, second, third)] == ["a/1.png", "a/2.png", "b/1.png"]


def test_a_package_records_pseudonyms_that_match_plain_keys_of_older_packages() -> None:
    from inference.datasets import pseudonym, recorded

    uid = "1.2.840.113619.2.55.3.604688119"
    assert pseudonym(uid).startswith("sha256:") and uid not in pseudonym(uid)
    assert pseudonym(pseudonym(uid)) == pseudonym(uid) != pseudonym(uid + "1")
    # a package from before pseudonyms recorded plain keys: both forms compare alike
    assert recorded([uid, pseudonym("CQ500-CT-47")]) == {pseudonym(uid), pseudonym("CQ500-CT-47")}


def test_image_folder_copies_of_one_slice_stay_in_one_part_without_a_patient_column(
    tmp_path: Path,
) -> None:
    rows = ["image,group,any"]
    for n in range(10):
        for copy in range(3):
            (tmp_path / f"s{n}_{copy}.png").write_bytes(b"png")
            rows.append(f"s{n}_{copy}.png,slice{n},{n % 2}")
    write_csv(tmp_path / "slices.csv", "\n".join(rows))
    items = read_image_folder(tmp_path, "slices.csv")
    parts = split_by_patient(items, seed=0)
    part_of_group: dict[str, set[int]] = {}
    for index, part in enumerate(parts):
        for item in part:
            part_of_group.setdefault(item.group, set()).add(index)
    assert len(part_of_group) == 10
    assert all(len(found) == 1 for found in part_of_group.values()), part_of_group
    assert sum(len(p) for p in parts) == 30 and all(parts)


def test_an_image_folder_group_of_two_patients_is_refused(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"png")
    write_csv(tmp_path / "slices.csv", "image,patient,group,any\na.png,p1,g,1\nb.png,p2,g,1")
    with pytest.raises(DatasetError, match="line 3: group 'g' is patient 'p2' here and 'p1'"):
        read_image_folder(tmp_path, "slices.csv")


def test_an_image_folder_row_pointing_to_a_missing_image_is_refused(tmp_path: Path) -> None:
    labels_csv = write_csv(tmp_path / "slices.csv", "image,any\nmissing.png,1")

    with pytest.raises(DatasetError, match=r"slices\.csv: line 2: image .*missing\.png not found"):
        read_image_folder(tmp_path, labels_csv)


# --- Splitting ------------------------------------------------------------------------------------


def study(patient: str, index: int) -> StudyItem:
    return StudyItem(f"{patient}-{index}", [], np.zeros(6, dtype=np.float32), patient)


def test_split_by_patient_is_deterministic_and_near_the_fractions() -> None:
    items = [study(f"p{p}", i) for p in range(40) for i in range(1 + p % 3)]

    parts = split_by_patient(items, fractions=(0.6, 0.2, 0.2), seed=7)

    assert parts == split_by_patient(items, fractions=(0.6, 0.2, 0.2), seed=7)
    assert [len(part) for part in parts] != [
        len(part) for part in split_by_patient(items, fractions=(1.0, 0.0, 0.0))
    ]
    shares = [len(part) / len(items) for part in parts]
    assert shares == pytest.approx([0.6, 0.2, 0.2], abs=0.05)
    owners = {}
    for index, part in enumerate(parts):
        for item in part:
            assert owners.setdefault(item.patient_id, index) == index


def test_split_by_patient_keeps_slice_items_of_one_patient_together() -> None:
    items = [
        SliceItem(Path(f"{p}_{s}.png"), np.zeros(6, dtype=np.float32), str(p), [], f"{p}_{s}")
        for p in range(10)
        for s in range(5)
    ]

    train, validation, test = split_by_patient(items)

    assert len(train) + len(validation) + len(test) == 50
    assert all(len(part) % 5 == 0 for part in (train, validation, test))


def test_split_by_patient_refuses_fractions_that_do_not_sum_to_one() -> None:
    with pytest.raises(ValueError, match="summing to 1"):
        split_by_patient([], fractions=(0.5, 0.2, 0.2))


def test_a_stray_file_neither_hides_a_series_nor_enters_it(tmp_path: Path) -> None:
    study = tmp_path / "S1"
    (study / "axial").mkdir(parents=True)
    (study / "axial" / "00index.txt").write_text("slice list\n")  # sorts first
    thin = [write_ct(study / "axial" / f"IM{i}.dcm", thickness=1.0) for i in range(4)]
    for i in range(2):
        write_ct(study / "other" / f"IM{i}.dcm", thickness=5.0)
    write_csv(tmp_path / "labels.csv", "study,any\nS1,0")

    (item,) = read_study_folder(tmp_path)

    assert item.paths == thin


def test_a_folder_without_dicom_files_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "S1").mkdir()
    (tmp_path / "S1" / "notes.txt").write_text("no images\n")
    write_csv(tmp_path / "labels.csv", "study,any\nS1,0")

    with pytest.raises(DatasetError, match=r"S1: study folder holds no DICOM file"):
        read_study_folder(tmp_path)


def write_yolo(root: Path, yaml_text: str, stems: list[str], labels_folder: bool = True) -> None:
    write_csv(root / "data.yaml", yaml_text)
    (root / "train" / "images").mkdir(parents=True)
    for stem in stems:
        (root / "train" / "images" / f"{stem}.jpg").write_bytes(b"jpeg")
        if labels_folder:
            write_csv(root / "train" / "labels" / f"{stem}.txt", "0 0.5 0.5 0.2 0.2")


@pytest.mark.parametrize(
    "yaml_text",
    [
        pytest.param("names:\n- SDH\n- EDH\n", id="list-at-the-keys-indent"),
        pytest.param("names:\n  - SDH  # subdural\n  - EDH\n", id="comments"),
        pytest.param("names: {0: SDH, 1: EDH}\n", id="flow-mapping"),
        pytest.param("names:\n  0: 'SDH'\n  1: \"EDH\"\n", id="block-mapping"),
        pytest.param("nc: 2\nnames: ['SDH', 'EDH']\n", id="flow-list"),
    ],
)
def test_yolo_class_names_are_read_from_any_yaml_form(tmp_path: Path, yaml_text: str) -> None:
    write_yolo(tmp_path, yaml_text, ["3_1_JPG.rf.x1"])

    (item,) = read_yolo_slices(tmp_path)

    assert same(item.labels, labels(1, 0, 0, 1, 0, 0))
    assert (item.patient_id, item.group) == ("3", "3_1")  # the copies' group in any case


@pytest.mark.parametrize(
    ("stems", "labels_folder", "problem"),
    [
        pytest.param(["3_1"], False, "has no labels/ folder beside it", id="no-labels-folder"),
        pytest.param(["scan7"], True, "the patient cannot be read from the name", id="no-patient"),
    ],
)
def test_a_yolo_set_that_would_mislabel_or_split_by_file_is_refused(
    tmp_path: Path, stems: list[str], labels_folder: bool, problem: str
) -> None:
    write_yolo(tmp_path, "names: ['SDH']", stems, labels_folder)

    with pytest.raises(DatasetError, match=problem):
        read_yolo_slices(tmp_path)
