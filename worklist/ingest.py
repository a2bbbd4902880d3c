"""One ingest service behind every way in: C-STORE, STOW-RS and browser uploads.

``instance_ingest`` takes the bytes of one DICOM Part-10 file and either stores it (once, never
overwriting), indexes it in Postgres, audits it and tells the scheduler; or reports a resend of a
known SOPInstanceUID as a successful no-op ("duplicate"); or refuses it with a reason and keeps it
in quarantine for an admin. One refused file never stops the rest of a study: every call stands
alone.

What is accepted, and why:

- A Part-10 file (preamble, "DICM", file meta): what C-STORE, STOW-RS and every archive export
  give. A bare data set without file meta is refused (its transfer syntax would be a guess).
- Any modality and body part with pixel data is valid DICOM and is stored and indexed; whether a
  series is eligible for the AI is decided later, per series. MR, X-ray, secondary captures are
  therefore stored, not quarantined.
- An instance without pixel data is refused: the app only shows and scores images. A non-image
  SOP class (structured report, presentation state, key object selection...) is refused as "SOP
  class not supported" (0x0122); an image without pixel data as "does not match SOP class".
- Pixel data is checked for completeness without decoding it (native length against
  Rows x Columns x frames, encapsulated fragments present): decoding every frame at the door
  would halve ingest throughput, and the series reader decodes and skips a bad frame at scoring.

Refusal codes are DICOM status codes, so the C-STORE status and the STOW-RS FailureReason are the
same number. Reasons name tags, UIDs and sizes, never patient data, so they can be logged.
"""

import hashlib
import io
import json
import logging
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import timezone as dt_timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.errors import InvalidDicomError

from inference.dicom_io import (
    PIXEL_DATA_TAG,
    DicomInputError,
    NoPixelDataError,
    NotDicomError,
    TruncatedFileError,
)
from worklist import scheduling
from worklist.models import (
    UID_LENGTH,
    AuditAction,
    Instance,
    QuarantinedFile,
    Series,
    Study,
)
from worklist.services import audit_record

logger = logging.getLogger(__name__)
# pydicom's value-validation warnings quote the offending value ("Invalid value for VR DA:
# '19450312'"), which may be patient data; every way in reads untrusted headers, and logs carry no
# PHI, so values are read without validation (process-wide; nothing else changes).
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

# DICOM status codes: the C-STORE response status and the STOW-RS FailureReason (0008,1197).
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

STUDIES_DIR = "studies"
QUARANTINE_DIR = "quarantine"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_PARSE_ERRORS = (EOFError, struct.error, ValueError, TypeError, KeyError, IndexError, OSError)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Storage SOP classes that carry no image: refused as not supported rather than as broken.
_NON_IMAGE_SOP_CLASS_NAMES = re.compile(
    r"SR Storage|Structured Report|Presentation State|Key Object|Waveform|ECG|Encapsulated"
    r"|RT Plan|RT Structure|RT Dose|Raw Data|Spectroscopy|Registration|Measurement Report",
    re.IGNORECASE,
)


class IngestStatus(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to one file; ``failure_code`` is set exactly when it was refused."""

    status: IngestStatus
    reason: str = ""
    failure_code: int | None = None
    study_id: int | None = None
    series_id: int | None = None
    instance_id: int | None = None
    quarantine_id: int | None = None
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    sop_class_uid: str = ""

    @property
    def accepted(self) -> bool:
        return self.status != IngestStatus.QUARANTINED


@dataclass(frozen=True)
class _Facts:
    """What the index keeps of one instance's header."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    accession_number: str
    patient_id: str  # PHI
    patient_name: str  # PHI
    study_datetime: datetime | None
    study_date: date | None
    study_time: str
    modality: str
    series_number: int | None
    series_description: str
    body_part: str
    instance_number: int | None
    slice_position: float | None


class InvalidInstanceError(DicomInputError):
    """Readable DICOM whose identifiers cannot be indexed (missing, malformed, contradictory)."""


class UnsupportedInstanceError(DicomInputError):
    """Valid DICOM the app does not take: a SOP class without an image."""


class UnsupportedTransferSyntaxError(DicomInputError):
    pass


# Most specific first: what a refusal answers over C-STORE and in STOW-RS's FailureReason.
_FAILURE_CODES: tuple[tuple[type[DicomInputError], int], ...] = (
    (UnsupportedInstanceError, SOP_CLASS_NOT_SUPPORTED),
    (UnsupportedTransferSyntaxError, TRANSFER_SYNTAX_NOT_SUPPORTED),
    (InvalidInstanceError, DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
    (NoPixelDataError, DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
    (DicomInputError, CANNOT_UNDERSTAND),  # not DICOM, truncated, corrupt
)
_INSTANCE = "instance"  # DicomInputError's source: the bytes have no file name


class _AlreadyStored(Exception):
    """A known SOPInstanceUID: rolls back whatever this attempt wrote before noticing."""


def instance_ingest(
    *,
    data: bytes,
    source: str,
    address: str | None,
    user: Any = None,
    calling_ae: str | None = None,
    expected_study_uid: str | None = None,
) -> IngestOutcome:
    """Validate, store once, index, audit and announce one DICOM file; or quarantine it.

    ``expected_study_uid``: a STOW-RS request to /studies/{uid} accepts that study only.
    Infrastructure failures (database, disk) raise: they are not the sender's fault, so the
    file is not quarantined and the sender may retry.
    """
    origin = {"source": source, "address": address, "user": user, "calling_ae": calling_ae}
    header: Dataset | None = None
    try:
        header = _parse(data)
        facts = _checked_facts(header, data, expected_study_uid=expected_study_uid)
        return _index(facts=facts, data=data, **origin)
    except _AlreadyStored:
        return _duplicate_record(sop_instance_uid=facts.sop_instance_uid, **origin)
    except DicomInputError as error:
        return _quarantine(data=data, error=error, header=header, **origin)


# --- Validation -----------------------------------------------------------------------------


def _parse(data: bytes) -> Dataset:
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        raise NotDicomError(_INSTANCE, "not a DICOM Part-10 file (no 'DICM' prefix)") from None
    except _PARSE_ERRORS as error:
        reason = f"truncated or corrupt DICOM ({type(error).__name__} while parsing)"
        raise TruncatedFileError(_INSTANCE, reason) from None
    return dataset


def _check_complete(dataset: Dataset) -> None:
    if len(dataset) == 0:  # pydicom drops the whole data set when it ends inside a sequence
        raise TruncatedFileError(_INSTANCE, "truncated or corrupt DICOM (no data set read)")
    if _last_element_cut_short(dataset):
        raise TruncatedFileError(_INSTANCE, "truncated DICOM (file ends inside an element)")


def _last_element_cut_short(dataset: Dataset) -> bool:
    """pydicom keeps a value cut short by the end of the file; its declared length tells."""
    last = dataset.get_item(max(dataset.keys()))
    length = getattr(last, "length", 0)
    value = getattr(last, "value", None)
    defined = length not in (0, 0xFFFFFFFF)
    return defined and isinstance(value, bytes) and len(value) < length


def _checked_facts(dataset: Dataset, data: bytes, *, expected_study_uid: str | None) -> "_Facts":
    try:
        _check_complete(dataset)
        _check_uids(dataset)
        _check_pixel_data(dataset, data)
        facts = _facts(dataset)
    except DicomInputError:
        raise
    except (*_PARSE_ERRORS, AttributeError) as error:  # elements are decoded lazily, on access
        reason = f"corrupt DICOM ({type(error).__name__} while reading its elements)"
        raise TruncatedFileError(_INSTANCE, reason) from None
    if expected_study_uid is not None and facts.study_instance_uid != expected_study_uid:
        reason = (
            f"StudyInstanceUID {facts.study_instance_uid} is not the study "
            f"{expected_study_uid} requested"
        )
        raise InvalidInstanceError(_INSTANCE, reason)
    return facts


def _check_uids(dataset: Dataset) -> None:
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        value = str(dataset.get(keyword, "") or "").strip()
        if not value:
            raise InvalidInstanceError(_INSTANCE, f"no {keyword}")
        if len(value) > UID_LENGTH or not _UID.fullmatch(value):
            raise InvalidInstanceError(_INSTANCE, f"{keyword} is not a valid UID")
    meta_uid = str(dataset.file_meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
    if meta_uid and meta_uid != str(dataset.SOPInstanceUID).strip():
        reason = "file meta MediaStorageSOPInstanceUID differs from the SOPInstanceUID"
        raise InvalidInstanceError(_INSTANCE, reason)


def _check_pixel_data(dataset: Dataset, data: bytes) -> None:
    if not any(keyword in dataset for keyword in _PIXEL_KEYWORDS):
        _refuse_without_pixels(dataset, data)
    if "PixelData" not in dataset:
        return  # float pixel data is always native; the reader checks its length
    transfer_syntax = dataset.file_meta.get("TransferSyntaxUID")
    if transfer_syntax is None or not transfer_syntax.is_transfer_syntax:
        reason = f"transfer syntax {transfer_syntax or 'missing'} is not supported"
        raise UnsupportedTransferSyntaxError(_INSTANCE, reason)
    if transfer_syntax.is_encapsulated:
        _check_fragments(dataset)
    else:
        _check_native_length(dataset)


def _refuse_without_pixels(dataset: Dataset, data: bytes) -> None:
    if PIXEL_DATA_TAG in data[132:]:  # after the preamble; pydicom dropped a cut-short element
        raise TruncatedFileError(_INSTANCE, "truncated DICOM (pixel data cut short)")
    sop_class = pydicom.uid.UID(str(dataset.SOPClassUID).strip())
    if _NON_IMAGE_SOP_CLASS_NAMES.search(sop_class.name):
        reason = f"SOP class {sop_class.name} is not an image; only images are accepted"
        raise UnsupportedInstanceError(_INSTANCE, reason)
    raise NoPixelDataError(_INSTANCE, f"no pixel data in a {sop_class.name} instance")


def _check_native_length(dataset: Dataset) -> None:
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        bits = int(dataset.BitsAllocated)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        reason = "no valid Rows, Columns or BitsAllocated for the pixel data"
        raise InvalidInstanceError(_INSTANCE, reason) from None
    expected = (rows * columns * samples * frames * bits + 7) // 8
    actual = len(dataset.PixelData)
    if actual < expected:
        reason = f"truncated pixel data ({actual} bytes, {expected} expected)"
        raise TruncatedFileError(_INSTANCE, reason)


def _check_fragments(dataset: Dataset) -> None:
    buffer = io.BytesIO(dataset.PixelData)
    try:
        parse_basic_offsets(buffer)
        fragments = sum(1 for _ in generate_fragments(buffer))
    except (ValueError, struct.error):
        fragments = 0
    if fragments == 0:
        reason = "encapsulated pixel data holds no readable fragment"
        raise TruncatedFileError(_INSTANCE, reason)


# --- What the index keeps -------------------------------------------------------------------


def _facts(dataset: Dataset) -> _Facts:
    return _Facts(
        study_instance_uid=str(dataset.StudyInstanceUID).strip(),
        series_instance_uid=str(dataset.SeriesInstanceUID).strip(),
        sop_instance_uid=str(dataset.SOPInstanceUID).strip(),
        sop_class_uid=str(dataset.SOPClassUID).strip(),
        accession_number=_text(dataset, "AccessionNumber", 64),
        patient_id=_text(dataset, "PatientID", 64),
        patient_name=_text(dataset, "PatientName", 256),
        study_datetime=_study_datetime(dataset),
        study_date=_study_date(dataset),
        study_time=_study_time(dataset),
        modality=_text(dataset, "Modality", 16).upper(),
        series_number=_integer(dataset, "SeriesNumber"),
        series_description=_text(dataset, "SeriesDescription", 256),
        body_part=_text(dataset, "BodyPartExamined", 64).upper(),
        instance_number=_integer(dataset, "InstanceNumber"),
        slice_position=_slice_position(dataset),
    )


def _text(dataset: Dataset, keyword: str, limit: int) -> str:
    try:
        value = str(dataset.get(keyword, "") or "")
    except (ValueError, TypeError, LookupError):  # an undecodable character set
        return ""
    return value.replace("\x00", "").strip()[:limit]  # Postgres text refuses NUL


def _integer(dataset: Dataset, keyword: str) -> int | None:
    try:
        value = int(dataset.get(keyword))
    except (TypeError, ValueError):
        return None
    return value if -(2**31) <= value < 2**31 else None


def _floats(dataset: Dataset, keyword: str, count: int) -> list[float] | None:
    try:
        values = [float(v) for v in dataset.get(keyword) or ()]
    except (TypeError, ValueError):
        return None
    return values if len(values) == count else None


def _slice_position(dataset: Dataset) -> float | None:
    """ImagePositionPatient along the slice normal (row x column direction), in mm."""
    orientation = _floats(dataset, "ImageOrientationPatient", 6)
    position = _floats(dataset, "ImagePositionPatient", 3)
    if orientation is None or position is None:
        return None
    (rx, ry, rz), (cx, cy, cz) = orientation[:3], orientation[3:]
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    return sum(p * n for p, n in zip(position, normal, strict=True))


_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")
_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")


def _study_date(dataset: Dataset) -> date | None:
    """StudyDate as the header gives it (the study's own local date), if it is a real date."""
    text = _text(dataset, "StudyDate", 8)
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _study_time(dataset: Dataset) -> str:
    """StudyTime as the header gives it (HHMMSS.FFFFFF, parts optional), or empty."""
    text = _text(dataset, "StudyTime", 16)
    return text if _TIME.fullmatch(text) else ""


def _study_datetime(dataset: Dataset) -> datetime | None:
    """StudyDate + StudyTime in the study's own offset if it gives one, else the site's zone."""
    day = _text(dataset, "StudyDate", 8)
    time = _TIME.fullmatch(_text(dataset, "StudyTime", 16))
    if not re.fullmatch(r"\d{8}", day):
        return None
    hour, minute, second, fraction = (time.groups() if time else None) or (0, 0, 0, None)
    try:
        naive = datetime(
            int(day[:4]),
            int(day[4:6]),
            int(day[6:]),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")),
        )
    except ValueError:
        return None
    offset = _OFFSET.fullmatch(_text(dataset, "TimezoneOffsetFromUTC", 5))
    if offset is None:
        return timezone.make_aware(naive, timezone.get_default_timezone())
    sign = -1 if offset.group(1) == "-" else 1
    delta = timedelta(hours=int(offset.group(2)), minutes=int(offset.group(3)))
    return naive.replace(tzinfo=dt_timezone(sign * delta))


# --- Storing and indexing -------------------------------------------------------------------


def _media_root() -> Path:
    return Path(settings.MEDIA_ROOT)


def instance_relative_path(*, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where an instance lives under the media root (the UIDs were validated: digits and dots)."""
    return Path(STUDIES_DIR) / study_uid / series_uid / f"{sop_uid}.dcm"


def _write_new(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically unless it exists; returns whether this call wrote it.

    The bytes go to a temporary file that is synced and then hard-linked into place, so a reader
    never sees half a file and an existing file is never overwritten.
    """
    _make_dirs_durably(path.parent)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        _fsync_dir(path.parent)  # the new name survives a power loss, as the row will
        return True
    finally:
        os.unlink(temporary)


def _make_dirs_durably(folder: Path) -> None:
    """mkdir -p, syncing each parent whose entry was added (the database commits durably, so
    must the folders its rows point into)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:  # made by a concurrent ingest
            continue
        _fsync_dir(new.parent)


def _fsync_dir(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _file_digest(path: Path) -> tuple[str, int]:
    with path.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256")
    return digest.hexdigest(), path.stat().st_size


@transaction.atomic
def _index(
    *,
    facts: _Facts,
    data: bytes,
    source: str,
    address: str | None,
    user: Any,
    calling_ae: str | None,
) -> IngestOutcome:
    if Instance.objects.filter(sop_instance_uid=facts.sop_instance_uid).exists():
        raise _AlreadyStored
    study, new_study = _study_get_or_create(facts)
    series = _series_get_or_create(facts, study=study)
    relative = instance_relative_path(
        study_uid=facts.study_instance_uid,
        series_uid=facts.series_instance_uid,
        sop_uid=facts.sop_instance_uid,
    )
    sha256, size = hashlib.sha256(data).hexdigest(), len(data)
    if not _write_new(_media_root() / relative, data):
        # Left by a concurrent send of the same instance, or by an attempt whose transaction
        # failed after writing: a complete file of this SOPInstanceUID either way; index it.
        sha256, size = _file_digest(_media_root() / relative)
    try:
        with transaction.atomic():  # a savepoint: a concurrent twin may insert first
            instance = Instance.objects.create(
                series=series,
                sop_instance_uid=facts.sop_instance_uid,
                sop_class_uid=facts.sop_class_uid,
                path=str(relative),
                sha256=sha256,
                size_bytes=size,
                instance_number=facts.instance_number,
                slice_position=facts.slice_position,
            )
    except IntegrityError:
        raise _AlreadyStored from None
    audit_record(
        action=AuditAction.INSTANCE_RECEIVED,
        user=user,
        address=address,
        study=study,
        obj=instance,
        details=_origin_details(source, calling_ae, outcome=IngestStatus.STORED),
    )
    scheduling.study_instance_arrived(study=study, new_study=new_study)
    if new_study:
        logger.info("New study %s arriving by %s", study.pk, source)
    return IngestOutcome(
        status=IngestStatus.STORED,
        study_id=study.pk,
        series_id=series.pk,
        instance_id=instance.pk,
        study_instance_uid=facts.study_instance_uid,
        series_instance_uid=facts.series_instance_uid,
        sop_instance_uid=facts.sop_instance_uid,
        sop_class_uid=facts.sop_class_uid,
    )


def _study_get_or_create(facts: _Facts) -> tuple[Study, bool]:
    """The first instance of a study fills in its header; later ones do not change it."""
    return Study.objects.get_or_create(
        study_instance_uid=facts.study_instance_uid,
        defaults={
            "accession_number": facts.accession_number,
            "patient_id": facts.patient_id,
            "patient_name": facts.patient_name,
            "study_datetime": facts.study_datetime,
            "study_date": facts.study_date,
            "study_time": facts.study_time,
        },
    )


def _series_get_or_create(facts: _Facts, *, study: Study) -> Series:
    series, _ = Series.objects.get_or_create(
        series_instance_uid=facts.series_instance_uid,
        defaults={
            "study": study,
            "modality": facts.modality,
            "series_number": facts.series_number,
            "series_description": facts.series_description,
            "body_part": facts.body_part,
        },
    )
    if series.study_id != study.pk:
        reason = f"SeriesInstanceUID {facts.series_instance_uid} belongs to another study"
        raise InvalidInstanceError(_INSTANCE, reason)
    return series


def _origin_details(source: str, calling_ae: str | None, **extra: Any) -> dict[str, Any]:
    return {"source": source, **({"calling_ae": calling_ae} if calling_ae else {}), **extra}


@transaction.atomic
def _duplicate_record(
    *,
    sop_instance_uid: str,
    source: str,
    address: str | None,
    user: Any,
    calling_ae: str | None,
) -> IngestOutcome:
    """A resend changes nothing; the attempt is still audited, as every arrival is."""
    instance = Instance.objects.select_related("series__study").get(
        sop_instance_uid=sop_instance_uid
    )
    study = instance.series.study
    audit_record(
        action=AuditAction.INSTANCE_RECEIVED,
        user=user,
        address=address,
        study=study,
        obj=instance,
        details=_origin_details(source, calling_ae, outcome=IngestStatus.DUPLICATE),
    )
    return IngestOutcome(
        status=IngestStatus.DUPLICATE,
        study_id=study.pk,
        series_id=instance.series_id,
        instance_id=instance.pk,
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=instance.series.series_instance_uid,
        sop_instance_uid=instance.sop_instance_uid,
        sop_class_uid=instance.sop_class_uid,
    )


# --- Quarantine -----------------------------------------------------------------------------


def _uid_of(header: Dataset | None, keyword: str) -> str:
    value = str(header.get(keyword, "") or "").strip() if header is not None else ""
    return value if len(value) <= UID_LENGTH and _UID.fullmatch(value) else ""


def _failure_code(error: DicomInputError) -> int:
    return next(code for kind, code in _FAILURE_CODES if isinstance(error, kind))


def _quarantine(
    *,
    data: bytes,
    error: DicomInputError,
    header: Dataset | None,
    source: str,
    address: str | None,
    user: Any,
    calling_ae: str | None,
) -> IngestOutcome:
    uids = {
        keyword: _uid_of(header, keyword)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
    }
    record = quarantine_record(
        data=data,
        reason=error.reason,
        source=source,
        address=address,
        user=user,
        calling_ae=calling_ae,
        sop_instance_uid=uids["SOPInstanceUID"],
    )
    return IngestOutcome(
        status=IngestStatus.QUARANTINED,
        reason=error.reason,
        failure_code=_failure_code(error),
        quarantine_id=record.pk,
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
    )


def quarantine_record(
    *,
    data: bytes,
    reason: str,
    source: str,
    address: str | None,
    user: Any = None,
    calling_ae: str | None = None,
    sop_instance_uid: str = "",
) -> QuarantinedFile:
    """Keep a refused file and a JSON side-car under quarantine/, list it for admins, audit it."""
    received_at = timezone.now()
    sha256 = hashlib.sha256(data).hexdigest()
    relative = _quarantine_file(data=data, sha256=sha256, received_at=received_at)
    facts = {
        "reason": reason,
        "source": source,
        "calling_ae": calling_ae or "",
        "client_address": address or "",
        "sop_instance_uid": sop_instance_uid,
        "received_at": received_at.isoformat(),
        "sha256": sha256,
        "size_bytes": len(data),
    }
    side_car = json.dumps(facts, indent=2).encode()
    _write_new(_media_root() / relative.with_suffix(".json"), side_car)
    with transaction.atomic():
        record = QuarantinedFile.objects.create(
            path=str(relative),
            reason=reason,
            source=source,
            calling_ae=(calling_ae or "")[:16],
            client_address=address,
            sop_instance_uid=sop_instance_uid,
            received_at=received_at,
            sha256=sha256,
            size_bytes=len(data),
        )
        audit_record(
            action=AuditAction.INSTANCE_QUARANTINED,
            user=user,
            address=address,
            obj=record,
            details=_origin_details(source, calling_ae, reason=reason),
        )
    logger.warning("Refused a file from %s (quarantine %s): %s", source, record.pk, reason)
    return record


def _quarantine_file(*, data: bytes, sha256: str, received_at: datetime) -> Path:
    stamp = received_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    for attempt in range(100):
        suffix = f"-{attempt}" if attempt else ""
        relative = Path(QUARANTINE_DIR) / f"{stamp}-{sha256[:12]}{suffix}.dcm"
        if _write_new(_media_root() / relative, data):
            return relative
    raise FileExistsError(f"no free quarantine name for {stamp}-{sha256[:12]}")
