import hashlib
import io
import json
import logging
import threading
import warnings
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connections
from django.test import Client

from tests.worklist.dicom_samples import (
    PATIENT_ID,
    PATIENT_NAME,
    ct_without_pixels,
    part10,
    phantom_positions,
    phantom_series,
    small_image,
    structured_report,
    stub_scheduling,
)
from worklist import ingest
from worklist.ingest import IngestStatus, instance_ingest
from worklist.models import (
    AuditAction,
    AuditEvent,
    IngestSource,
    Instance,
    QuarantinedFile,
    Series,
    Study,
)


@pytest.fixture(autouse=True)
def scheduled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return stub_scheduling(monkeypatch)


def _ingest(data: bytes, **kwargs: object) -> ingest.IngestOutcome:
    options = {"source": IngestSource.UPLOAD, "address": "10.0.0.7", **kwargs}
    return instance_ingest(data=data, **options)  # type: ignore[arg-type]


def _media(relative: str) -> Path:
    return Path(settings.MEDIA_ROOT) / relative


@pytest.mark.django_db
class TestAValidSeries:
    def test_it_is_stored_once_per_instance_under_its_uids(self) -> None:
        outcomes = [_ingest(data) for data in phantom_series()]
        assert [o.status for o in outcomes] == [IngestStatus.STORED] * len(outcomes)
        for data, instance in zip(phantom_series(), Instance.objects.order_by("id"), strict=True):
            header = pydicom.dcmread(_media(instance.path))
            assert instance.path == (
                f"studies/{header.StudyInstanceUID}/{header.SeriesInstanceUID}/"
                f"{header.SOPInstanceUID}.dcm"
            )
            assert _media(instance.path).read_bytes() == data
            assert instance.sha256 == hashlib.sha256(data).hexdigest()
            assert instance.size_bytes == len(data)

    def test_it_indexes_the_study_series_and_slices(self) -> None:
        for data in phantom_series():
            _ingest(data)
        study = Study.objects.get()
        assert (study.patient_name, study.patient_id) == (PATIENT_NAME, PATIENT_ID)
        assert study.accession_number.startswith("PHA")
        assert study.study_datetime is not None
        series = Series.objects.get()
        assert (series.study, series.modality, series.body_part) == (study, "CT", "HEAD")
        assert series.series_description.startswith("AXIAL BRAIN")
        instances = Instance.objects.order_by("instance_number")
        assert [i.instance_number for i in instances] == [1, 2, 3, 4, 5]
        positions = [i.slice_position for i in instances]
        assert positions == pytest.approx(list(phantom_positions()), abs=1e-3)

    def test_each_arrival_is_audited_with_its_source(self) -> None:
        _ingest(phantom_series()[0], source=IngestSource.C_STORE, calling_ae="CT_SCANNER")
        event = AuditEvent.objects.get(action=AuditAction.INSTANCE_RECEIVED)
        assert event.study == Study.objects.get()
        assert event.object_type == "Instance"
        assert event.client_address == "10.0.0.7"
        assert event.details == {
            "source": "c-store",
            "calling_ae": "CT_SCANNER",
            "outcome": "stored",
        }

    def test_the_outcome_names_the_new_rows(self) -> None:
        outcome = _ingest(phantom_series()[0])
        instance = Instance.objects.select_related("series__study").get()
        assert outcome.accepted
        assert (outcome.instance_id, outcome.series_id, outcome.study_id) == (
            instance.pk,
            instance.series.pk,
            instance.series.study.pk,
        )
        assert outcome.sop_instance_uid == instance.sop_instance_uid
        assert outcome.failure_code is None

    def test_a_jpeg_2000_instance_is_stored_as_received(self) -> None:
        dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(phantom_series()[1]))
        dataset.compress(pydicom.uid.JPEG2000Lossless)
        data = part10(dataset)
        assert _ingest(data).status == IngestStatus.STORED
        assert _media(Instance.objects.get().path).read_bytes() == data


@pytest.mark.django_db
class TestAResend:
    def test_it_is_a_successful_no_op(self) -> None:
        first = _ingest(phantom_series()[0])
        study = Study.objects.get()
        again = _ingest(phantom_series()[0])
        assert again.status == IngestStatus.DUPLICATE and again.accepted
        assert again.instance_id == first.instance_id
        assert Instance.objects.count() == 1
        assert Study.objects.get().last_instance_at == study.last_instance_at
        assert len(list(Path(settings.MEDIA_ROOT, "studies").rglob("*.dcm"))) == 1

    def test_it_never_creates_a_study_even_under_another_study_uid(self) -> None:
        _ingest(phantom_series()[0])
        dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(phantom_series()[0]))
        dataset.StudyInstanceUID = "1.2.3.4"
        assert _ingest(part10(dataset)).status == IngestStatus.DUPLICATE
        assert Study.objects.count() == 1

    def test_it_is_audited_as_a_duplicate(self) -> None:
        _ingest(phantom_series()[0])
        _ingest(phantom_series()[0])
        outcomes = [
            e.details["outcome"]
            for e in AuditEvent.objects.filter(action=AuditAction.INSTANCE_RECEIVED).order_by("id")
        ]
        assert outcomes == ["stored", "duplicate"]

    def test_a_file_left_by_a_failed_attempt_is_indexed_not_overwritten(self) -> None:
        data = phantom_series()[0]
        header = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
        relative = ingest.instance_relative_path(
            study_uid=header.StudyInstanceUID,
            series_uid=header.SeriesInstanceUID,
            sop_uid=header.SOPInstanceUID,
        )
        _media(str(relative)).parent.mkdir(parents=True)
        _media(str(relative)).write_bytes(data + b"\0\0")  # what the earlier attempt wrote
        assert _ingest(data).status == IngestStatus.STORED
        instance = Instance.objects.get()
        assert _media(instance.path).read_bytes() == data + b"\0\0"
        assert instance.sha256 == hashlib.sha256(data + b"\0\0").hexdigest()


@pytest.mark.django_db
class TestRefusedInput:
    def _refused(self, data: bytes, **kwargs: object) -> ingest.IngestOutcome:
        outcome = _ingest(data, calling_ae="SENDER", **kwargs)
        assert outcome.status == IngestStatus.QUARANTINED and not outcome.accepted
        assert Instance.objects.count() == 0
        return outcome

    def test_garbage_is_refused_as_not_dicom(self) -> None:
        outcome = self._refused(b"this is not a DICOM file" * 10)
        assert "not a DICOM" in outcome.reason
        assert outcome.failure_code == ingest.CANNOT_UNDERSTAND

    def test_a_file_cut_inside_its_pixel_data_is_refused_as_truncated(self) -> None:
        outcome = self._refused(phantom_series()[0][:-1000])
        assert "truncated" in outcome.reason
        assert outcome.failure_code == ingest.CANNOT_UNDERSTAND

    def test_a_file_cut_inside_its_header_is_refused(self) -> None:
        outcome = self._refused(phantom_series()[0][:700])
        assert outcome.reason

    def test_a_compressed_file_cut_short_is_refused(self) -> None:
        dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(phantom_series()[0]))
        dataset.compress(pydicom.uid.JPEG2000Lossless)
        outcome = self._refused(part10(dataset)[:-5000])
        assert "truncated" in outcome.reason

    def test_an_image_without_pixel_data_does_not_match_its_sop_class(self) -> None:
        outcome = self._refused(part10(ct_without_pixels()))
        assert outcome.reason == "no pixel data in a CT Image Storage instance"
        assert outcome.failure_code == ingest.DATA_SET_DOES_NOT_MATCH_SOP_CLASS

    def test_a_structured_report_is_refused_as_not_supported(self) -> None:
        outcome = self._refused(part10(structured_report()))
        assert "not an image" in outcome.reason
        assert outcome.failure_code == ingest.SOP_CLASS_NOT_SUPPORTED

    def test_a_uid_that_is_not_a_uid_is_refused(self) -> None:
        dataset = small_image()
        dataset.SeriesInstanceUID = "../../../etc"
        outcome = self._refused(part10(dataset))
        assert outcome.reason == "SeriesInstanceUID is not a valid UID"
        assert not Path(settings.MEDIA_ROOT, "etc").exists()

    def test_an_instance_of_another_study_than_requested_is_refused(self) -> None:
        outcome = self._refused(part10(small_image(study_uid="1.2.3")), expected_study_uid="1.2.4")
        assert outcome.reason == "StudyInstanceUID 1.2.3 is not the study 1.2.4 requested"
        assert outcome.study_instance_uid == "1.2.3"

    def test_it_is_quarantined_with_a_side_car_and_listed(self) -> None:
        data = b"\0" * 128 + b"DICM" + b"\xff" * 40
        outcome = self._refused(data)
        record = QuarantinedFile.objects.get()
        assert outcome.quarantine_id == record.pk
        assert (record.source, record.calling_ae, record.client_address) == (
            "upload",
            "SENDER",
            "10.0.0.7",
        )
        assert (record.sha256, record.size_bytes) == (hashlib.sha256(data).hexdigest(), len(data))
        assert record.path.startswith("quarantine/") and record.path.endswith(
            f"-{record.sha256[:12]}.dcm"
        )
        assert _media(record.path).read_bytes() == data
        side_car = json.loads(_media(record.path).with_suffix(".json").read_text())
        assert side_car["reason"] == record.reason
        assert (side_car["source"], side_car["calling_ae"], side_car["size_bytes"]) == (
            "upload",
            "SENDER",
            len(data),
        )

    def test_it_is_audited(self) -> None:
        self._refused(b"nope")
        event = AuditEvent.objects.get(action=AuditAction.INSTANCE_QUARANTINED)
        assert event.details["reason"].startswith("not a DICOM")
        assert event.object_type == "QuarantinedFile"

    def test_the_same_bad_file_twice_is_kept_twice(self) -> None:
        self._refused(b"nope")
        self._refused(b"nope")
        paths = set(QuarantinedFile.objects.values_list("path", flat=True))
        assert len(paths) == 2


@pytest.mark.django_db
def test_an_mr_image_is_valid_dicom_and_is_stored() -> None:
    outcome = _ingest(part10(small_image(modality="MR")))
    assert outcome.status == IngestStatus.STORED
    assert Series.objects.get().modality == "MR"
    assert QuarantinedFile.objects.count() == 0


@pytest.mark.django_db
def test_bad_files_never_stop_the_rest_of_the_study() -> None:
    series = phantom_series()
    sent = [series[0], b"garbage", series[1], series[2][:-999], series[3], series[4]]
    statuses = [_ingest(data).status for data in sent]
    assert statuses.count(IngestStatus.STORED) == 4
    assert statuses.count(IngestStatus.QUARANTINED) == 2
    assert Instance.objects.count() == 4 and QuarantinedFile.objects.count() == 2


@pytest.mark.django_db
def test_the_study_time_keeps_its_offset_from_utc() -> None:
    dataset = small_image()
    dataset.TimezoneOffsetFromUTC = "+0200"
    _ingest(part10(dataset))
    assert Study.objects.get().study_datetime == datetime(2025, 1, 2, 1, 4, 5, tzinfo=UTC)


@pytest.mark.django_db
def test_logs_never_carry_patient_data(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    odd_dates = small_image()
    odd_dates.StudyDate = "SECRET-DAY"  # pydicom would quote an invalid value in a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ingest(phantom_series()[0])
        _ingest(phantom_series()[1][:-10])
        _ingest(part10(structured_report()))
        _ingest(part10(odd_dates))
    assert caplog.records  # it does log
    said = caplog.text + " ".join(str(w.message) for w in caught)
    assert PATIENT_NAME not in said and PATIENT_ID not in said and "SECRET-DAY" not in said


@pytest.mark.django_db(transaction=True)
def test_a_new_study_is_announced_and_one_check_scheduled_per_arrival(
    scheduled: list[int],
) -> None:
    for data in phantom_series()[:3]:
        _ingest(data)
    study = Study.objects.get()
    assert scheduled == [study.pk] * 3  # the scheduler itself keeps one per quiet period


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_sends_of_one_instance_store_it_once() -> None:
    data = phantom_series()[2]
    start = threading.Barrier(4)
    outcomes: list[ingest.IngestOutcome] = []

    def send() -> None:
        start.wait()
        try:
            outcomes.append(_ingest(data))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(o.status for o in outcomes) == ["duplicate"] * 3 + ["stored"]
    assert len({o.instance_id for o in outcomes}) == 1
    assert (Study.objects.count(), Series.objects.count(), Instance.objects.count()) == (1, 1, 1)
    stored = list(Path(settings.MEDIA_ROOT).rglob("*"))
    assert [p.name for p in stored if p.is_file()] == [Path(Instance.objects.get().path).name]


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _upload(client: Client, *files: tuple[str, bytes]) -> Any:
    uploads = [SimpleUploadedFile(name, data) for name, data in files]
    return client.post("/api/uploads/", {"files": uploads})


@pytest.mark.django_db
class TestBrowserUpload:
    def test_files_are_ingested_one_by_one_with_an_outcome_each(
        self, radiologist_client: Client
    ) -> None:
        series = phantom_series()
        response = _upload(radiologist_client, ("a.dcm", series[0]), ("b.dcm", b"junk"))
        assert response.status_code == 200
        body = response.json()
        assert (body["accepted"], body["refused"]) == (1, 1)
        stored, refused = body["results"]
        assert (stored["name"], stored["status"]) == ("a.dcm", "stored")
        assert stored["instance_id"] == Instance.objects.get().pk
        assert (refused["name"], refused["status"]) == ("b.dcm", "quarantined")
        assert "not a DICOM" in refused["reason"]

    def test_a_zip_is_unpacked_and_its_bad_members_do_not_stop_the_rest(
        self, radiologist_client: Client
    ) -> None:
        series = phantom_series()
        archive = _zip(
            {
                "study/IM1.dcm": series[0],
                "study/broken.dcm": series[1][:-100],
                "study/IM3.dcm": series[2],
                "__MACOSX/._IM1.dcm": b"resource fork",
                "study/DICOMDIR": b"an index",
            }
        )
        response = _upload(radiologist_client, ("study.zip", archive))
        assert response.status_code == 200
        results = {r["name"]: r["status"] for r in response.json()["results"]}
        assert results == {
            "study.zip/study/IM1.dcm": "stored",
            "study.zip/study/broken.dcm": "quarantined",
            "study.zip/study/IM3.dcm": "stored",
        }
        assert AuditEvent.objects.filter(
            action=AuditAction.INSTANCE_RECEIVED, details__source="upload"
        ).exists()

    def test_a_member_with_a_corrupt_deflate_stream_is_refused_and_the_rest_stored(
        self, radiologist_client: Client
    ) -> None:
        """zlib.error escaped and made the whole upload a 500 with no outcomes."""
        series = phantom_series()
        archive = bytearray(_zip({"a/IM1.dcm": series[0], "a/IM2.dcm": series[1]}))
        info = zipfile.ZipFile(io.BytesIO(bytes(archive))).getinfo("a/IM2.dcm")
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        archive[start : start + 20] = b"\xff" * 20  # an invalid deflate block type
        response = _upload(radiologist_client, ("study.zip", bytes(archive)))
        assert response.status_code == 200
        results = {r["name"]: r for r in response.json()["results"]}
        assert results["study.zip/a/IM1.dcm"]["status"] == "stored"
        assert results["study.zip/a/IM2.dcm"]["status"] == "refused"
        assert "unreadable archive member" in results["study.zip/a/IM2.dcm"]["reason"]

    def test_a_broken_zip_is_quarantined(self, radiologist_client: Client) -> None:
        response = _upload(radiologist_client, ("study.zip", b"PK\x03\x04 not really"))
        assert response.status_code == 422
        assert response.json()["results"][0]["reason"] == "not a readable .zip archive"
        assert QuarantinedFile.objects.get().reason == "not a readable .zip archive"

    def test_an_archive_that_unpacks_past_the_limit_is_refused(
        self, radiologist_client: Client, settings: Any
    ) -> None:
        settings.ICH_UPLOAD_MAX_MB = 1
        archive = _zip({"a.dcm": phantom_series()[0], "b.dcm": phantom_series()[1]})
        response = _upload(radiologist_client, ("big.zip", archive))
        results = response.json()["results"]
        assert [r["status"] for r in results] == ["stored", "refused"]
        assert "ICH_UPLOAD_MAX_MB" in results[1]["reason"]

    def test_nothing_accepted_is_a_422_with_the_reasons(self, radiologist_client: Client) -> None:
        response = _upload(radiologist_client, ("x.dcm", b"junk"))
        assert response.status_code == 422
        assert response.json()["results"][0]["status"] == "quarantined"

    def test_no_files_is_a_400(self, radiologist_client: Client) -> None:
        assert radiologist_client.post("/api/uploads/", {}).status_code == 400

    def test_an_ed_physician_may_not_upload(self, ed_client: Client) -> None:
        assert _upload(ed_client, ("a.dcm", phantom_series()[0])).status_code == 403


@pytest.mark.django_db
def test_admins_see_the_quarantine_in_the_admin_site(
    admin_client_: Client, radiologist_client: Client
) -> None:
    _ingest(b"definitely not dicom")
    response = admin_client_.get("/admin/worklist/quarantinedfile/")
    assert response.status_code == 200
    assert b"not a DICOM Part-10 file" in response.content
    record = QuarantinedFile.objects.get()
    detail = admin_client_.get(f"/admin/worklist/quarantinedfile/{record.pk}/change/")
    assert detail.status_code == 200
    assert radiologist_client.get("/admin/worklist/quarantinedfile/").status_code == 403


@pytest.mark.django_db
def test_a_stored_file_and_the_folders_made_for_it_are_synced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The row commits durably, so the file's name and each new folder's entry are synced too:
    after a power loss a stored instance must not point at nothing."""
    synced: list[Path] = []
    real = ingest._fsync_dir
    monkeypatch.setattr(ingest, "_fsync_dir", lambda folder: (synced.append(folder), real(folder)))
    outcome = _ingest(phantom_series()[0])
    path = _media(Instance.objects.get(pk=outcome.instance_id).path)
    series_dir, study_dir = path.parent, path.parent.parent
    assert synced[-1] == series_dir  # the new name, after the link
    assert study_dir in synced and study_dir.parent in synced  # each new folder's entry
