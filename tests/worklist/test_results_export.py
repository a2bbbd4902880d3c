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
from tests.worklist.dicom_samples import phantom_series, stub_scheduling
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
