"""Read one CT series from DICOM files or bytes into Hounsfield units, sorted along its normal.

Uncompressed, JPEG Lossless and JPEG 2000 files are decoded by pydicom with the pylibjpeg plugins.
Every problem with the input is a typed ``DicomInputError`` naming the file and the reason; messages
never carry patient names or ids (file paths and UIDs only).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from inference.constants import AIR_HU, CT_IMAGE_STORAGE

PADDING_HU_LIMIT = -1500.0  # at or below: scanner padding (-2000, -3024 after rescale), not tissue
GEOMETRY_TOLERANCE = 1e-3
DUPLICATE_POSITION_MM = 0.01  # two slices closer than this along the normal are one place
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR
_PARSE_ERRORS = (
    EOFError,
    struct.error,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OSError,
    NotImplementedError,  # an unknown VR, e.g. a corrupt byte in a VR
    BytesLengthException,
)


class DicomInputError(ValueError):
    """A file (or the series as a whole) cannot be read as the CT series we need."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class NotDicomError(DicomInputError):
    pass


class TruncatedFileError(DicomInputError):
    pass


class UnsupportedModalityError(DicomInputError):
    pass


class NoPixelDataError(DicomInputError):
    pass


class MixedSeriesError(DicomInputError):
    pass


class InconsistentGeometryError(DicomInputError):
    pass


class MultiFrameError(DicomInputError):
    pass


class EmptySeriesError(DicomInputError):
    pass


class TooManySlicesError(DicomInputError):
    pass


class InvalidAttributeError(DicomInputError):
    """A value the series needs is missing or not usable (rescale, frame count)."""


class UnsupportedEncodingError(DicomInputError):
    """Pixel data this reader cannot turn into CT grey values: a transfer syntax with no
    decoder here, colour, or float pixel data."""


class DuplicateSliceError(DicomInputError):
    """A second file of the same SOPInstanceUID, or a second slice at the same position."""


@dataclass
class SkippedFile:
    source: str
    reason: str


@dataclass
class CTSeries:
    hu: np.ndarray  # (N, H, W) float32 Hounsfield units; padding and out-of-field values are AIR_HU
    positions_mm: np.ndarray  # (N,) float64 along the slice normal, ascending
    pixel_spacing_mm: tuple[float, float]  # (row, column)
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: list[str]
    instance_numbers: list[int | None]
    sources: list[str]
    skipped: list[SkippedFile] = field(default_factory=list)
    modality: str = "CT"
    body_part: str = ""
    series_description: str = ""
    slice_thickness_mm: float | None = None

    @property
    def slice_spacing_mm(self) -> float:
        if len(self.positions_mm) > 1:
            return float(np.median(np.diff(self.positions_mm)))
        return float(self.slice_thickness_mm or 1.0)


@dataclass
class _Slice:
    source: str
    ds: Dataset
    pixels: np.ndarray | None = None


# --- Reading single files -------------------------------------------------------------------------


def read_header(source: str | os.PathLike[str] | bytes, **dcmread_kwargs: Any) -> Dataset:
    """The header of one DICOM file (no pixel data), for callers that only index metadata.

    A path is read only up to the pixel data, so indexing large files stays cheap.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return _parse("<bytes #0>", bytes(source), stop_before_pixels=True, **dcmread_kwargs)
    name = str(source)
    try:
        with open(source, "rb") as handle:
            return _parse(name, handle, stop_before_pixels=True, **dcmread_kwargs)
    except OSError as error:
        reason = f"cannot be read ({error.strerror or type(error).__name__})"
        raise NotDicomError(name, reason) from None


def _named_bytes(source: str | os.PathLike[str] | bytes, *, index: int) -> tuple[str, bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<bytes #{index}>", bytes(source)
    path = Path(source)
    try:
        return str(path), path.read_bytes()
    except OSError as error:
        reason = f"cannot be read ({error.strerror or type(error).__name__})"
        raise NotDicomError(str(path), reason) from None


def _parse(name: str, data: bytes | BinaryIO, **dcmread_kwargs: Any) -> Dataset:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            handle = io.BytesIO(data) if isinstance(data, bytes) else data
            ds: Dataset
            try:
                ds = pydicom.dcmread(handle, **dcmread_kwargs)
            except InvalidDicomError:
                ds = _without_file_header(name, handle, **dcmread_kwargs)
        except DicomInputError:
            raise
        except _PARSE_ERRORS as error:
            raise TruncatedFileError(
                name, f"truncated or corrupt DICOM ({type(error).__name__} while parsing)"
            ) from None
    if any("end of file" in str(w.message).lower() for w in caught):
        raise TruncatedFileError(name, "truncated DICOM (file ends inside an element)")
    return ds


def _without_file_header(name: str, handle: BinaryIO, **dcmread_kwargs: Any) -> Dataset:
    """A DICOM data set written without the 128-byte preamble and 'DICM' file header (some
    older archives do that), read as such only when it holds an image's SOP class and
    instance UIDs: anything else is not a DICOM file."""
    handle.seek(0)
    try:
        ds = pydicom.dcmread(handle, force=True, **dcmread_kwargs)
        ok = bool(ds.get("SOPClassUID")) and bool(ds.get("SOPInstanceUID"))
    except Exception:  # a forced parse of arbitrary bytes fails in many ways: none is DICOM
        ok = False
    if not ok:
        raise NotDicomError(name, "not a DICOM file (no 'DICM' file header)")
    if "TransferSyntaxUID" not in ds.file_meta:  # what the parser found: raw, uncompressed
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
            if little else ExplicitVRBigEndian
        )  # fmt: skip
    return ds


def _read_slice(name: str, data: bytes) -> _Slice:
    ds = _parse(name, data)
    _convert_every_element(name, ds)
    if ds.get("SOPClassUID") == MEDIA_STORAGE_DIRECTORY:
        raise NotDicomError(name, "a DICOMDIR (the index of a disc), not an image")
    modality = str(ds.get("Modality", "")).upper()
    if modality != "CT" and not (modality == "" and ds.get("SOPClassUID") == CT_IMAGE_STORAGE):
        raise UnsupportedModalityError(name, f"modality {modality or 'missing'} is not CT")
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise UnsupportedEncodingError(
            name, "float pixel data, not the stored values of a CT image"
        )
    if "PixelData" not in ds:
        if PIXEL_DATA_TAG in data:
            raise TruncatedFileError(name, "truncated DICOM (pixel data cut short)")
        raise NoPixelDataError(name, "no pixel data")
    frames = _optional_int(ds.get("NumberOfFrames", 1))
    if frames is None:
        raise InvalidAttributeError(name, "NumberOfFrames is not a number")
    if frames != 1:
        raise MultiFrameError(name, "multi-frame images are not supported")
    _check_image_header(name, ds)
    return _Slice(name, ds)


def _convert_every_element(name: str, ds: Dataset) -> None:
    """pydicom converts an element's value when it is first read. Read each one here, so a
    corrupt header byte refuses this file (which ``skip_bad`` can skip), not the series later."""
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
        except Exception as error:  # pydicom's value conversions raise many kinds
            raise TruncatedFileError(
                name, f"corrupt header element {tag} ({type(error).__name__})"
            ) from None
        if element.VR == "SQ":
            for item in element.value or []:
                _convert_every_element(name, item)


def _check_image_header(name: str, ds: Dataset) -> None:
    """What every slice needs before its pixels are decoded: its size, grey values, the rescale
    to Hounsfield units, its pixel spacing and, where given, a usable orientation."""
    if "Rows" not in ds or "Columns" not in ds:
        raise InconsistentGeometryError(name, "no Rows/Columns")
    if not all((_optional_int(ds.get(k)) or 0) > 0 for k in ("Rows", "Columns")):
        raise InconsistentGeometryError(name, "Rows/Columns are not positive numbers")
    samples = _optional_int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedEncodingError(
            name,
            f"PhotometricInterpretation {photometric}, SamplesPerPixel"
            f" {ds.get('SamplesPerPixel')}: not CT grey values",
        )
    for keyword in ("RescaleIntercept", "RescaleSlope"):
        if _optional_float(ds.get(keyword)) is None:
            raise InvalidAttributeError(
                name, f"no usable {keyword}: stored values cannot be turned into Hounsfield units"
            )
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    if not np.isfinite(slope) or slope <= 0:
        raise InvalidAttributeError(name, f"RescaleSlope {slope:g} is not a positive number")
    if not np.isfinite(intercept):
        raise InvalidAttributeError(name, f"RescaleIntercept {intercept:g} is not a finite number")
    for keyword in ("BitsStored", "PixelRepresentation"):
        if _given(ds, keyword) and _optional_int(ds.get(keyword)) is None:
            raise InvalidAttributeError(name, f"{keyword} is not a whole number")
    for keyword in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
        if _given(ds, keyword) and _optional_int(ds.get(keyword)) is None:
            raise InvalidAttributeError(name, f"{keyword} is not a whole number")
    spacing = _spacing(ds)
    if spacing is None or min(spacing) <= 0:
        raise InconsistentGeometryError(name, "no usable PixelSpacing (two positive numbers)")
    # An empty orientation (some de-identification tools blank it) counts as a missing one.
    if _given(ds, "ImageOrientationPatient") and _normal(_orientation(ds)) is None:
        raise InconsistentGeometryError(
            name, "ImageOrientationPatient is not two orthogonal unit vectors"
        )


def _given(ds: Dataset, keyword: str) -> bool:
    """The element is there with a value (not absent, not empty)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return False
    return not (hasattr(value, "__len__") and not isinstance(value, str) and len(value) == 0)


def _decode(item: _Slice) -> None:
    try:
        pixels = item.ds.pixel_array
    except NotImplementedError:  # no decoder here for this transfer syntax (or none at all)
        syntax = item.ds.file_meta.get("TransferSyntaxUID", "")
        name = getattr(syntax, "name", "") or "unknown"
        raise UnsupportedEncodingError(
            item.source, f"transfer syntax {syntax} ({name}) cannot be decoded here"
        ) from None
    except Exception as error:  # decoders raise many kinds; each means unusable pixel data
        raise TruncatedFileError(
            item.source, f"truncated or corrupt pixel data: {_short(str(error), 200)}"
        ) from None
    expected = (int(item.ds.Rows), int(item.ds.Columns))
    if pixels.shape != expected:
        raise TruncatedFileError(
            item.source, f"decoded shape {pixels.shape} is not Rows x Columns {expected}"
        )
    item.pixels = pixels
    del item.ds.PixelData  # keep only the decoded array in memory


# --- Loading a series -----------------------------------------------------------------------------


def load_series(
    sources: str | os.PathLike[str] | bytes | Iterable[str | os.PathLike[str] | bytes],
    *,
    skip_bad: bool = False,
    max_slices: int = 1000,
) -> CTSeries:
    """Load one CT series; with ``skip_bad`` per-file problems are listed in ``skipped`` instead."""
    skipped: list[SkippedFile] = []

    def reject(error: DicomInputError) -> None:
        if not skip_bad:
            raise error
        skipped.append(SkippedFile(error.source, error.reason))

    name = str(sources) if isinstance(sources, str | os.PathLike) else "<series>"
    expanded = _expand(sources)
    if len(expanded) > max_slices and not skip_bad:
        raise TooManySlicesError(name, f"{len(expanded)} files, more than {max_slices}")
    slices: list[_Slice] = []
    per_series: Counter[str] = Counter()
    for index, source in enumerate(expanded):
        try:
            item = _read_slice(*_named_bytes(source, index=index))
        except DicomInputError as error:
            reject(error)
            continue
        slices.append(item)
        series = str(item.ds.get("SeriesInstanceUID", ""))
        per_series[series] += 1
        # With skip_bad too, stop as soon as one series is over the cap, before reading the
        # rest; files of other series (dropped below) do not count against it.
        if per_series[series] > max_slices:
            raise TooManySlicesError(name, f"more than {max_slices} CT files of one series")
    slices = _keep_consistent(name, slices, reject)
    _check_count(name, slices, skipped, max_slices)
    decoded = []
    for item in slices:
        try:
            _decode(item)
            decoded.append(item)
        except DicomInputError as error:
            reject(error)
    _check_count(name, decoded, skipped, max_slices)
    return _build(decoded, skipped)


def _expand(
    sources: str | os.PathLike[str] | bytes | Iterable[str | os.PathLike[str] | bytes],
) -> list[str | os.PathLike[str] | bytes]:
    if isinstance(sources, bytes | bytearray | memoryview):
        return [bytes(sources)]
    if isinstance(sources, str | os.PathLike):
        return list(_files_in(Path(sources)))
    expanded: list[str | os.PathLike[str] | bytes] = []
    for source in sources:
        if isinstance(source, str | os.PathLike) and Path(source).is_dir():
            expanded.extend(_files_in(Path(source)))
        else:
            expanded.append(source)
    return expanded


def _files_in(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    return sorted(  # hidden files and a disc's DICOMDIR index are not slices
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.name.upper() != "DICOMDIR"
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def _check_count(
    name: str, slices: list[_Slice], skipped: list[SkippedFile], max_slices: int
) -> None:
    if not slices:
        detail = ""
        if skipped:
            first = "; ".join(f"{Path(s.source).name}: {_short(s.reason)}" for s in skipped[:3])
            more = ", ..." if len(skipped) > 3 else ""
            detail = f" ({len(skipped)} files skipped: {first}{more})"
        raise EmptySeriesError(name, f"no usable CT slices{detail}")
    if len(slices) > max_slices:
        raise TooManySlicesError(name, f"{len(slices)} slices, more than {max_slices}")


def _short(reason: str, limit: int = 100) -> str:
    """The first sentence of a reason, at most ``limit`` characters (pydicom's run long)."""
    first = reason.split(" - ")[0].split("\n")[0].strip()
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _keep_consistent(name: str, slices: list[_Slice], reject: Any) -> list[_Slice]:
    """Drop (or refuse) files unlike the majority in series, size, orientation or spacing."""
    checks = [
        ("SeriesInstanceUID", _series_uid, MixedSeriesError, _equal),
        ("Rows x Columns", _size, InconsistentGeometryError, _equal),
        ("ImageOrientationPatient", _orientation, InconsistentGeometryError, _close),
        ("PixelSpacing", _spacing, InconsistentGeometryError, _close),
    ]
    for label, key, error_type, same in checks:
        majority = _majority([key(item.ds) for item in slices])
        kept = []
        for item in slices:
            value = key(item.ds)
            if same(value, majority):
                kept.append(item)
            else:
                reason = f"{label} {value} differs from the series' {majority}"
                reject(error_type(item.source, reason))
        slices = kept
    # A slice without a usable position in a series whose slices mostly have one cannot be
    # placed: the fallback (InstanceNumber) is for series where no slice has a position. A
    # series where only a minority has one cannot be ordered with confidence either way.
    points = [_floats(item.ds, "ImagePositionPatient", 3) for item in slices]
    placed = sum(p is not None for p in points)
    if placed > 0 and placed * 2 <= len(points):
        raise InconsistentGeometryError(
            name,
            f"only {placed} of {len(points)} slices have a usable ImagePositionPatient: "
            "the slices cannot be put in order",
        )
    some_placed = placed > 0
    seen: set[str] = set()
    at: dict[tuple[float, ...], str] = {}
    unique = []
    for item, point in zip(slices, points, strict=True):
        uid = str(item.ds.get("SOPInstanceUID", ""))
        where = None if point is None else tuple(round(v, 2) for v in point)
        if some_placed and where is None:
            reason = "no usable ImagePositionPatient, which the rest of the series has"
            reject(InconsistentGeometryError(item.source, reason))
        elif uid and uid in seen:
            reject(DuplicateSliceError(item.source, f"duplicate SOPInstanceUID {uid}"))
        elif where is not None and where in at:
            reason = f"at the same ImagePositionPatient {list(where)} as {Path(at[where]).name}"
            reject(DuplicateSliceError(item.source, reason))
        else:
            seen.add(uid)
            if where is not None:
                at[where] = item.source
            unique.append(item)
    return _one_per_position(unique, reject)


def _one_per_position(slices: list[_Slice], reject: Any) -> list[_Slice]:
    """Two slices at one place along the slice normal (an in-plane origin shifted, or the same
    InstanceNumber twice without positions) would repeat a slice: keep the first."""
    if len(slices) < 2:
        return slices
    positions = _positions(slices)
    kept: list[tuple[float, _Slice]] = []
    for item, position in sorted(zip(slices, positions, strict=True), key=lambda p: p[1]):
        if kept and abs(position - kept[-1][0]) < DUPLICATE_POSITION_MM:
            reason = f"at the same place along the slice normal as {Path(kept[-1][1].source).name}"
            reject(DuplicateSliceError(item.source, reason))
        else:
            kept.append((position, item))
    chosen = {id(item) for _, item in kept}
    return [item for item in slices if id(item) in chosen]


def _majority(values: list[Any]) -> Any:
    if not values:
        return None
    counts = Counter(repr(v) for v in values)
    best = max(counts.values())
    return next(v for v in values if counts[repr(v)] == best)  # ties: the first seen


def _equal(a: Any, b: Any) -> bool:
    return bool(a == b)


def _close(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and bool(np.allclose(a, b, atol=GEOMETRY_TOLERANCE))


def _series_uid(ds: Dataset) -> str:
    return str(ds.get("SeriesInstanceUID", ""))


def _size(ds: Dataset) -> tuple[int, int]:
    return int(ds.Rows), int(ds.Columns)


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def _orientation(ds: Dataset) -> tuple[float, ...] | None:
    return _floats(ds, "ImageOrientationPatient", 6)


def _spacing(ds: Dataset) -> tuple[float, ...] | None:
    return _floats(ds, "PixelSpacing", 2)


# --- Sorting and Hounsfield units -----------------------------------------------------------------


def _build(slices: list[_Slice], skipped: list[SkippedFile]) -> CTSeries:
    positions = _positions(slices)
    order = sorted(range(len(slices)), key=lambda i: (positions[i], _instance(slices[i].ds) or 0))
    slices = [slices[i] for i in order]
    first = slices[0].ds
    spacing = _spacing(first) or (1.0, 1.0)  # every slice has one (_check_image_header)
    rows, columns = _size(first)
    hu = np.empty((len(slices), rows, columns), dtype=np.float32)  # (N, H, W)
    for index, item in enumerate(slices):
        hu[index] = _to_hu(item)
        item.pixels = None  # decoded values are not needed twice
    return CTSeries(
        hu=hu,
        positions_mm=np.asarray([positions[i] for i in order], dtype=np.float64),
        pixel_spacing_mm=(spacing[0], spacing[1]),
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=_series_uid(first),
        sop_instance_uids=[str(item.ds.get("SOPInstanceUID", "")) for item in slices],
        instance_numbers=[_instance(item.ds) for item in slices],
        sources=[item.source for item in slices],
        skipped=skipped,
        modality=str(first.get("Modality", "")),
        body_part=str(first.get("BodyPartExamined", "") or ""),
        series_description=str(first.get("SeriesDescription", "") or ""),
        slice_thickness_mm=_optional_float(first.get("SliceThickness")),
    )


def _positions(slices: list[_Slice]) -> list[float]:
    """Distance of each slice along the normal; InstanceNumber times the thickness as a
    fallback where no slice has a position (``_keep_consistent`` leaves all or none). Without an
    orientation the normal is the direction the positions spread along."""
    normal = _normal(_orientation(slices[0].ds))
    points = [_floats(item.ds, "ImagePositionPatient", 3) for item in slices]
    if all(p is not None for p in points):
        stacked = np.asarray(points, dtype=np.float64)  # (N, 3)
        if normal is None and len(slices) > 1:
            centred = stacked - stacked.mean(axis=0)
            axis = np.linalg.svd(centred, full_matrices=False)[2][0]
            normal = axis * np.sign(axis[np.argmax(np.abs(axis))])  # its largest part positive
        if normal is not None:
            return [float(np.dot(p, normal)) for p in stacked]
    step = _optional_float(slices[0].ds.get("SpacingBetweenSlices"))
    step = step or _optional_float(slices[0].ds.get("SliceThickness")) or 1.0
    numbers = [_instance(item.ds) for item in slices]
    if any(n is None for n in numbers):
        return [float(index) * step for index in range(len(slices))]  # keep the given order
    return [float(n or 0) * step for n in numbers]


def _normal(orientation: tuple[float, ...] | None) -> np.ndarray | None:
    """The slice normal of an ImageOrientationPatient, or None where its two vectors are not
    (near) orthogonal unit vectors."""
    if orientation is None:
        return None
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    tolerance = 0.01
    if (
        abs(np.linalg.norm(row) - 1) > tolerance
        or abs(np.linalg.norm(column) - 1) > tolerance
        or abs(float(np.dot(row, column))) > tolerance
    ):
        return None
    normal = np.cross(row, column)
    return normal / np.linalg.norm(normal)


def _optional_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _instance(ds: Dataset) -> int | None:
    try:
        return int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return None


def _optional_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _to_hu(item: _Slice) -> np.ndarray:
    ds, stored = item.ds, item.pixels
    if stored is None:
        raise NoPixelDataError(item.source, "pixel data was not decoded")
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)  # checked on reading
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)  # (H, W)
    hu[_padding_mask(ds, stored) | (hu <= PADDING_HU_LIMIT)] = AIR_HU
    return hu


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    padding = _stored_value(ds, "PixelPaddingValue")
    if padding is None:
        return np.zeros(stored.shape, dtype=bool)
    limit = _stored_value(ds, "PixelPaddingRangeLimit")
    if limit is None:
        return stored == padding
    low, high = sorted((padding, limit))
    return (stored >= low) & (stored <= high)


def _stored_value(ds: Dataset, keyword: str) -> int | None:
    """A value in stored pixel units, read as signed when the pixels are signed."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    value = int(value)
    bits = int(ds.get("BitsStored", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1 and value >= 2 ** (bits - 1):
        value -= 2**bits
    return value
