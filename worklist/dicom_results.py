"""AI results out as DICOM: a Structured Report (TID 1500 measurement report) and a derived
secondary-capture series of heatmap overlays, written beside the result and optionally sent to a
PACS by C-STORE.

Codes for the haemorrhage classes use a private coding scheme (99ICHTRIAGE) rather than guessed
SNOMED codes; Yes/No and units use SNOMED CT and UCUM.
"""

import io
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from django.conf import settings
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from worklist.media import media_path
from worklist.models import AIResult, Finding, HaemorrhageClass, Instance

logger = logging.getLogger(__name__)

SCHEME = "99ICHTRIAGE"
MANUFACTURER = "ICH triage (open source, triage support, not diagnosis)"
PROCEDURE = CodedConcept("30799-1", "LN", "CT Head WO contrast")
YES = CodedConcept("373066001", "SCT", "Yes")
NO = CodedConcept("373067005", "SCT", "No")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
SR_SERIES_NUMBER = 9901
HEATMAP_SERIES_NUMBER = 9902


def sr_path(result: AIResult) -> Path:
    return Path(settings.MEDIA_ROOT) / "results" / str(result.pk) / "report-sr.dcm"


def heatmap_series_dir(result: AIResult) -> Path:
    return Path(settings.MEDIA_ROOT) / "results" / str(result.pk) / "heatmap-series"


def _instances(result: AIResult) -> list[Instance]:
    uids = [row["sop_instance_uid"] for row in result.slice_probabilities]
    by_uid = {i.sop_instance_uid: i for i in Instance.objects.filter(sop_instance_uid__in=uids)}
    return [by_uid[uid] for uid in uids if uid in by_uid]


def structured_report(result: AIResult) -> pydicom.Dataset:
    """TID 1500: per class a measurement group with the probability, the flag and the key slice."""
    instances = _instances(result)
    headers = [
        _conformant(pydicom.dcmread(media_path(i.path), stop_before_pixels=True)) for i in instances
    ]
    by_uid = {h.SOPInstanceUID: h for h in headers}
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[result.model_name, result.model_version]),
            name=result.model_name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{result.model_name} {result.model_version}",
        ),
    )
    algorithm = hd.sr.AlgorithmIdentification(name=result.model_name, version=result.model_version)
    groups = [_group(result, finding, by_uid, algorithm) for finding in result.findings.all()]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=headers,
        content=report,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="AI triage support (not diagnosis)",
    )


# Patient and study attributes a derived object copies from the images (type 2: present, may
# be empty). Ingest stores what the scanner sent; a value these objects cannot carry is left
# empty in them rather than failing the export (the images themselves are not changed).
_COPIED_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")


def _conformant(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """The image's header with every copied type 2 attribute present, and a birth date, study
    date or time, or sex the standard does not allow (as some scanners send) left empty."""
    for keyword in _COPIED_TYPE_2:
        if keyword not in dataset:
            setattr(dataset, keyword, "")
    for keyword in ("PatientBirthDate", "StudyDate"):
        if not _DATE.fullmatch(str(dataset.get(keyword, "") or "")) and dataset.get(keyword):
            setattr(dataset, keyword, "")
    if not _TIME.fullmatch(str(dataset.get("StudyTime", "") or "")) and dataset.get("StudyTime"):
        dataset.StudyTime = ""
    if str(dataset.get("PatientSex", "") or "") not in ("", "M", "F", "O"):
        dataset.PatientSex = ""
    return dataset


def _group(
    result: AIResult,
    finding: Finding,
    by_uid: dict[str, pydicom.Dataset],
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    label = HaemorrhageClass(finding.haemorrhage_class).label
    key_uid = result.key_slices.get(finding.haemorrhage_class)
    source = []
    if key_uid in by_uid:
        source = [hd.sr.SourceImageForMeasurementGroup(by_uid[key_uid].SOPClassUID, key_uid)]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=f"{finding.haemorrhage_class} (AI)"
        ),
        finding_type=CodedConcept(f"ICH-{finding.haemorrhage_class.upper()}", SCHEME, label),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=CodedConcept("ICH-PROB", SCHEME, f"Probability of {label.lower()}"),
                value=round(float(finding.probability), 4),
                unit=NO_UNITS,
                algorithm_id=algorithm,
            ),
            *(
                [
                    hd.sr.Measurement(
                        name=CodedConcept("ICH-OP", SCHEME, "Operating point of the flag"),
                        value=round(float(result.thresholds[finding.haemorrhage_class]), 4),
                        unit=NO_UNITS,
                        algorithm_id=algorithm,
                    )
                ]
                if finding.haemorrhage_class in result.thresholds
                else []
            ),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                CodedConcept("ICH-FLAG", SCHEME, "Flagged at the operating point"),
                YES if finding.flagged else NO,
            )
        ],
        source_images=source or None,
    )


def heatmap_series(result: AIResult) -> list[pydicom.Dataset]:
    """One RGB secondary-capture image per slice with attention: the slice in a brain window with
    the flagged classes' Grad-CAM in red."""
    series_uid = generate_uid()
    images = []
    for number, instance in enumerate(_instances(result), start=1):
        maps = [
            np.asarray(_png(media_path(slices[instance.sop_instance_uid])), dtype=np.float32)
            for slices in result.heatmaps.values()
            if instance.sop_instance_uid in slices
        ]
        if not maps:
            continue
        source = _conformant(pydicom.dcmread(media_path(instance.path)))
        images.append(_overlay(source, np.max(maps, axis=0) / 255, series_uid, number))
    return images


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def _overlay(
    source: pydicom.Dataset, heat: np.ndarray, series_uid: str, number: int
) -> pydicom.Dataset:
    hu = source.pixel_array * float(getattr(source, "RescaleSlope", 1)) + float(
        getattr(source, "RescaleIntercept", 0)
    )
    gray = np.clip((hu - 0.0) / 80.0, 0, 1)[..., None] * np.ones(3)  # brain window 40/80
    red = np.zeros_like(gray)
    red[..., 0] = 1.0
    alpha = 0.5 * heat[..., None]
    rgb = ((gray * (1 - alpha) + red * alpha) * 255).round().astype(np.uint8)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=HEATMAP_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=number,
        manufacturer=MANUFACTURER,
        pixel_spacing=(float(source.PixelSpacing[0]), float(source.PixelSpacing[1])),  # type: ignore[arg-type]
        patient_orientation=_patient_orientation(source),
    )
    image.SeriesDescription = "AI attention maps (triage support, not diagnosis)"
    image.DerivationDescription = "Grad-CAM of the flagged classes over the brain window"
    return image


_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, +y, +z in the patient system


def _patient_orientation(source: pydicom.Dataset) -> tuple[str, str]:
    """PatientOrientation of the rows and columns, from the slice's ImageOrientationPatient
    (the dominant axis of each; a secondary capture in the patient system must carry it)."""
    try:
        cosines = [float(v) for v in source.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return ("L", "P")  # the usual axial slice
    if len(cosines) != 6:
        return ("L", "P")

    def letter(direction: list[float]) -> str:
        axis = int(np.argmax(np.abs(direction)))
        return _AXIS_LETTERS[axis][0 if direction[axis] >= 0 else 1]

    return letter(cosines[:3]), letter(cosines[3:])


def write_results(result: AIResult) -> list[Path]:
    """Writes the heatmap series, then the SR, beside the result; returns the files.

    The SR is written last and atomically, so its presence means the export is complete (a
    download never sees half of it). A repeat (a redelivered or retried task) returns the files
    already written: their UIDs stay the ones a PACS may have received."""
    report_path, folder = sr_path(result), heatmap_series_dir(result)
    if report_path.exists():
        return [report_path, *sorted(folder.glob("*.dcm"))]
    shutil.rmtree(folder, ignore_errors=True)  # what an interrupted attempt left
    folder.mkdir(parents=True)
    written = []
    for image in heatmap_series(result):
        target = folder / f"{image.InstanceNumber:04d}.dcm"
        image.save_as(target, enforce_file_format=True)
        written.append(target)
    partial = report_path.with_name(f".{report_path.name}.partial")
    structured_report(result).save_as(partial, enforce_file_format=True)
    os.replace(partial, report_path)
    return [report_path, *written]


def results_zip(result: AIResult) -> bytes:
    """The SR and the heatmap series in one zip for download; empty until the export is done."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        if not sr_path(result).exists():
            return b""
        archive.write(sr_path(result), "report-sr.dcm")
        for path in sorted(heatmap_series_dir(result).glob("*.dcm")):
            archive.write(path, f"heatmap-series/{path.name}")
    return buffer.getvalue()


class ResultsNotDeliveredError(ConnectionError):
    """The destination refused some result files (the task retries with backoff)."""


def send_results(paths: list[Path]) -> int:
    """C-STORE the result files to the configured destination (ICH_RESULTS_DESTINATION).

    Returns how many were stored. A refused association, or any file the peer does not store
    with a success or warning status, raises (a ConnectionError: the task retries)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        Comprehensive3DSRStorage,
        SecondaryCaptureImageStorage,
    )

    destination = settings.ICH_RESULTS_DESTINATION
    if not destination:
        return 0
    ae_title, host, port = destination
    ae = AE(ae_title=settings.ICH_DICOM_AE_TITLE)
    ae.add_requested_context(Comprehensive3DSRStorage)  # what structured_report writes
    ae.add_requested_context(SecondaryCaptureImageStorage)
    association = ae.associate(host, port, ae_title=ae_title)
    if not association.is_established:
        raise ConnectionError(f"could not associate with {ae_title}@{host}:{port}")
    sent, refused = 0, []
    try:
        for path in paths:
            status = association.send_c_store(pydicom.dcmread(path))
            code = int(getattr(status, "Status", 0xFFFF))
            if code == 0x0000 or code in (0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF:
                sent += 1  # success, or a warning: the peer stored it
            else:
                refused.append(f"{path.name}: 0x{code:04X}")
    finally:
        association.release()
    if refused:
        raise ResultsNotDeliveredError(
            f"{ae_title}@{host}:{port} did not store {len(refused)} of {len(paths)} result "
            f"files ({'; '.join(refused[:5])})"
        )
    return sent
