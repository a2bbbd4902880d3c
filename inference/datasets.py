"""Readers for the dataset layouts the training command reads, returning plain records.

Studies (one CT series each): the phantom generator's output, a folder of studies with labels.csv,
CQ500 (reads.csv, majority of three readers) and RSNA 2019 (stage_2_train.csv + ID_*.dcm).
Slices (already windowed 8-bit images): YOLO folders such as roboflow-ich, an image folder + CSV.
Labels are (6,) float32 in CLASSES order, NaN where unknown.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import random
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import yaml

from inference.constants import CLASSES, SUBTYPES
from inference.dicom_io import DicomInputError, read_header

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SUBTYPE_ALIASES = {
    "edh": "epidural",
    "iph": "intraparenchymal",
    "ivh": "intraventricular",
    "sah": "subarachnoid",
    "sdh": "subdural",
    **{name: name for name in SUBTYPES},
}
CQ500_FINDINGS = {
    "any": "ICH",
    "intraparenchymal": "IPH",
    "intraventricular": "IVH",
    "subdural": "SDH",
    "epidural": "EDH",
    "subarachnoid": "SAH",
}
RSNA_CSV_NAMES = ("stage_2_train.csv", "stage_1_train.csv")
RSNA_IMAGE_FOLDERS = ("stage_2_train", "stage_2_train_images", "stage_1_train_images", ".")


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass
class StudyItem:
    study_id: str
    paths: list[Path]  # DICOM files of one series
    labels: np.ndarray  # (6,) float32 in CLASSES order; NaN where unknown
    patient_id: str  # for splitting; study_id when unknown
    slice_labels: dict[str, np.ndarray] | None = None  # SOPInstanceUID -> (6,) float32
    masks_path: Path | None = None  # phantom masks.npz


@dataclass
class SliceItem:
    image_path: Path
    labels: np.ndarray  # (6,) float32, NaN where unknown
    patient_id: str
    boxes: list[tuple[int, float, float, float, float]] = field(default_factory=list)
    group: str = ""  # identical source slice for augmented copies
    key: str = ""  # how splits and reports name it; the file's stem when empty


def item_key(item: StudyItem | SliceItem) -> str:
    """How evaluations name an item (a model's split records its ``pseudonym``)."""
    if isinstance(item, SliceItem):
        return item.key or item.image_path.stem
    return item.study_id


PSEUDONYM_PREFIX = "sha256:"


def pseudonym(key: str) -> str:
    """How a model package records an item it trained, validated or fitted on: a hash of its
    key, so a package holds no study folder name, StudyInstanceUID or file name of its data
    (which can carry an identifier), and can still tell whether an item was one of them. It
    is a pseudonym, not anonymisation: whoever holds the data can recompute it. A recorded
    pseudonym maps to itself, so packages that recorded plain keys (before 2026-12-07) and
    new ones compare alike; such a package records pseudonyms once it is saved again
    (``ModelPackage.save``). The training record keeps the folders its config named as data
    sources: name them without identifiers."""
    if key.startswith(PSEUDONYM_PREFIX):
        return key
    return PSEUDONYM_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]


def recorded(keys: Iterable[str]) -> set[str]:
    """The pseudonyms of a package's recorded keys, plain or already pseudonymised."""
    return {pseudonym(k) for k in keys}


# --- CSV and labels -------------------------------------------------------------------------------


class CsvRow(dict[str, str]):
    """One CSV row: stripped column name -> stripped value, and the file line it began on."""

    def __init__(self, values: dict[str, str], line: int) -> None:
        super().__init__(values)
        self.line = line


def read_csv(path: Path) -> list[CsvRow]:
    """Rows of a CSV file as dicts with stripped keys and values, each with its line number
    (``row.line``, counting the header as line 1 and blank lines too). Rows with more fields
    than the header, and text that is not UTF-8, are refused with the file and line named."""
    if not path.is_file():
        raise DatasetError(path, "file not found")
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, restkey=_EXTRA_FIELDS)
        try:
            if not reader.fieldnames:
                raise DatasetError(path, "empty file (no header row)")
            for row in reader:
                line = reader.line_num  # where the row ends (a quoted field may span lines)
                extra = row.pop(_EXTRA_FIELDS, [])
                if any(v.strip() for v in extra):  # empty trailing fields are harmless
                    raise DatasetError(
                        path,
                        f"line {line}: {len(reader.fieldnames) + len(extra)}"
                        f" fields where the header has {len(reader.fieldnames)}",
                    )
                values = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                if any(values.values()):
                    rows.append(CsvRow(values, line))
        except UnicodeDecodeError as error:
            raise DatasetError(
                path, f"not UTF-8 text ({error.reason} at byte {error.start})"
            ) from None
        except csv.Error as error:
            raise DatasetError(path, f"line {reader.line_num}: not CSV ({error})") from None
    return rows


_EXTRA_FIELDS = "\x00extra"


def _unique_rows(rows: Sequence[CsvRow], key: Callable[[CsvRow], str], path: Path) -> None:
    """Refuse two rows naming the same study, image or slice (with two sets of labels)."""
    first: dict[str, int] = {}
    for row in rows:
        name = key(row)
        if name in first:
            raise DatasetError(path, f"line {row.line}: {name!r} repeats line {first[name]}")
        first[name] = row.line


def _columns(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return [name.strip() for name in next(csv.reader(handle), [])]


def parse_label(value: str, *, path: Path, row: int, column: str) -> float:
    """0 or 1 (also 0.0/1.0, true/false); empty, 'nan' or 'NA' for unknown."""
    text = value.strip().lower()
    if text in ("", "nan", "na", "?"):
        return math.nan
    if text in ("1", "1.0", "true"):
        return 1.0
    if text in ("0", "0.0", "false"):
        return 0.0
    raise DatasetError(path, f"line {row}, column {column!r}: label {value!r} is not 0 or 1")


def labels_from_row(row: dict[str, str], *, path: Path, row_number: int) -> np.ndarray:
    """(6,) float32 from the class columns present. An unknown 'any' becomes 1 where a subtype
    is 1, and the subtypes' largest where all of them are known; an 'any' of 0 beside a subtype
    of 1 is refused."""
    labels = np.full(len(CLASSES), np.nan, dtype=np.float32)
    for index, name in enumerate(CLASSES):
        if name in row:
            labels[index] = parse_label(row[name], path=path, row=row_number, column=name)
    subtypes = labels[1:]
    if (subtypes == 1).any():
        if labels[0] == 0:
            named = [n for n, v in zip(CLASSES[1:], subtypes, strict=True) if v == 1]
            raise DatasetError(path, f"line {row_number}: 'any' is 0 but {named} is 1")
        labels[0] = 1.0  # a known bleed of any subtype is a bleed
    elif np.isnan(labels[0]) and not np.isnan(subtypes).any():
        labels[0] = float(subtypes.max())
    return labels


def _check_columns(
    path: Path, *, required: Sequence[str], optional: Iterable[str], need_a_class: bool = True
) -> list[str]:
    columns = _columns(path)
    missing = [name for name in required if name not in columns]
    if missing:
        raise DatasetError(path, f"missing column(s) {missing}; columns are {columns}")
    unknown = [c for c in columns if c not in (*required, *optional, *CLASSES)]
    if unknown:
        raise DatasetError(path, f"unknown column(s) {unknown}; expected {list(CLASSES)}")
    if need_a_class and not any(c in CLASSES for c in columns):
        raise DatasetError(path, f"no class column; expected some of {list(CLASSES)}")
    return columns


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


# --- Studies --------------------------------------------------------------------------------------


def read_phantom_dataset(root: str | os.PathLike[str]) -> list[StudyItem]:
    """The phantom generator's output.

    root/labels.csv, root/<study>/*.dcm, root/<study>/masks.npz, root/slice_labels.csv (optional).
    """
    root = Path(root)
    labels_csv = root / "labels.csv"
    read_csv(labels_csv)  # file-not-found error first
    _check_columns(labels_csv, required=("study", *CLASSES), optional=("patient",))
    slice_labels = _phantom_slice_labels(root / "slice_labels.csv")
    items = []
    rows = read_csv(labels_csv)
    _unique_rows(rows, lambda row: row["study"], labels_csv)
    for row in rows:
        number = row.line
        study = row["study"]
        folder = _study_folder(root, study, labels_csv)
        masks = folder / "masks.npz"
        items.append(
            StudyItem(
                study_id=study,
                paths=sorted(folder.glob("*.dcm")),
                labels=labels_from_row(row, path=labels_csv, row_number=number),
                patient_id=row.get("patient") or study,
                slice_labels=slice_labels.get(study, {}) if slice_labels is not None else None,
                masks_path=masks if masks.is_file() else None,
            )
        )
    return items


def _phantom_slice_labels(path: Path) -> dict[str, dict[str, np.ndarray]] | None:
    if not path.is_file():
        return None
    _check_columns(
        path, required=("study", "sop_instance_uid", *CLASSES), optional=("slice_index",)
    )
    by_study: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    rows = read_csv(path)
    _unique_rows(rows, lambda row: f"{row['study']}/{row['sop_instance_uid']}", path)
    for row in rows:
        by_study[row["study"]][row["sop_instance_uid"]] = labels_from_row(
            row, path=path, row_number=row.line
        )
    return dict(by_study)


def _study_folder(root: Path, study: str, labels_csv: Path) -> Path:
    folder = root / study
    if not study or Path(study).name != study or not folder.is_dir():
        raise DatasetError(labels_csv, f"study {study!r} has no folder {folder}")
    return folder


def read_study_folder(root: str | os.PathLike[str]) -> list[StudyItem]:
    """labels.csv (`study`, any class columns, optional `patient`) + one DICOM folder per study."""
    root = Path(root)
    labels_csv = root / "labels.csv"
    read_csv(labels_csv)
    _check_columns(labels_csv, required=("study",), optional=("patient",))
    items = []
    rows = read_csv(labels_csv)
    _unique_rows(rows, lambda row: row["study"], labels_csv)
    for row in rows:
        number = row.line
        folder = _study_folder(root, row["study"], labels_csv)
        items.append(
            StudyItem(
                study_id=row["study"],
                paths=pick_series(folder),
                labels=labels_from_row(row, path=labels_csv, row_number=number),
                patient_id=row.get("patient") or row["study"],
            )
        )
    return items


def read_cq500(root: str | os.PathLike[str]) -> list[StudyItem]:
    """CQ500: reads.csv (R1..R3 findings, majority vote) + study folders, thin axial series each.

    Studies listed in reads.csv without a folder under root are left out (partial downloads).
    """
    root = Path(root)
    reads_csv = root / "reads.csv"
    rows = read_csv(reads_csv)
    columns = _columns(reads_csv)
    if "name" not in columns or not any(re.match(r"R\d+:ICH$", c) for c in columns):
        raise DatasetError(reads_csv, "expected a 'name' column and reader columns like 'R1:ICH'")
    folders = _cq500_folders(root, {_cq500_key(row["name"]) for row in rows})
    _unique_rows(rows, lambda row: _cq500_key(row["name"]), reads_csv)
    items = []
    for row in rows:
        number = row.line
        folder = folders.get(_cq500_key(row["name"]))
        if folder is None:
            continue
        items.append(
            StudyItem(
                study_id=row["name"],
                paths=pick_series(folder),
                labels=_cq500_majority(row, columns, path=reads_csv, row_number=number),
                patient_id=row["name"],
            )
        )
    if not items:
        raise DatasetError(root, "no study folder matches a name in reads.csv")
    if len(items) < len(rows):
        warnings.warn(
            f"{reads_csv}: {len(rows) - len(items)} of {len(rows)} studies it lists have no"
            f" folder under {root} and are left out",
            stacklevel=2,
        )
    return items


def _cq500_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _cq500_folders(root: Path, keys: set[str]) -> dict[str, Path]:
    """Shallowest folder per study; names like 'CQ500-CT-412' or 'CQ500CT412 CQ500CT412'."""
    found: dict[str, Path] = {}
    for directory, subdirectories, _ in os.walk(root):
        subdirectories.sort()
        for name in list(subdirectories):
            key = next((k for k in map(_cq500_key, name.split()) if k in keys), None)
            if key is not None:
                found.setdefault(key, Path(directory) / name)
                subdirectories.remove(name)  # do not descend into a study
    return found


def _cq500_majority(
    row: dict[str, str], columns: list[str], *, path: Path, row_number: int
) -> np.ndarray:
    labels = np.full(len(CLASSES), np.nan, dtype=np.float32)
    for index, name in enumerate(CLASSES):
        finding = CQ500_FINDINGS[name]
        votes = [
            parse_label(row[c], path=path, row=row_number, column=c)
            for c in columns
            if re.fullmatch(rf"R\d+:{finding}", c)
        ]
        votes = [v for v in votes if not math.isnan(v)]
        if votes:
            labels[index] = float(sum(votes) > len(votes) / 2)
    return labels


def pick_series(study_folder: Path) -> list[Path]:
    """DICOM files of the thinnest axial series (ties: most files) among the folders of a
    study. Files that are not DICOM (an index, a report) are left out of the ranking and of
    the series, so a stray file can neither hide a folder's series nor enter it."""
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for path in _dicom_files(study_folder):
        by_folder[path.parent].append(path)
    if not by_folder:
        raise DatasetError(study_folder, "study folder holds no files")
    ranked = [_series_rank(paths) for paths in by_folder.values()]
    _, header_file, paths = min(ranked, key=lambda r: r[0])
    if header_file is None:
        raise DatasetError(study_folder, "study folder holds no DICOM file")
    return [p for p in paths if _is_dicom(p)]


def _is_dicom(path: Path) -> bool:
    """A DICOM file: the 'DICM' mark after the preamble, or (files without one) a header that
    parses."""
    try:
        with path.open("rb") as handle:
            if handle.read(132)[128:] == b"DICM":
                return True
        read_header(path)
    except (OSError, DicomInputError):
        return False
    return True


def _series_rank(
    paths: list[Path],
) -> tuple[tuple[int, float, int], Path | None, list[Path]]:
    """(rank, the file read, paths): axial before other orientations before none, thinner
    first, then more files. The rank is read from the folder's first file that is DICOM."""
    header = None
    for path in paths:
        try:
            header = read_header(path)
        except DicomInputError:
            continue
        break
    if header is None:
        return (2, math.inf, -len(paths)), None, paths
    orientation = [float(v) for v in header.get("ImageOrientationPatient", [])] or None
    axial = orientation is not None and abs(np.cross(orientation[:3], orientation[3:])[2]) > 0.9
    try:
        thickness = float(header.get("SliceThickness"))
    except (TypeError, ValueError):
        thickness = math.inf
    return (0 if axial else 1, thickness, -len(paths)), path, paths


def read_rsna(root: str | os.PathLike[str]) -> list[StudyItem]:
    """RSNA 2019: stage_2_train.csv ("ID_<img>_<class>,Label") + ID_<img>.dcm, grouped into series.

    Images listed in the CSV but absent on disk are left out (partial downloads).
    """
    root = Path(root)
    labels_csv = next(
        (root / n for n in RSNA_CSV_NAMES if (root / n).is_file()), root / RSNA_CSV_NAMES[0]
    )
    image_labels = _rsna_image_labels(labels_csv)
    series: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    study_of: dict[str, tuple[str, str]] = {}
    on_disk = _rsna_images(root)
    absent = [image_id for image_id in image_labels if image_id not in on_disk]
    if absent and len(absent) < len(image_labels):
        warnings.warn(
            f"{labels_csv}: {len(absent)} of {len(image_labels)} images it lists are not under"
            f" {root} and are left out; a series' labels come from its images that are there",
            stacklevel=2,
        )
    for image_id in sorted(image_labels):
        path = on_disk.get(image_id)
        if path is None:
            continue
        header = read_header(
            path,
            specific_tags=["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID"],
        )
        series_uid = str(header.get("SeriesInstanceUID", "")) or image_id
        series[series_uid].append((path, str(header.get("SOPInstanceUID", "")) or image_id))
        study_of[series_uid] = (
            str(header.get("StudyInstanceUID", "")) or series_uid,
            str(header.get("PatientID", "")),
        )
    if not series:
        raise DatasetError(labels_csv, f"none of its images were found under {root}")
    return [_rsna_item(uid, series[uid], study_of[uid], image_labels) for uid in sorted(series)]


def _rsna_image_labels(path: Path) -> dict[str, np.ndarray]:
    rows = read_csv(path)
    columns = _columns(path)
    if columns[:2] != ["ID", "Label"]:
        raise DatasetError(path, f"expected columns ['ID', 'Label'], got {columns}")
    by_image: dict[str, np.ndarray] = {}
    _unique_rows(rows, lambda row: row["ID"], path)
    for row in rows:
        number = row.line
        image_id, _, name = row["ID"].rpartition("_")
        if name not in CLASSES or not image_id:
            raise DatasetError(path, f"line {number}: ID {row['ID']!r} is not ID_<image>_<class>")
        labels = by_image.setdefault(image_id, np.full(len(CLASSES), np.nan, dtype=np.float32))
        labels[CLASSES.index(name)] = parse_label(
            row["Label"], path=path, row=number, column="Label"
        )
    return by_image


def _rsna_images(root: Path) -> dict[str, Path]:
    """ID_<image> -> its file (.dcm in any case) in the first of RSNA_IMAGE_FOLDERS holding it."""
    found: dict[str, Path] = {}
    for folder in RSNA_IMAGE_FOLDERS:
        if (root / folder).is_dir():
            for path in sorted((root / folder).iterdir()):
                if path.suffix.lower() == ".dcm" and path.is_file():
                    found.setdefault(path.stem, path)
    return found


def _rsna_item(
    series_uid: str,
    images: list[tuple[Path, str]],
    study_and_patient: tuple[str, str],
    image_labels: dict[str, np.ndarray],
) -> StudyItem:
    study_uid, patient = study_and_patient
    slice_labels = {sop: image_labels[path.stem] for path, sop in images}
    stacked = np.stack(list(slice_labels.values()))  # (S, 6)
    known = ~np.isnan(stacked)
    study_labels = np.where(known.any(axis=0), np.where(known, stacked, 0).max(axis=0), np.nan)
    return StudyItem(
        study_id=f"{study_uid}/{series_uid}" if study_uid != series_uid else series_uid,
        paths=sorted(path for path, _ in images),
        labels=study_labels.astype(np.float32),
        patient_id=patient or study_uid,
        slice_labels=slice_labels,
    )


# --- Slices ---------------------------------------------------------------------------------------


def read_yolo_slices(root: str | os.PathLike[str]) -> list[SliceItem]:
    """YOLO folders (*/images/*.jpg + */labels/*.txt, data.yaml names), every split pooled."""
    root = Path(root)
    class_map = _yolo_class_map(root / "data.yaml")
    images = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.parent.name == "images" and p.is_file()
    )
    if not images:
        raise DatasetError(root, "no images/ folder with images")
    for folder in sorted({path.parent for path in images}):
        if not (folder.parent / "labels").is_dir():
            raise DatasetError(
                folder, "has no labels/ folder beside it (every image would read as negative)"
            )
    return [_yolo_item(path, class_map) for path in images]


def _yolo_item(image: Path, class_map: dict[int, int]) -> SliceItem:
    label_file = image.parent.parent / "labels" / f"{image.stem}.txt"
    boxes = _yolo_boxes(label_file, class_map) if label_file.is_file() else []
    labels = np.zeros(len(CLASSES), dtype=np.float32)
    for subtype, *_ in boxes:
        labels[0] = labels[1 + subtype] = 1.0
    patient, separator, _ = image.stem.partition("_")
    if not separator or not patient:
        raise DatasetError(
            image,
            "the patient cannot be read from the name (expected <patient>_<slice>..., as in"
            " roboflow-ich); a split by file would put one patient's slices in two parts. Use"
            " an image folder with a labels CSV and a patient column instead",
        )
    return SliceItem(
        image_path=image,
        labels=labels,
        patient_id=patient,
        boxes=boxes,
        group=re.split(r"_(?:jpe?g|png|bmp|tiff?)\.rf\.", image.stem, flags=re.IGNORECASE)[0],
    )


def _yolo_boxes(
    path: Path, class_map: dict[int, int]
) -> list[tuple[int, float, float, float, float]]:
    boxes = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            cls, values = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise DatasetError(path, f"line {number}: not numbers: {line!r}") from None
        if cls not in class_map or len(values) < 4 or (len(values) > 4 and len(values) % 2):
            raise DatasetError(path, f"line {number}: expected 'class x y w h' or a polygon")
        boxes.append((class_map[cls], *_box_corners(values)))
    return boxes


def _box_corners(values: list[float]) -> tuple[float, float, float, float]:
    if len(values) == 4:
        xc, yc, w, h = values
        corners = (xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2)
    else:  # polygon x1 y1 x2 y2 ...: its bounding box
        xs, ys = values[0::2], values[1::2]
        corners = (min(xs), min(ys), max(xs), max(ys))
    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in corners)
    return x0, y0, x1, y1


def _yolo_class_map(path: Path) -> dict[int, int]:
    """YOLO class index -> subtype index (SUBTYPES order), from data.yaml's `names`."""
    if not path.is_file():
        raise DatasetError(path, "file not found")
    names = _yaml_names(path)
    mapping = {}
    for index, name in names.items():
        subtype = SUBTYPE_ALIASES.get(name.strip().lower())
        if subtype is None:
            raise DatasetError(path, f"class {index} {name!r} is not a known subtype")
        mapping[index] = SUBTYPES.index(subtype)
    return mapping


def _yaml_names(path: Path) -> dict[int, str]:
    """`names:` of a YOLO data.yaml: a list, or a mapping of class index to name."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DatasetError(path, f"not YAML ({str(error).splitlines()[0]})") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, list) and names:
        return {i: str(name) for i, name in enumerate(names)}
    if isinstance(names, dict) and names:
        try:
            return {int(index): str(name) for index, name in names.items()}
        except (TypeError, ValueError):
            raise DatasetError(
                path, f"`names` keys must be class numbers, not {list(names)}"
            ) from None
    raise DatasetError(path, "no class `names` list")


def read_image_folder(
    root: str | os.PathLike[str], labels_csv: str | os.PathLike[str]
) -> list[SliceItem]:
    """Windowed PNG/JPEG slices + a CSV: `image` (path relative to root), optional `patient`,
    `group`, and class columns (all six, or only `any`: the rest NaN)."""
    root = Path(root)
    csv_path = Path(labels_csv)
    if not csv_path.is_absolute() and not csv_path.is_file():
        csv_path = root / csv_path
    read_csv(csv_path)
    _check_columns(csv_path, required=("image",), optional=("patient", "group"))
    items = []
    patient_of_group: dict[str, str] = {}
    rows = read_csv(csv_path)
    _unique_rows(rows, lambda row: Path(row["image"]).as_posix(), csv_path)
    for row in rows:
        number = row.line
        image = root / row["image"]
        if not image.is_file():
            raise DatasetError(csv_path, f"line {number}: image {image} not found")
        key = Path(row["image"]).as_posix()  # unique where stems are not (p1/001, p2/001)
        group = row.get("group") or key
        # without a patient column, the copies of one slice (its group) are one patient, so
        # a split never puts two copies of the same slice in two parts
        patient = row.get("patient") or group
        if patient_of_group.setdefault(group, patient) != patient:
            raise DatasetError(
                csv_path,
                f"line {number}: group {group!r} is patient {patient!r} here and"
                f" {patient_of_group[group]!r} on an earlier row",
            )
        items.append(
            SliceItem(
                image_path=image,
                labels=labels_from_row(row, path=csv_path, row_number=number),
                patient_id=patient,
                boxes=[],
                group=group,
                key=key,
            )
        )
    return items


# --- Splitting ------------------------------------------------------------------------------------

Item = TypeVar("Item", StudyItem, SliceItem)


def split_by_patient(
    items: Sequence[Item],
    *,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> tuple[list[Item], list[Item], list[Item]]:
    """Train/validation/test parts near the given fractions of items; no patient in two parts.

    Patients are visited in a seeded shuffle and each goes to the part furthest below its share,
    so the result depends only on the items, the fractions and the seed.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"fractions must be three non-negative numbers summing to 1, not {fractions}"
        )
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[item.patient_id] += 1
    patients = sorted(counts)
    random.Random(seed).shuffle(patients)  # noqa: S311 (a reproducible split, not security)
    part_of: dict[str, int] = {}
    sizes = [0, 0, 0]
    for patient in patients:
        total = sum(sizes) + counts[patient]
        part = max(range(3), key=lambda i: (fractions[i] * total - sizes[i], fractions[i]))
        part_of[patient] = part
        sizes[part] += counts[patient]
    parts: tuple[list[Item], list[Item], list[Item]] = ([], [], [])
    for item in items:
        parts[part_of[item.patient_id]].append(item)
    return parts
