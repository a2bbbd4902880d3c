"""The scoring services on their own (no worker, no model): runs, reruns, failures and export.

The end-to-end path with a real worker and model is in test_scoring.py.
"""

from typing import Any

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from tests.factories import InstanceFactory, SeriesFactory, scoring_output
from worklist import dicom_results, scoring
from worklist.models import AIResult, AIResultStatus, Finding, Study, StudyStatus

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_counts_from_earlier_sessions() -> None:
    """Result ids restart with each test database; attempt counts kept in Redis do not."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    stale = list(client.scan_iter("ich:scoring-attempts:*"))
    if stale:
        client.delete(*stale)


def _queued_study(slices: int = 3) -> tuple[Study, list[str]]:
    series = SeriesFactory(body_part="HEAD")
    uids = [InstanceFactory(series=series).sop_instance_uid for _ in range(slices)]
    study = series.study
    study.transition_to(StudyStatus.QUEUED)
    return study, uids


def _start(study: Study) -> AIResult:
    result = scoring.study_scoring_start(study_id=study.pk, model_name="m", model_version="1")
    assert result is not None
    return result


def _reopen_and_queue(study: Study) -> None:
    study.refresh_from_db()
    study.transition_to(StudyStatus.RECEIVING)  # a late instance
    study.transition_to(StudyStatus.QUEUED)  # quiet again


def test_finishing_the_same_run_twice_stores_its_findings_once() -> None:
    study, uids = _queued_study()
    result = _start(study)
    scoring.study_scoring_finish(result_id=result.pk, output=scoring_output(uids))
    scoring.study_scoring_finish(result_id=result.pk, output=scoring_output(uids))
    assert Finding.objects.filter(result=result).count() == 6
    study.refresh_from_db()
    assert study.status == StudyStatus.SCORED
    assert set(AIResult.objects.get(pk=result.pk).heatmaps) == {"any", "subdural"}


def test_a_redelivered_task_continues_the_same_run() -> None:
    study, _ = _queued_study()
    first = _start(study)
    assert _start(study).pk == first.pk  # the worker was lost; the task came back
    assert AIResult.objects.filter(study=study).count() == 1


def test_a_run_overtaken_by_a_newer_run_of_the_reopened_study_does_not_speak_for_it() -> None:
    study, uids = _queued_study()
    old = _start(study)
    _reopen_and_queue(study)
    new = _start(study)  # a second worker scores the study with its late instance
    assert new.pk != old.pk

    scoring.study_scoring_finish(result_id=old.pk, output=scoring_output(uids[:2]))
    study.refresh_from_db()
    assert study.status == StudyStatus.SCORING  # still waiting for the newer run
    scoring.study_scoring_finish(result_id=new.pk, output=scoring_output(uids))
    study.refresh_from_db()
    assert study.status == StudyStatus.SCORED
    assert AIResult.objects.get(pk=old.pk).status == AIResultStatus.SUCCEEDED


def test_a_failure_of_a_study_reopened_meanwhile_leaves_it_to_be_scored_again() -> None:
    study, _ = _queued_study()
    result = _start(study)
    study.refresh_from_db()
    study.transition_to(StudyStatus.RECEIVING)  # a late instance while scoring
    scoring.study_scoring_fail(study_id=study.pk, result_id=result.pk, error="boom")
    study.refresh_from_db()
    assert study.status == StudyStatus.RECEIVING
    assert AIResult.objects.get(pk=result.pk).error == "boom"


def test_a_failure_marks_a_scoring_study_failed_with_the_reason() -> None:
    study, _ = _queued_study()
    result = _start(study)
    scoring.study_scoring_fail(study_id=study.pk, result_id=result.pk, error="ValueError: bad")
    study.refresh_from_db()
    assert study.status == StudyStatus.FAILED
    assert AIResult.objects.get(pk=result.pk).status == AIResultStatus.FAILED


def test_a_run_that_keeps_losing_its_worker_fails_instead_of_looping() -> None:
    study, _ = _queued_study()
    result = _start(study)
    for _ in range(scoring.MAX_SCORING_ATTEMPTS - 1):
        assert _start(study).pk == result.pk
    assert scoring.study_scoring_start(study_id=study.pk, model_name="m", model_version="1") is None
    study.refresh_from_db()
    assert study.status == StudyStatus.FAILED
    assert "interrupted" in AIResult.objects.get(pk=result.pk).error


def test_the_dicom_download_is_empty_until_the_report_is_written() -> None:
    study, _ = _queued_study()
    result = AIResult.objects.create(
        study=study, model_name="m", model_version="1", finished_at=timezone.now()
    )
    dicom_results.heatmap_series_dir(result).mkdir(parents=True)
    (dicom_results.heatmap_series_dir(result) / "0001.dcm").write_bytes(b"half an export")
    assert dicom_results.results_zip(result) == b""


def test_rescore_queues_failed_studies_again_and_leaves_the_rest(
    monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    from io import StringIO

    from django.core.management import CommandError, call_command

    queued: list[int] = []  # no worker here: a queued task would reach a later test's worker
    monkeypatch.setattr(scoring, "_enqueue_scoring", queued.append)
    failed, _ = _queued_study()
    result = _start(failed)
    scoring.study_scoring_fail(study_id=failed.pk, result_id=result.pk, error="model missing")
    scored, uids = _queued_study()
    scoring.study_scoring_finish(result_id=_start(scored).pk, output=scoring_output(uids))

    out = StringIO()
    with django_capture_on_commit_callbacks(execute=True):
        call_command("rescore", "--failed", stdout=out)

    assert queued == [failed.pk]
    failed.refresh_from_db()
    scored.refresh_from_db()
    assert (failed.status, scored.status) == (StudyStatus.QUEUED, StudyStatus.SCORED)
    assert "queued 1 of 1 studies" in out.getvalue()
    out = StringIO()
    call_command("rescore", str(scored.pk), stdout=out)
    assert "left as they are: " + str(scored.pk) in out.getvalue()
    with pytest.raises(CommandError, match="no study with id 999999"):
        call_command("rescore", "999999")
    with pytest.raises(CommandError, match="name study ids or --failed"):
        call_command("rescore")


def test_a_model_that_cannot_load_closes_a_redelivered_runs_result_too() -> None:
    """score_study fails a study whose model cannot be loaded with the running result of a
    run a lost worker had started (running_result_id), so no result stays "running"."""
    study, _ = _queued_study()
    assert scoring.running_result_id(study.pk) is None  # queued: no run yet
    result = _start(study)
    assert scoring.running_result_id(study.pk) == result.pk
    scoring.study_scoring_fail(
        study_id=study.pk,
        error="the model could not be loaded: x",
        result_id=scoring.running_result_id(study.pk),
    )
    result.refresh_from_db()
    assert result.status == AIResultStatus.FAILED and result.finished_at is not None
