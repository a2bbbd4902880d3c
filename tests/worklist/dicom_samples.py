"""DICOM inputs for the ingest, receiver and DICOMweb tests: phantom CT slices and small images."""

import io
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from inference.phantom import generate_study, sop_instance_uids, write_study

PATIENT_NAME = "SECRET^PATIENT"
PATIENT_ID = "PHI-123456"


@cache
def phantom_series(n_slices: int = 5, seed: int = 7) -> tuple[bytes, ...]:
    """One phantom head CT series as Part-10 bytes, most inferior slice first."""
    study = generate_study(seed, n_slices=n_slices, subtypes=[])
    with tempfile.TemporaryDirectory() as directory:
        paths = write_study(
            study, Path(directory), patient_name=PATIENT_NAME, patient_id=PATIENT_ID
        )
        return tuple(path.read_bytes() for path in paths)


@cache
def phantom_positions(n_slices: int = 5, seed: int = 7) -> tuple[float, ...]:
    study = generate_study(seed, n_slices=n_slices, subtypes=[])
    return tuple(float(z) for z in study.positions_mm)


def phantom_sop_uids(n_slices: int = 5, seed: int = 7) -> list[str]:
    return sop_instance_uids(generate_study(seed, n_slices=n_slices, subtypes=[]))


def part10(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def small_image(
    *,
    modality: str = "MR",
    sop_class: str = MRImageStorage,
    study_uid: str | None = None,
    rows: int = 16,
    columns: int = 16,
    frames: int = 1,
    with_pixels: bool = True,
) -> Dataset:
    """A tiny valid image instance (16-bit, native little endian) of any modality."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.StudyDate = "20250102"
    ds.StudyTime = "030405"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if with_pixels:
        pixels = np.arange(frames * rows * columns, dtype=np.uint16).reshape(frames, rows, columns)
        ds.PixelData = (pixels % 4096).astype(np.uint16).tobytes()
    return ds


def ct_without_pixels() -> Dataset:
    return small_image(modality="CT", sop_class=CTImageStorage, with_pixels=False)


def structured_report() -> Dataset:
    ds = small_image(modality="SR", sop_class=ComprehensiveSRStorage, with_pixels=False)
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(ds, keyword)
    return ds


def stub_scheduling(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the completeness checks ingest schedules instead of queueing Celery tasks that no
    worker in these tests would take (and that a later test's worker might)."""
    scheduled: list[int] = []

    def record(study_id: int, delay: float | None = None) -> bool:
        scheduled.append(study_id)
        return True

    monkeypatch.setattr("worklist.scheduling.schedule_completeness_check", record)
    return scheduled
