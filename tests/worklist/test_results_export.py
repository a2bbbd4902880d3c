"""Results out as DICOM, C-STOREd to a real peer: dcmtk's storescp plays the PACS."""

import io
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from django.test import override_settings

from tests.factories import scoring_output
from tests.worklist.dicom_samples import part10, phantom_series, stub_scheduling
from worklist import dicom_results, scoring
from worklist.ingest import IngestStatus, instance_ingest
from worklist.models import AIResult, IngestSource, Study, StudyStatus

pytestmark = pytest.mark.django_db


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp on a free port, AE title PACS, writing what it receives to a folder."""
    storescp = shutil.which("storescp", path="/usr/bin:/usr/local/bin")
    if storescp is None:
        pytest.fail("dcmtk's storescp is missing: `make test` installs Debian's dcmtk")
    port, received = _free_port(), tmp_path / "pacs"
    received.mkdir()
    process = subprocess.Popen(
        [storescp, "--aetitle", "PACS", "--output-directory", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("storescp did not start listening")
        yield port, received
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def scored_result(monkeypatch: pytest.MonkeyPatch) -> AIResult:
    """A phantom study ingested for real and scored with a given output (no model needed)."""
    stub_scheduling(monkeypatch)
    uids = []
    for data in phantom_series(4):
        outcome = instance_ingest(data=data, source=IngestSource.UPLOAD, address="10.0.0.9")
        assert outcome.status == IngestStatus.STORED
        uids.append(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    study = Study.objects.get()
    study.transition_to(StudyStatus.QUEUED)
    result = scoring.study_scoring_start(study_id=study.pk, model_name="m", model_version="1")
    assert result is not None
    heat = np.zeros((len(uids), 512, 512), np.uint8)
    heat[1:3, 100:200, 300:400] = 255  # attention on slices 1 and 2 only
    output = scoring_output(uids, heatmap=heat)
    return scoring.study_scoring_finish(result_id=result.pk, output=output)


def test_the_report_and_heatmap_series_reach_the_destination(
    pacs: tuple[int, Path], scored_result: AIResult
) -> None:
    port, received = pacs
    paths = dicom_results.write_results(scored_result)
    with override_settings(ICH_RESULTS_DESTINATION=("PACS", "127.0.0.1", port)):
        assert dicom_results.send_results(paths) == len(paths) == 3  # SR + 2 slices with maps
    arrived = {}
    for _ in range(50):
        arrived = {pydicom.dcmread(p).SOPInstanceUID: p for p in received.iterdir()}
        if len(arrived) == len(paths):
            break
        time.sleep(0.1)
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in paths}
    assert set(arrived) == set(sent)
    report = next(d for d in sent.values() if d.Modality == "SR")
    study = scored_result.study
    assert report.StudyInstanceUID == study.study_instance_uid
    stored = pydicom.dcmread(arrived[report.SOPInstanceUID])
    assert stored.ContentSequence == report.ContentSequence  # the peer kept the whole report


def test_a_destination_that_is_not_listening_raises_for_a_retry(scored_result: AIResult) -> None:
    paths = dicom_results.write_results(scored_result)
    destination = ("PACS", "127.0.0.1", _free_port())
    with (
        override_settings(ICH_RESULTS_DESTINATION=destination),
        pytest.raises(ConnectionError, match="could not associate"),
    ):
        dicom_results.send_results(paths)


def test_a_peer_that_refuses_the_files_raises_with_their_status(
    scored_result: AIResult, tmp_path: Path
) -> None:
    """A PACS that answers C-STORE with an error status: nothing is counted as delivered."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        Comprehensive3DSRStorage,
        SecondaryCaptureImageStorage,
    )

    scp = AE(ae_title="FULLPACS")
    scp.add_supported_context(Comprehensive3DSRStorage)
    scp.add_supported_context(SecondaryCaptureImageStorage)
    port = _free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xA700)]
    )
    try:
        paths = dicom_results.write_results(scored_result)
        with (
            override_settings(ICH_RESULTS_DESTINATION=("FULLPACS", "127.0.0.1", port)),
            pytest.raises(dicom_results.ResultsNotDeliveredError, match="0xA700"),
        ):
            dicom_results.send_results(paths)
    finally:
        server.shutdown()


def _scored(monkeypatch: pytest.MonkeyPatch, edit: object = None) -> AIResult:
    """A phantom study ingested for real (each header changed by ``edit``) and scored."""
    stub_scheduling(monkeypatch)
    uids = []
    for data in phantom_series(3):
        dataset = pydicom.dcmread(io.BytesIO(data))
        if callable(edit):
            edit(dataset)
        outcome = instance_ingest(
            data=part10(dataset), source=IngestSource.UPLOAD, address="10.0.0.9"
        )
        assert outcome.status == IngestStatus.STORED
        uids.append(dataset.SOPInstanceUID)
    study = Study.objects.get()
    study.transition_to(StudyStatus.QUEUED)
    result = scoring.study_scoring_start(study_id=study.pk, model_name="m", model_version="1")
    assert result is not None
    output = scoring_output(uids, heatmap=np.full((3, 512, 512), 200, np.uint8))
    output.thresholds["subdural"] = 0.0993
    return scoring.study_scoring_finish(result_id=result.pk, output=output)


def test_images_with_header_values_a_report_cannot_carry_are_still_exported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scanners send birth dates as 1970-01-01, sex as U, no accession number: highdicom
    refuses to copy such values into the report; they are left empty there instead."""

    def odd(dataset: pydicom.Dataset) -> None:
        dataset.PatientBirthDate = "1970-01-01"
        dataset.PatientSex = "U"
        del dataset.AccessionNumber

    result = _scored(monkeypatch, odd)

    paths = dicom_results.write_results(result)

    report = pydicom.dcmread(paths[0])
    assert report.Modality == "SR" and len(paths) == 4
    assert (report.PatientBirthDate, report.PatientSex, report.AccessionNumber) == ("", "", "")
    assert report.PatientID == pydicom.dcmread(paths[1]).PatientID != ""


def test_the_report_states_the_operating_point_each_flag_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = _scored(monkeypatch)

    report = dicom_results.structured_report(result)

    points = {}
    for item in _walk(report.ContentSequence):
        if item.ConceptNameCodeSequence[0].CodeValue == "ICH-OP":
            points[len(points)] = float(item.MeasuredValueSequence[0].NumericValue)
    assert sorted(points.values()) == sorted([0.5] * 5 + [0.0993])


def _walk(sequence: pydicom.Sequence) -> Iterator[pydicom.Dataset]:
    for item in sequence:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def test_an_export_that_cannot_be_written_says_so_on_the_result(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from worklist.tasks import export_results

    result = _scored(monkeypatch)
    blocked = dicom_results.heatmap_series_dir(result)
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("a file where the series folder goes")  # a real failure, no stub

    assert export_results(result.pk) == 0

    result.refresh_from_db()
    assert result.export_error == "the DICOM results could not be written (FileExistsError)"
    blocked.unlink()
    export_results(result.pk)  # a retry that works clears it
    result.refresh_from_db()
    assert result.export_error == "" and dicom_results.sr_path(result).exists()


def test_results_sent_to_the_pacs_are_audited(
    pacs: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worklist.models import AuditAction, AuditEvent
    from worklist.tasks import export_results

    port, _ = pacs
    result = _scored(monkeypatch)
    with override_settings(ICH_RESULTS_DESTINATION=("PACS", "127.0.0.1", port)):
        assert export_results(result.pk) == 4  # the SR and three heatmap slices

    (event,) = AuditEvent.objects.filter(action=AuditAction.EXPORT)
    assert event.study == result.study and event.object_id == str(result.pk)
    assert event.details == {
        "what": "ai result as DICOM, sent by C-STORE",
        "to": f"PACS@127.0.0.1:{port}",
        "files": 4,
    }


def test_a_result_a_newer_run_replaced_is_not_exported(
    pacs: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worklist.tasks import export_results

    port, received = pacs
    older = _scored(monkeypatch)
    study = older.study
    study.refresh_from_db()
    study.transition_to(StudyStatus.RECEIVING)  # a late instance
    study.transition_to(StudyStatus.QUEUED)
    newer = scoring.study_scoring_start(study_id=study.pk, model_name="m", model_version="1")
    assert newer is not None and newer.pk > older.pk

    with override_settings(ICH_RESULTS_DESTINATION=("PACS", "127.0.0.1", port)):
        assert export_results(older.pk) == 0

    assert not dicom_results.sr_path(older).exists() and not list(received.iterdir())
