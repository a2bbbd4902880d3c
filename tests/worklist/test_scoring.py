"""Scoring end to end with real parts: the C-STORE receiver, Postgres, Redis, a Celery worker
process running the model, the WebSocket and the result API.

One worker serves the module (it loads torch and the model once); each test waits until it is
idle before pytest-django empties the tables. The model is the one ICH_MODEL_PATH names, else
the shipped one; without either the module is skipped. Nothing here asserts on what the model
finds, only on what the pipeline does with it.
"""

import asyncio
import dataclasses
import io
import signal
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import redis
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.db import connections
from django.test import Client
from django.utils import timezone
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, generate_uid

from ichweb.asgi import application
from ichweb.celery import app as celery_app
from inference.phantom import PhantomStudy, generate_study, write_study
from inference.predictor import default_model_path
from tests.conftest import start_celery_worker, stop_celery_worker
from tests.worklist.dicom_samples import small_image, stub_scheduling
from worklist import scheduling, scoring, tasks
from worklist.ingest import instance_ingest
from worklist.management.commands.send_study import Receiver, dicom_files, send_files
from worklist.models import (
    AIResult,
    AIResultStatus,
    Finding,
    HaemorrhageClass,
    IngestSource,
    Study,
    StudyStatus,
)
from worklist.receiver import start_receiver

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

AE_TITLE = "ICHSCORE"
QUIET_SECONDS = 1
# A task whose worker died is redelivered after this long (production: 300 s; 10 s at least).
VISIBILITY_TIMEOUT_SECONDS = 10
# Generous: on two CPU cores the shipped model (two networks) scores a few slices a second.
SCORED_TIMEOUT = 180.0
SCORE_STUDY = "worklist.tasks.score_study"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A 500-slice study peaks near 2 GB in the worker with a small model (the series reader holds
# each slice's file bytes, pixels and Hounsfield units at once); twice that is a regression.
PEAK_RSS_LIMIT_MB = 4096


# --- The pipeline: receiver, worker, task events (one of each per module) --------------------


class TaskEvents:
    """Collects the task events the worker publishes, so tests can count what it received."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._receiver: Any = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the task event receiver did not start")

    def _run(self) -> None:
        with celery_app.connection_for_read() as connection:
            self._receiver = celery_app.events.Receiver(
                connection, handlers={"task-received": self._on_received}
            )
            consumer = self._receiver.consume(limit=None, timeout=None, wakeup=False)
            self._ready.set()
            for _ in consumer:
                pass

    def _on_received(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.received.append(event)

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=10)

    def runs(self, task_name: str, study_id: int) -> int:
        """How many times the worker received ``task_name`` for this study (redeliveries too).

        A worker sends task events in batches between tasks (so one killed in a task never
        sends its batch): count once the worker is idle."""
        time.sleep(0.5)  # the last batch on its way through Redis
        with self._lock:
            return sum(
                1
                for event in self.received
                if event.get("name") == task_name and event.get("args") == f"({study_id},)"
            )


@dataclasses.dataclass
class Pipeline:
    port: int
    media_root: Path
    events: TaskEvents
    worker: subprocess.Popen
    worker_name: str

    def start_worker(self) -> None:
        self.worker, self.worker_name = start_celery_worker(env=_worker_env(), task_events=True)

    def kill_worker(self) -> None:
        """SIGKILL: no warm shutdown, the task in hand is neither acknowledged nor requeued."""
        self.worker.send_signal(signal.SIGKILL)
        self.worker.wait(timeout=30)

    def worker_peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.worker.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    def wait_until_idle(self, timeout: float = 300) -> None:
        """No message waiting in the queues and nothing running or held for later."""
        client = redis.Redis.from_url(settings.REDIS_URL)
        inspect = celery_app.control.inspect(destination=[self.worker_name], timeout=2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            waiting = client.llen("default") + client.llen("gpu")
            active, scheduled = inspect.active(), inspect.scheduled()
            if (
                not waiting
                and active == {self.worker_name: []}
                and scheduled == {self.worker_name: []}
            ):
                return
            time.sleep(0.2)
        raise AssertionError("the worker did not become idle")


def _worker_env() -> dict[str, str]:
    return {
        "ICH_STUDY_QUIET_SECONDS": str(QUIET_SECONDS),
        "ICH_BROKER_VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY_TIMEOUT_SECONDS),
    }


def _model_or_skip() -> Path:
    path = default_model_path()
    if not path.is_file():
        pytest.skip(
            f"no model package at {path}: set ICH_MODEL_PATH to a model.pt from `ich train` "
            "(or ship models/ich-demo/model.pt)"
        )
    return path


def _forget_earlier_runs() -> None:
    """The test database restarts its ids each session; guards and queues left in Redis by an
    earlier session would hold back a study that reuses an id."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    stale = [*client.scan_iter("ich:*"), *client.scan_iter("default*"), *client.scan_iter("gpu*")]
    client.delete(*stale, "unacked", "unacked_index")


@pytest.fixture(scope="module")
def pipeline(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    _model_or_skip()
    _forget_earlier_runs()
    media_root = tmp_path_factory.mktemp("scoring-media")
    server = start_receiver(host="127.0.0.1", port=0, ae_title=AE_TITLE, block=False)
    assert server is not None
    events = TaskEvents()
    events.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(settings, "MEDIA_ROOT", media_root)  # the worker inherits it
        worker, name = start_celery_worker(env=_worker_env(), task_events=True, loglevel="INFO")
    state = Pipeline(int(server.server_address[1]), media_root, events, worker, name)
    try:
        yield state
    finally:
        stop_celery_worker(state.worker)
        events.stop()
        server.shutdown()


@pytest.fixture(autouse=True)
def _shared_pipeline(pipeline: Pipeline, settings: Any) -> Iterator[None]:  # type: ignore[no-untyped-def]
    settings.MEDIA_ROOT = pipeline.media_root
    settings.ICH_STUDY_QUIET_SECONDS = QUIET_SECONDS
    yield
    pipeline.wait_until_idle()  # before the tables are emptied under the worker's feet


# --- Studies and how they arrive ------------------------------------------------------------


def _phantom(seed: int, n_slices: int, subtypes: list[str] | None = None) -> PhantomStudy:
    return generate_study(
        seed, subtypes=["subdural"] if subtypes is None else subtypes, n_slices=n_slices
    )


def _thin(study: PhantomStudy, n_slices: int) -> PhantomStudy:
    """The same head resampled along z into ``n_slices`` thin slices (as a 0.5 mm
    reconstruction), far quicker than rendering them one by one."""
    z = study.positions_mm.astype(float)
    target = np.linspace(z[0], z[-1], n_slices)
    where = np.interp(target, z, np.arange(len(z)))
    low = np.floor(where).astype(int)
    high = np.minimum(low + 1, len(z) - 1)
    weight = (where - low).astype(np.float32)[:, None, None]
    hu = np.rint(study.hu[low] * (1 - weight) + study.hu[high] * weight).astype(np.int16)
    nearest = np.rint(where).astype(int)
    return dataclasses.replace(
        study,
        study_id=f"{study.study_id}-thin{n_slices}",
        hu=hu,
        masks=study.masks[nearest],
        slice_labels=study.slice_labels[nearest],
        positions_mm=np.round(target, 3),
        slice_thickness_mm=round(float(target[1] - target[0]), 3),
    )


def _send(port: int, paths: list[Path]) -> None:
    """C-STORE the files with pynetdicom, as a scanner would."""
    folder = paths[0].parent
    files = [f for f in dicom_files(folder)[0] if f.path in set(paths)]
    summary = send_files(files, Receiver(host="127.0.0.1", port=port, called_ae=AE_TITLE))
    assert summary.accepted == len(paths), summary.refused


def _study_of(path: Path) -> Study:
    uid = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    return Study.objects.get(study_instance_uid=uid)


def _wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _status(study: Study) -> str:
    return Study.objects.values_list("status", flat=True).get(pk=study.pk)


# --- The live worklist, as a browser holds it open ------------------------------------------


class WorklistSocket:
    """A WebSocket on /ws/worklist/ in a thread of its own, collecting every event."""

    def __init__(self, client: Client) -> None:
        cookie = f"sessionid={client.cookies['sessionid'].value}"
        self.headers = [
            (b"origin", b"http://localhost"),
            (b"host", b"localhost"),
            (b"cookie", cookie.encode()),
        ]
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._connected = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._listen(),), daemon=True)

    def __enter__(self) -> "WorklistSocket":
        self._thread.start()
        assert self._connected.wait(15), "the WebSocket was not accepted"
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout=15)

    async def _listen(self) -> None:
        communicator = WebsocketCommunicator(application, "/ws/worklist/", headers=self.headers)
        connected, _ = await communicator.connect(timeout=10)
        assert connected
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        self._connected.set()
        try:
            while True:  # one long receive: a timed-out receive would cancel the consumer
                event = await communicator.receive_json_from(timeout=3600)
                with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()
        except asyncio.CancelledError:
            pass
        finally:
            await communicator.disconnect()
            # The consumer's database thread keeps its connection (CONN_MAX_AGE) otherwise,
            # and the test database could not be dropped at the end.
            await database_sync_to_async(connections.close_all)()

    def of(self, event_type: str, study: Study) -> list[dict[str, Any]]:
        with self._changed:
            return [e for e in self.events if e["type"] == event_type and e["study_id"] == study.pk]

    def wait_for(
        self, event_type: str, study: Study, count: int = 1, timeout: float = SCORED_TIMEOUT
    ) -> dict[str, Any]:
        """The ``count``-th event of this type for the study."""
        with self._changed:
            arrived = self._changed.wait_for(
                lambda: len(self.of(event_type, study)) >= count, timeout=timeout
            )
        if not arrived:  # what the study went through, to tell a lost check from a lost run
            seen = [e["type"] for e in self.events if e.get("study_id") == study.pk]
            study.refresh_from_db()
            runs = list(AIResult.objects.filter(study=study).values_list("status", "error"))
            raise AssertionError(
                f"no {event_type} #{count} for study {study.pk} within {timeout:.0f} s;"
                f" events {seen}; status {study.status}; results {runs}"
            )
        return self.of(event_type, study)[count - 1]


@pytest.fixture
def worklist(ed_client: Client) -> Iterator[WorklistSocket]:
    with WorklistSocket(ed_client) as socket:
        yield socket


# --- Tests ----------------------------------------------------------------------------------


def test_a_study_sent_by_c_store_is_scored_and_announced_live(
    pipeline: Pipeline, worklist: WorklistSocket, ed_client: Client, tmp_path: Path
) -> None:
    paths = write_study(_phantom(101, 24), tmp_path)
    _send(pipeline.port, paths)
    study = _study_of(paths[0])

    event = worklist.wait_for("study.scored", study)

    study.refresh_from_db()
    assert study.status == StudyStatus.SCORED
    result = AIResult.objects.get(study=study)
    assert result.status == AIResultStatus.SUCCEEDED
    assert sorted(
        Finding.objects.filter(result=result).values_list("haemorrhage_class", flat=True)
    ) == sorted(HaemorrhageClass.values)
    assert event["result_id"] == result.pk
    assert {f["class"] for f in event["findings"]} == set(HaemorrhageClass.values)
    assert event["priority"] == study.priority
    flagged = {f.haemorrhage_class for f in result.findings.all() if f.flagged}
    assert set(result.heatmaps) == flagged
    for slices in result.heatmaps.values():
        assert slices, "a flagged class has at least one heatmap slice"
        for relative in slices.values():
            assert (pipeline.media_root / relative).read_bytes().startswith(PNG_SIGNATURE)

    payload = _result_api(ed_client, study)
    assert payload["id"] == result.pk
    assert len(payload["findings"]) == 6
    # the operating points the flags used, as the predictor returned them, and the notice
    assert set(payload["thresholds"]) == set(HaemorrhageClass.values)
    assert payload["thresholds"] == result.thresholds
    assert payload["skipped"] == [] and payload["export_error"] == ""
    assert payload["notice"].startswith("Triage support, not diagnosis")
    assert event["notice"] == payload["notice"]
    uids = [row["sop_instance_uid"] for row in payload["slice_probabilities"]]
    assert len(uids) == 24 == len(set(uids))
    assert all(set(HaemorrhageClass.values) <= set(row) for row in payload["slice_probabilities"])
    image_urls = [url for per_class in payload["heatmaps"].values() for url in per_class.values()]
    image_urls += [e["image"] for entries in payload["prediction_basis"].values() for e in entries]
    assert len(image_urls) == sum(len(s) for s in result.heatmaps.values()) + sum(
        len(e) for e in result.prediction_basis.values()
    )
    for url in image_urls[:: max(1, len(image_urls) // 12)]:  # a sample: every kind and class
        response = ed_client.get(url)
        assert response.status_code == 200, url
        assert response["Content-Type"] == "image/png"
        assert b"".join(response.streaming_content).startswith(PNG_SIGNATURE)

    archive = _wait_for(lambda: _results_zip(ed_client, payload["dicom"]), 60, "the DICOM export")
    report = pydicom.dcmread(io.BytesIO(archive.read("report-sr.dcm")))
    assert report.SOPClassUID == Comprehensive3DSRStorage
    assert report.StudyInstanceUID == study.study_instance_uid
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == study.study_instance_uid
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in evidence.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == set(uids)
    heatmap_names = [n for n in archive.namelist() if n.startswith("heatmap-series/")]
    with_attention = set().union(*(set(s) for s in result.heatmaps.values()))
    assert len(heatmap_names) == len(with_attention)
    for name in heatmap_names[:3]:
        image = pydicom.dcmread(io.BytesIO(archive.read(name)))
        assert image.SOPClassUID == SecondaryCaptureImageStorage
        assert image.StudyInstanceUID == study.study_instance_uid


def _result_api(client: Client, study: Study) -> dict[str, Any]:
    response = client.get(f"/api/studies/{study.pk}/result/")
    assert response.status_code == 200, response.content
    return response.json()


def _results_zip(client: Client, url: str) -> zipfile.ZipFile | None:
    response = client.get(url)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.content
    return zipfile.ZipFile(io.BytesIO(response.content))


def test_a_study_is_scored_once_not_once_per_instance(
    pipeline: Pipeline, worklist: WorklistSocket, tmp_path: Path
) -> None:
    paths = write_study(_phantom(102, 24), tmp_path)
    _send(pipeline.port, paths)
    study = _study_of(paths[0])
    worklist.wait_for("study.scored", study)
    pipeline.wait_until_idle()  # whatever else the study set going is done

    assert pipeline.events.runs(SCORE_STUDY, study.pk) == 1
    assert AIResult.objects.filter(study=study).count() == 1
    assert len(worklist.of("study.scoring", study)) == 1
    assert len(worklist.of("study.scored", study)) == 1
    assert len(worklist.of("study.received", study)) == 1
    assert Finding.objects.filter(result__study=study).count() == 6


def test_a_late_instance_makes_a_new_scoring_run(
    pipeline: Pipeline, worklist: WorklistSocket, ed_client: Client, tmp_path: Path
) -> None:
    paths = write_study(_phantom(103, 13), tmp_path)
    _send(pipeline.port, paths[:12])
    study = _study_of(paths[0])
    first = worklist.wait_for("study.scored", study)

    _send(pipeline.port, paths[12:])
    second = worklist.wait_for("study.scored", study, count=2)

    assert len(worklist.of("study.received", study)) == 2  # new, then reopened
    results = list(AIResult.objects.filter(study=study).order_by("pk"))
    assert [r.status for r in results] == [AIResultStatus.SUCCEEDED] * 2
    assert [first["result_id"], second["result_id"]] == [r.pk for r in results]
    assert [len(r.slice_probabilities) for r in results] == [12, 13]
    assert [r.findings.count() for r in results] == [6, 6]
    assert _status(study) == StudyStatus.SCORED
    assert _result_api(ed_client, study)["id"] == results[1].pk
    pipeline.wait_until_idle()
    assert pipeline.events.runs(SCORE_STUDY, study.pk) == 2


def test_an_mr_series_is_stored_and_listed_but_never_scored(
    pipeline: Pipeline, worklist: WorklistSocket, ed_client: Client, tmp_path: Path
) -> None:
    template = small_image(modality="MR")
    paths = []
    for number in range(1, 4):
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        template.InstanceNumber = number
        path = tmp_path / f"MR{number}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    _send(pipeline.port, paths)
    study = _study_of(paths[0])

    event = worklist.wait_for("study.scored", study)

    assert event["eligible"] is False
    assert event["findings"] == []
    assert _status(study) == StudyStatus.NOT_ELIGIBLE
    pipeline.wait_until_idle()
    assert not AIResult.objects.filter(study=study).exists()
    assert pipeline.events.runs(SCORE_STUDY, study.pk) == 0
    listed = ed_client.get("/api/studies/").json()["results"]
    assert [s["status"] for s in listed if s["id"] == study.pk] == [StudyStatus.NOT_ELIGIBLE]


def test_a_study_whose_files_are_corrupt_fails_with_the_reason_and_stays_listed(
    pipeline: Pipeline,
    worklist: WorklistSocket,
    ed_client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    schedule = scheduling.schedule_completeness_check
    stub_scheduling(monkeypatch)  # hold the check back while the files are damaged
    paths = write_study(_phantom(104, 8), tmp_path)
    _send(pipeline.port, paths)
    study = _study_of(paths[0])
    for instance_path in (pipeline.media_root / "studies" / study.study_instance_uid).rglob(
        "*.dcm"
    ):
        instance_path.write_bytes(instance_path.read_bytes()[:2000])  # a disk fault after ingest

    schedule(study.pk)
    event = worklist.wait_for("study.failed", study)

    result = AIResult.objects.get(study=study)
    assert result.status == AIResultStatus.FAILED
    assert "no usable CT slices" in result.error
    assert "truncated or corrupt pixel data" in result.error  # the reason, not only a count
    assert len(result.error) <= scoring.FAILURE_REASON_CHARS
    assert event["error"] == result.error
    assert _status(study) == StudyStatus.FAILED
    assert not Finding.objects.filter(result=result).exists()
    listed = ed_client.get("/api/studies/").json()["results"]
    assert [s["status"] for s in listed if s["id"] == study.pk] == [StudyStatus.FAILED]
    assert _result_api(ed_client, study)["error"] == result.error


@pytest.mark.parametrize(("damaged", "scored"), [(2, True), (7, False)])
def test_slices_that_cannot_be_read_are_left_out_and_named_or_fail_the_study_when_too_many(
    pipeline: Pipeline,
    worklist: WorklistSocket,
    ed_client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    damaged: int,
    scored: bool,
) -> None:
    schedule = scheduling.schedule_completeness_check
    stub_scheduling(monkeypatch)  # hold the check back while the files are damaged
    paths = write_study(_phantom(106 + damaged, 10), tmp_path)
    _send(pipeline.port, paths)
    study = _study_of(paths[0])
    stored = sorted((pipeline.media_root / "studies" / study.study_instance_uid).rglob("*.dcm"))
    for instance_path in stored[:damaged]:
        instance_path.write_bytes(instance_path.read_bytes()[:2000])  # a disk fault after ingest
    bad = {p.stem for p in stored[:damaged]}  # stored as <SOPInstanceUID>.dcm

    schedule(study.pk)
    event = worklist.wait_for("study.scored" if scored else "study.failed", study)

    result = AIResult.objects.get(study=study)
    if scored:
        assert result.status == AIResultStatus.SUCCEEDED
        assert {s["sop_instance_uid"] for s in result.skipped} == bad
        assert all("truncated or corrupt" in s["reason"] for s in result.skipped)
        assert len(result.slice_probabilities) == 10 - damaged
        assert _result_api(ed_client, study)["skipped"] == result.skipped
    else:
        assert result.status == AIResultStatus.FAILED
        assert "only 3 of 10 slices could be read, too few to score it" in result.error
        assert event["error"] == result.error
        assert _status(study) == StudyStatus.FAILED


def test_a_result_that_cannot_be_stored_fails_the_study_with_a_reason(
    pipeline: Pipeline, worklist: WorklistSocket, tmp_path: Path
) -> None:
    """A fault after the model ran (here the results folder is a file: as a full disk, a real
    OSError in the worker) fails the study at once, never leaving it "scoring" for the sweep."""
    results = pipeline.media_root / "results"
    aside = pipeline.media_root / "results-aside"
    if results.exists():
        results.rename(aside)
    results.write_text("not a folder")
    try:
        paths = write_study(_phantom(109, 8), tmp_path)
        _send(pipeline.port, paths)
        study = _study_of(paths[0])
        event = worklist.wait_for("study.failed", study)
    finally:
        results.unlink()
        if aside.exists():
            aside.rename(results)

    result = AIResult.objects.get(study=study)
    assert result.status == AIResultStatus.FAILED
    assert result.error.startswith("the result could not be stored: internal error (")
    assert "the worker log has the details under task " in result.error
    assert event["error"] == result.error
    assert _status(study) == StudyStatus.FAILED


@pytest.mark.timeout(600)
def test_a_study_is_scored_once_after_its_worker_is_killed_mid_scoring(
    pipeline: Pipeline, worklist: WorklistSocket, tmp_path: Path
) -> None:
    # 40 slices: the shipped model scores them in about 10 s on one thread, time enough to
    # kill the worker in the middle (80 slices took 20 s more of the suite).
    paths = write_study(_thin(_phantom(105, 32), 40), tmp_path)
    _send(pipeline.port, paths)
    study = _study_of(paths[0])
    _wait_for(lambda: _status(study) == StudyStatus.SCORING, 60, "scoring to start")

    pipeline.kill_worker()
    assert _status(study) == StudyStatus.SCORING
    interrupted = AIResult.objects.get(study=study)
    assert interrupted.status == AIResultStatus.RUNNING
    pipeline.start_worker()

    worklist.wait_for("study.scored", study, timeout=VISIBILITY_TIMEOUT_SECONDS + SCORED_TIMEOUT)
    result = AIResult.objects.get(study=study)  # the interrupted run, finished: not a second
    assert result.pk == interrupted.pk
    assert result.status == AIResultStatus.SUCCEEDED
    assert result.findings.count() == 6
    assert len(result.slice_probabilities) == 40
    assert _status(study) == StudyStatus.SCORED
    assert len(worklist.of("study.scored", study)) == 1
    attempts = redis.Redis.from_url(settings.REDIS_URL).get(
        scheduling.ATTEMPTS_KEY.format(result_id=result.pk)
    )
    assert attempts == b"2"  # started, lost with its worker, redelivered and finished


@pytest.mark.timeout(600)
def test_a_500_slice_study_is_received_and_scored(
    pipeline: Pipeline, worklist: WorklistSocket, tmp_path: Path
) -> None:
    # A head without a bleed: the attention maps of flagged classes, which the shipped model
    # takes a minute over at 500 slices on two cores, are covered by the first test.
    paths = write_study(_thin(_phantom(106, 36, subtypes=[]), 500), tmp_path)
    _send(pipeline.port, paths)
    study = _study_of(paths[0])

    worklist.wait_for("study.scored", study, timeout=2 * SCORED_TIMEOUT)

    result = AIResult.objects.get(study=study)
    assert result.status == AIResultStatus.SUCCEEDED
    assert len(result.slice_probabilities) == 500
    assert result.findings.count() == 6
    peak = pipeline.worker_peak_rss_mb()
    print(f"500-slice study: timings {result.timings}, worker peak RSS {peak:.0f} MB")
    assert peak < PEAK_RSS_LIMIT_MB, f"the worker peaked at {peak:.0f} MB"


def test_the_sweep_requeues_a_study_stuck_in_queued(
    pipeline: Pipeline, worklist: WorklistSocket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub_scheduling(monkeypatch)  # as if the scoring task had been lost
    for path in write_study(_phantom(107, 8), tmp_path):
        instance_ingest(data=path.read_bytes(), source=IngestSource.C_STORE, address=None)
    study = Study.objects.get()
    stuck_since = timezone.now() - timedelta(minutes=settings.ICH_SCORING_STUCK_MINUTES + 1)
    Study.objects.filter(pk=study.pk).update(
        status=StudyStatus.QUEUED, status_changed_at=stuck_since
    )

    assert tasks.sweep_stuck_studies() == 1
    assert tasks.sweep_stuck_studies() == 0  # once per period, not once a minute

    worklist.wait_for("study.scored", study)
    assert _status(study) == StudyStatus.SCORED
    assert AIResult.objects.get(study=study).status == AIResultStatus.SUCCEEDED
    pipeline.wait_until_idle()
    assert pipeline.events.runs(SCORE_STUDY, study.pk) == 1
