import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    generate_uid,
)

from inference import dicom_io
from inference.constants import AIR_HU, CT_IMAGE_STORAGE
from inference.dicom_io import (
    DicomInputError,
    DuplicateSliceError,
    EmptySeriesError,
    InconsistentGeometryError,
    InvalidAttributeError,
    MixedSeriesError,
    MultiFrameError,
    NoPixelDataError,
    NotDicomError,
    SkippedFile,
    TooManySlicesError,
    TruncatedFileError,
    UnsupportedEncodingError,
    UnsupportedModalityError,
    load_series,
    read_header,
)

REPO = Path(__file__).resolve().parents[2]
SERIES = generate_uid()
STUDY = generate_uid()
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-4711"


def ct_dataset(
    *,
    pixels: np.ndarray | None = None,
    size: tuple[int, int] = (8, 8),
    position: tuple[float, float, float] | None = (0.0, 0.0, 0.0),
    orientation: tuple[float, ...] | None = AXIAL,
    instance: int | None = 1,
    series_uid: str = SERIES,
    study_uid: str = STUDY,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    padding: int | None = None,
    thickness: float = 1.0,
    with_pixels: bool = True,
    sop_uid: str | None = None,
    patient_id: str = PATIENT_ID,
    spacing: tuple[float, float] = (0.5, 0.5),
    frames: int = 1,
) -> Dataset:
    """A small CT Image Storage dataset; pixels default to 40 HU everywhere."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = PATIENT_NAME
    ds.PatientID = patient_id
    ds.Modality = modality
    ds.SeriesDescription = "HEAD 5mm"
    ds.BodyPartExamined = "HEAD"
    if instance is not None:
        ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = list(position)
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = thickness
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if padding is not None:
        ds.PixelPaddingValue = padding
    if pixels is None:
        pixels = np.full(size, round((40 - intercept) / slope), dtype=np.int16)
    ds.Rows, ds.Columns = pixels.shape
    if frames != 1:
        ds.NumberOfFrames = frames
        pixels = np.stack([pixels] * frames)
    if with_pixels:
        ds.PixelData = pixels.astype(np.int16).tobytes()
    return ds


def ct_bytes(**kwargs: object) -> bytes:
    buffer = io.BytesIO()
    ct_dataset(**kwargs).save_as(buffer, enforce_file_format=True)  # type: ignore[arg-type]
    return buffer.getvalue()


def write_ct(path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ct_bytes(**kwargs))
    return path


def marked(value: int, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    """Stored pixels that identify a slice: value + 1024 so that HU == value."""
    return np.full(size, value + 1024, dtype=np.int16)


def write_good_series(folder: Path, count: int = 3) -> list[Path]:
    return [
        write_ct(folder / f"good{i}.dcm", position=(0.0, 0.0, 5.0 * i), instance=i + 1)
        for i in range(count)
    ]


# --- Sorting --------------------------------------------------------------------------------------


def test_it_sorts_shuffled_files_by_position_not_by_name(tmp_path: Path) -> None:
    z_by_name = {"a.dcm": 20.0, "b.dcm": -10.0, "c.dcm": 0.0, "d.dcm": 10.0, "e.dcm": -20.0}
    for name, z in z_by_name.items():
        write_ct(tmp_path / name, position=(0.0, 0.0, z), pixels=marked(int(z)), instance=None)

    series = load_series(tmp_path)

    assert series.positions_mm.tolist() == [-20.0, -10.0, 0.0, 10.0, 20.0]
    assert [Path(s).name for s in series.sources] == ["e.dcm", "b.dcm", "c.dcm", "d.dcm", "a.dcm"]
    assert series.hu[:, 0, 0].tolist() == [-20.0, -10.0, 0.0, 10.0, 20.0]
    assert series.slice_spacing_mm == 10.0
    assert series.hu.shape == (5, 8, 8) and series.hu.dtype == np.float32


def test_it_sorts_oblique_slices_along_the_slice_normal_when_positions_run_in_reverse(
    tmp_path: Path,
) -> None:
    tilt = np.deg2rad(20)
    orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(-np.sin(tilt)))
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.array([-100.0, -80.0, 40.0])
    for i in range(4):  # instance 1 is the top slice: positions decrease with the instance number
        position = origin - 2.5 * i * normal
        write_ct(
            tmp_path / f"{i}.dcm",
            position=tuple(position),
            orientation=orientation,
            instance=i + 1,
            pixels=marked(i),
        )

    series = load_series(tmp_path)

    assert series.instance_numbers == [4, 3, 2, 1]
    assert np.all(np.diff(series.positions_mm) > 0)
    assert series.slice_spacing_mm == pytest.approx(2.5)
    assert series.hu[:, 0, 0].tolist() == [3.0, 2.0, 1.0, 0.0]


def test_without_an_orientation_it_sorts_along_the_direction_the_positions_spread(
    tmp_path: Path,
) -> None:
    for z, instance in ((10.0, 5), (0.0, 9), (20.0, 1)):
        write_ct(
            tmp_path / f"{instance}.dcm",
            position=(3.0, -2.0, z),
            orientation=None,
            instance=instance,
            pixels=marked(int(z)),
        )

    series = load_series(tmp_path)

    assert series.hu[:, 0, 0].tolist() == [0.0, 10.0, 20.0]  # not by InstanceNumber
    assert series.slice_spacing_mm == pytest.approx(10.0)


def test_a_dicomdir_in_a_folder_is_not_read_as_a_slice(tmp_path: Path) -> None:
    good = write_good_series(tmp_path / "IMAGES")
    (tmp_path / "DICOMDIR").write_bytes(b"an index of the disc")

    series = load_series(tmp_path)

    assert series.sources == [str(p) for p in good] and series.skipped == []


def test_it_falls_back_to_instance_number_without_position_or_orientation(tmp_path: Path) -> None:
    for name, instance in {"x.dcm": 3, "y.dcm": 1, "z.dcm": 2}.items():
        write_ct(
            tmp_path / name,
            position=None,
            orientation=None,
            instance=instance,
            thickness=2.0,
            pixels=marked(instance),
        )

    series = load_series(tmp_path)

    assert series.instance_numbers == [1, 2, 3]
    assert series.hu[:, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert series.slice_spacing_mm == 2.0


def test_a_single_slice_takes_its_spacing_from_the_slice_thickness(tmp_path: Path) -> None:
    series = load_series(write_ct(tmp_path / "one.dcm", thickness=5.0))

    assert series.hu.shape == (1, 8, 8)
    assert series.slice_spacing_mm == 5.0


# --- Hounsfield units -----------------------------------------------------------------------------


def test_it_converts_stored_values_to_hounsfield_units_with_slope_and_intercept(
    tmp_path: Path,
) -> None:
    stored = np.array([[500, 540], [1000, 250]], dtype=np.int16)
    series = load_series(write_ct(tmp_path / "s.dcm", pixels=stored, slope=2.0, intercept=-1000.0))

    assert series.hu[0].tolist() == [[0.0, 80.0], [1000.0, -500.0]]


def test_padding_minus_2000_and_the_pixel_padding_value_become_air(tmp_path: Path) -> None:
    stored = np.array([[-2000, 1064], [-500, 0]], dtype=np.int16)  # HU: -3024, 40, padding, -1024
    path = write_ct(tmp_path / "p.dcm", pixels=stored, slope=1.0, intercept=-1024.0, padding=-500)

    hu = load_series(path).hu[0]

    assert hu.tolist() == [[AIR_HU, 40.0], [AIR_HU, -1024.0]]


def test_a_pixel_padding_value_is_honoured_even_when_it_is_above_minus_1500_hu(
    tmp_path: Path,
) -> None:
    stored = np.array([[-900, 30]], dtype=np.int16)
    path = write_ct(tmp_path / "p.dcm", pixels=stored, intercept=0.0, padding=-900)

    assert load_series(path).hu[0].tolist() == [[AIR_HU, 30.0]]


# --- Inputs ---------------------------------------------------------------------------------------


def test_it_reads_a_series_from_bytes_and_names_them_by_index() -> None:
    blobs = [ct_bytes(position=(0.0, 0.0, z), pixels=marked(int(z))) for z in (3.0, 1.0, 2.0)]

    series = load_series(blobs)

    assert series.sources == ["<bytes #1>", "<bytes #2>", "<bytes #0>"]
    assert series.hu[:, 0, 0].tolist() == [1.0, 2.0, 3.0]


def test_it_reports_uids_and_series_metadata(tmp_path: Path) -> None:
    paths = write_good_series(tmp_path)

    series = load_series([str(p) for p in reversed(paths)])

    assert series.series_instance_uid == SERIES and series.study_instance_uid == STUDY
    assert len(set(series.sop_instance_uids)) == 3
    assert series.sources == [str(p) for p in paths]
    assert series.pixel_spacing_mm == (0.5, 0.5)
    assert (series.modality, series.body_part, series.series_description) == (
        "CT",
        "HEAD",
        "HEAD 5mm",
    )
    assert series.skipped == []


def test_read_header_returns_the_metadata_without_pixel_data(tmp_path: Path) -> None:
    header = read_header(write_ct(tmp_path / "h.dcm"))

    assert header.SeriesInstanceUID == SERIES
    assert "PixelData" not in header


def test_read_header_refuses_a_file_that_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not an image")

    with pytest.raises(NotDicomError) as raised:
        read_header(path)

    assert raised.value.source == str(path)


# --- Bad input ------------------------------------------------------------------------------------


def _not_dicom(path: Path) -> Path:
    path = path.with_name("labels.csv")
    path.write_text("study,any\nCT-1,0\n")
    return path


def _truncated(path: Path) -> Path:
    data = ct_bytes(position=(0.0, 0.0, 99.0))
    path.write_bytes(data[: len(data) - 40])  # cut inside the pixel data
    return path


def _mr(path: Path) -> Path:
    return write_ct(path, modality="MR", position=(0.0, 0.0, 99.0))


def _other_series(path: Path) -> Path:
    return write_ct(path, series_uid=generate_uid(), position=(0.0, 0.0, 99.0))


def _no_pixels(path: Path) -> Path:
    return write_ct(path, with_pixels=False, position=(0.0, 0.0, 99.0))


def _other_size(path: Path) -> Path:
    return write_ct(path, size=(16, 16), position=(0.0, 0.0, 99.0))


def _other_orientation(path: Path) -> Path:
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    return write_ct(path, orientation=coronal, position=(0.0, 0.0, 99.0))


def _other_spacing(path: Path) -> Path:
    return write_ct(path, spacing=(0.9, 0.9), position=(0.0, 0.0, 99.0))


def _multi_frame(path: Path) -> Path:
    return write_ct(path, frames=2, position=(0.0, 0.0, 99.0))


def _patched(path: Path, *, meta: dict | None = None, **changes: str | None) -> Path:
    """A CT file (at z = 99 mm) with attributes removed (None) or set to these bytes as
    written, valid or not (backslashes part values)."""
    ds = ct_dataset(position=(0.0, 0.0, 99.0))
    for keyword, value in changes.items():
        tag = Tag(pydicom.datadict.tag_for_keyword(keyword))
        if value is None:
            del ds[tag]
        else:
            vr = pydicom.datadict.dictionary_VR(tag)
            raw = value.encode()
            ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)  # type: ignore[assignment]
    for keyword, value in (meta or {}).items():
        setattr(ds.file_meta, keyword, value)
    # explicit VR little endian, also for a transfer syntax pydicom does not know
    ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return path


def _unknown_vr(path: Path) -> Path:
    """A corrupt byte in an element's VR: ImagePositionPatient's DS written as 'DX'. pydicom
    reads the file and fails only when the value is first used."""
    data = bytearray(ct_bytes(position=(0.0, 0.0, 99.0)))
    at = data.index(b"\x20\x00\x32\x00DS")
    data[at + 4 : at + 6] = b"DX"
    path.write_bytes(bytes(data))
    return path


def _padding_as_text(path: Path) -> Path:
    """PixelPaddingValue's VR corrupted from SS to IS: its two bytes become text, not a number."""
    data = bytearray(ct_bytes(position=(0.0, 0.0, 99.0), padding=-2000))
    at = data.index(b"\x28\x00\x20\x01SS")
    data[at + 4 : at + 6] = b"IS"
    path.write_bytes(bytes(data))
    return path


BAD_FILES = [
    pytest.param(_not_dicom, NotDicomError, "not a DICOM file", id="not-dicom"),
    pytest.param(_truncated, TruncatedFileError, "truncated", id="truncated"),
    pytest.param(_mr, UnsupportedModalityError, "modality MR is not CT", id="mr"),
    pytest.param(_other_series, MixedSeriesError, "SeriesInstanceUID", id="mixed-series"),
    pytest.param(_no_pixels, NoPixelDataError, "no pixel data", id="no-pixel-data"),
    pytest.param(_other_size, InconsistentGeometryError, "Rows x Columns", id="other-size"),
    pytest.param(
        _other_orientation,
        InconsistentGeometryError,
        "ImageOrientationPatient",
        id="other-orientation",
    ),
    pytest.param(_other_spacing, InconsistentGeometryError, "PixelSpacing", id="other-spacing"),
    pytest.param(_multi_frame, MultiFrameError, "multi-frame", id="multi-frame"),
    pytest.param(
        lambda p: _patched(p, ImagePositionPatient=None),
        InconsistentGeometryError,
        "no usable ImagePositionPatient, which the rest of the series has",
        id="no-position",
    ),
    pytest.param(
        lambda p: write_ct(p, position=(0.0, 0.0, 5.0)),
        DuplicateSliceError,
        "at the same ImagePositionPatient [0.0, 0.0, 5.0] as good1.dcm",
        id="same-position",
    ),
    pytest.param(
        lambda p: _patched(p, RescaleIntercept=None),
        InvalidAttributeError,
        "no usable RescaleIntercept",
        id="no-intercept",
    ),
    pytest.param(
        lambda p: _patched(p, RescaleSlope="0"),
        InvalidAttributeError,
        "RescaleSlope 0 is not a positive number",
        id="zero-slope",
    ),
    pytest.param(
        lambda p: _patched(p, PixelSpacing=None),
        InconsistentGeometryError,
        "no usable PixelSpacing",
        id="no-spacing",
    ),
    pytest.param(
        lambda p: _patched(p, ImageOrientationPatient="0\\0\\0\\0\\0\\0 "),
        InconsistentGeometryError,
        "not two orthogonal unit vectors",
        id="degenerate-orientation",
    ),
    pytest.param(
        lambda p: _patched(p, NumberOfFrames="ab"),
        InvalidAttributeError,
        "NumberOfFrames is not a number",
        id="frames-not-a-number",
    ),
    pytest.param(
        lambda p: _patched(p, Rows=None),
        InconsistentGeometryError,
        "no Rows/Columns",
        id="no-rows",
    ),
    pytest.param(
        lambda p: _patched(p, PhotometricInterpretation="RGB "),
        UnsupportedEncodingError,
        "PhotometricInterpretation RGB, SamplesPerPixel 1: not CT grey values",
        id="colour",
    ),
    pytest.param(
        lambda p: _patched(p, RescaleIntercept="inf"),
        InvalidAttributeError,
        "RescaleIntercept inf is not a finite number",
        id="infinite-intercept",
    ),
    pytest.param(
        _padding_as_text,
        InvalidAttributeError,
        "PixelPaddingValue is not a whole number",
        id="padding-not-a-number",
    ),
    pytest.param(
        _unknown_vr,
        TruncatedFileError,
        "corrupt header element (0020,0032) (NotImplementedError)",
        id="corrupt-vr",
    ),
    pytest.param(
        lambda p: write_ct(p, position=(0.3, 0.0, 5.0)),
        DuplicateSliceError,
        "at the same place along the slice normal as good1.dcm",
        id="same-place-other-origin",
    ),
    pytest.param(
        lambda p: _patched(p, meta={"TransferSyntaxUID": "1.2.3.4.5"}),
        UnsupportedEncodingError,
        "transfer syntax 1.2.3.4.5",
        id="unknown-transfer-syntax",
    ),
]


@pytest.mark.parametrize(("make_bad", "error_type", "reason"), BAD_FILES)
def test_it_refuses_a_bad_file_naming_the_file_and_the_reason(
    tmp_path: Path, make_bad: Callable[[Path], Path], error_type: type, reason: str
) -> None:
    write_good_series(tmp_path)
    bad = make_bad(tmp_path / "zz_bad.dcm")

    with pytest.raises(error_type) as raised:
        load_series(tmp_path)

    error = raised.value
    assert isinstance(error, DicomInputError)
    assert error.source == str(bad)
    assert reason in error.reason
    assert str(error) == f"{bad}: {error.reason}"
    assert PATIENT_ID not in str(error) and "Doe" not in str(error)


@pytest.mark.parametrize(("make_bad", "error_type", "reason"), BAD_FILES)
def test_with_skip_bad_it_loads_the_rest_and_lists_the_skipped_file(
    tmp_path: Path, make_bad: Callable[[Path], Path], error_type: type, reason: str
) -> None:
    good = write_good_series(tmp_path)
    bad = make_bad(tmp_path / "zz_bad.dcm")

    series = load_series(tmp_path, skip_bad=True)

    assert series.sources == [str(p) for p in good]
    assert series.hu.shape == (3, 8, 8)
    assert len(series.skipped) == 1
    assert series.skipped[0].source == str(bad)
    assert reason in series.skipped[0].reason


def test_it_detects_a_compressed_file_cut_inside_its_pixel_data(tmp_path: Path) -> None:
    ds = ct_dataset()
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([bytes(range(256)) * 4])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path = tmp_path / "cut.dcm"
    path.write_bytes(buffer.getvalue()[:-300])

    with pytest.raises(TruncatedFileError, match=r"cut\.dcm: truncated"):
        load_series(path)


def test_the_mr_refusal_names_the_file(tmp_path: Path) -> None:
    path = write_ct(tmp_path / "brain_mr.dcm", modality="MR")

    with pytest.raises(UnsupportedModalityError, match=r"brain_mr\.dcm: modality MR is not CT"):
        load_series([path])


def test_with_skip_bad_it_raises_empty_series_when_nothing_usable_remains(tmp_path: Path) -> None:
    _mr(tmp_path / "a.dcm")
    _not_dicom(tmp_path / "b.dcm")

    with pytest.raises(EmptySeriesError) as raised:
        load_series(tmp_path, skip_bad=True)

    assert "2 files skipped" in str(raised.value)
    assert "a.dcm: modality MR is not CT" in str(raised.value)  # the reasons, not just a count
    assert "labels.csv: not a DICOM file" in str(raised.value)


def test_an_empty_folder_is_an_empty_series(tmp_path: Path) -> None:
    with pytest.raises(EmptySeriesError) as raised:
        load_series(tmp_path)

    assert raised.value.source == str(tmp_path)


def test_it_refuses_more_slices_than_max_slices(tmp_path: Path) -> None:
    write_good_series(tmp_path, count=4)

    with pytest.raises(TooManySlicesError, match="more than 3"):
        load_series(tmp_path, max_slices=3)


def test_with_skip_bad_too_many_slices_are_refused_before_all_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_good_series(tmp_path, count=8)
    _not_dicom(tmp_path / "x.dcm")
    reads = []
    read_slice = dicom_io._read_slice
    monkeypatch.setattr(dicom_io, "_read_slice", lambda *a: reads.append(a) or read_slice(*a))

    with pytest.raises(TooManySlicesError, match="more than 3 CT files of one series"):
        load_series(tmp_path, max_slices=3, skip_bad=True)
    assert len(reads) <= 5  # four CT files and perhaps the bad one, not all nine


def test_with_skip_bad_only_the_kept_series_counts_against_the_cap(tmp_path: Path) -> None:
    write_good_series(tmp_path / "a", count=3)
    other = generate_uid()  # two files of a second series
    for i in range(2):
        write_ct(tmp_path / f"b{i}.dcm", series_uid=other, position=(0.0, 0.0, 50.0 + 5 * i))

    series = load_series(tmp_path, max_slices=3, skip_bad=True)

    assert series.hu.shape[0] == 3
    assert len(series.skipped) == 2
    assert all("SeriesInstanceUID" in s.reason for s in series.skipped)


def test_a_dicom_file_written_without_its_file_header_is_read(tmp_path: Path) -> None:
    """Some archives store the data set alone: no 128-byte preamble, no 'DICM', no file meta
    (so implicit VR little endian, the DICOM default)."""
    write_good_series(tmp_path, count=2)
    ds = ct_dataset(position=(0.0, 0.0, 10.0), pixels=marked(70))
    del ds.file_meta
    ds.preamble = None
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
    assert b"DICM" not in buffer.getvalue()[:132]
    (tmp_path / "raw.dcm").write_bytes(buffer.getvalue())

    series = load_series(tmp_path)

    assert series.hu.shape == (3, 8, 8)
    assert series.sources[-1] == str(tmp_path / "raw.dcm")
    assert np.all(series.hu[-1] == 70)


def test_a_file_from_a_minority_series_is_skipped_not_the_majority(tmp_path: Path) -> None:
    write_good_series(tmp_path, count=2)
    odd = write_ct(tmp_path / "a_first.dcm", series_uid=generate_uid())

    series = load_series(tmp_path, skip_bad=True)

    assert series.series_instance_uid == SERIES
    assert series.skipped == [SkippedFile(str(odd), series.skipped[0].reason)]


def test_a_duplicate_copy_of_a_slice_is_skipped(tmp_path: Path) -> None:
    uid = generate_uid()
    write_ct(tmp_path / "a.dcm", sop_uid=uid)
    write_ct(tmp_path / "b.dcm", sop_uid=uid)

    series = load_series(tmp_path, skip_bad=True)

    assert len(series.sop_instance_uids) == 1
    assert "duplicate SOPInstanceUID" in series.skipped[0].reason


def test_a_series_where_only_a_minority_of_slices_has_a_position_is_refused(
    tmp_path: Path,
) -> None:
    """The fallback (InstanceNumber) is for series without positions; one stray position must
    not make the other nine "unplaceable" and leave a one-slice series."""
    write_ct(tmp_path / "a.dcm", position=(0.0, 0.0, 0.0), instance=1)
    for i in range(2, 6):
        _patched(tmp_path / f"b{i}.dcm", ImagePositionPatient=None, InstanceNumber=f"{i} ")

    for skip_bad in (False, True):
        with pytest.raises(InconsistentGeometryError, match="only 1 of 5 slices"):
            load_series(tmp_path, skip_bad=skip_bad)


def test_two_slices_with_one_instance_number_and_no_positions_keep_one(tmp_path: Path) -> None:
    for i, name in enumerate(("a", "b", "c")):
        write_ct(tmp_path / f"{name}.dcm", position=None, orientation=None, instance=i + 1)
    twin = write_ct(tmp_path / "d.dcm", position=None, orientation=None, instance=2)

    series = load_series(tmp_path, skip_bad=True)

    assert series.instance_numbers == [1, 2, 3]
    assert [s.source for s in series.skipped] == [str(twin)]
    with pytest.raises(DuplicateSliceError, match=r"same place along the slice normal as b\.dcm"):
        load_series(tmp_path)


def test_an_empty_orientation_counts_as_a_missing_one(tmp_path: Path) -> None:
    """Some de-identification tools blank ImageOrientationPatient: the slices still sort by
    the direction their positions spread along, as without the element."""
    for i in range(3):
        _patched(
            tmp_path / f"s{i}.dcm",
            ImageOrientationPatient="",
            ImagePositionPatient=f"0\\0\\{5 * (2 - i)}",
        )

    series = load_series(tmp_path)

    assert series.positions_mm.tolist() == pytest.approx([0.0, 5.0, 10.0])
    assert series.sources[0].endswith("s2.dcm")


# --- Real CQ500 studies ---------------------------------------------------------------------------


def real_data_dir() -> Path:
    return Path(os.environ.get("ICH_REAL_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def cq500() -> Path:
    folder = real_data_dir() / "cq500"
    if not folder.is_dir():
        pytest.skip(f"real CQ500 studies not found at {folder} (set ICH_REAL_DATA_DIR)")
    return folder


REAL_STUDIES = [
    pytest.param("CQ500-CT-0", 238, JPEGLosslessSV1, id="CQ500-CT-0"),
    pytest.param("CQ500-CT-412", 30, JPEG2000Lossless, id="CQ500-CT-412"),
    pytest.param("CQ500-CT-80", 30, JPEG2000Lossless, id="CQ500-CT-80"),
    pytest.param("CQ500-CT-47", 30, JPEGLosslessSV1, id="CQ500-CT-47"),
]


@pytest.mark.parametrize(("study", "slices", "transfer_syntax"), REAL_STUDIES)
def test_it_decodes_a_real_cq500_study_to_plausible_hounsfield_units(
    cq500: Path, study: str, slices: int, transfer_syntax: str
) -> None:
    folder = cq500 / study
    assert read_header(next(folder.iterdir())).file_meta.TransferSyntaxUID == transfer_syntax

    series = load_series(folder)

    assert series.hu.shape == (slices, 512, 512)
    assert np.all(np.diff(series.positions_mm) > 0)
    assert len(set(series.sop_instance_uids)) == slices
    brain = np.mean((series.hu >= 20) & (series.hu <= 50))
    air = np.mean(series.hu == AIR_HU)
    assert brain > 0.02, f"only {brain:.1%} of voxels in 20..50 HU"
    assert air > 0.1, f"only {air:.1%} of voxels are air"
    assert series.hu.min() == AIR_HU and series.hu.max() < 4100
    assert 0.3 < series.slice_spacing_mm < 6


def test_it_detects_a_real_jpeg_lossless_file_cut_in_half(cq500: Path, tmp_path: Path) -> None:
    data = (cq500 / "CQ500-CT-47" / "CT000000.dcm").read_bytes()

    with pytest.raises(TruncatedFileError, match="truncated"):
        load_series([data[: len(data) // 2]])
