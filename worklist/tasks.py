"""Celery tasks: the one adapter between the web app and ``inference``.

Tasks take ids, load, call one service and own their retries. The model is loaded once per
worker process and kept warm (CUDA when present).
"""

import logging
import time
from contextlib import suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from django.conf import settings
from django.db import OperationalError
from django.utils import timezone

from worklist import scheduling, scoring
from worklist.media import instance_file_path
from worklist.models import AIResult, Instance, Study, StudyStatus

logger = logging.getLogger(__name__)
_predictor: Any = None


def predictor() -> Any:
    """The model, loaded on first use in this worker process and then kept."""
    global _predictor
    if _predictor is None:
        from inference.predictor import Predictor

        try:
            _predictor = Predictor.load(settings.ICH_MODEL_PATH or None)
        except Exception as error:
            with suppress(Exception):  # the status is for /healthz; the study says it too
                scheduling.model_status_set({"ok": False, "error": model_problem(error)})
            raise
        logger.info(
            "model %s %s loaded on %s", _predictor.name, _predictor.version, _predictor.device
        )
        with suppress(Exception):
            scheduling.model_status_set(
                {"ok": True, "model": f"{_predictor.name} {_predictor.version}"}
            )
    return _predictor


def model_problem(error: BaseException) -> str:
    """Why the model could not be loaded: inference says what is wrong with the package
    (damaged, newer format, missing), a path and a reason with no patient data."""
    return str(error) if isinstance(error, ValueError | OSError) else type(error).__name__


@worker_process_init.connect
def _load_the_model_at_start(**_: Any) -> None:
    """Each worker process loads the model as it starts, so the first study does not wait for
    it and /healthz knows at once whether it loads."""
    if settings.ICH_PRELOAD_MODEL:
        with suppress(Exception):  # said by model_status and on the first study
            predictor()


@shared_task(acks_late=True, autoretry_for=(OperationalError,), retry_backoff=True, max_retries=5)
def check_study_complete(study_id: int) -> str:
    """Queues scoring once the study has been quiet long enough; otherwise looks again later."""
    study = Study.objects.get(pk=study_id)
    quiet = (timezone.now() - study.last_instance_at).total_seconds()
    wait = settings.ICH_STUDY_QUIET_SECONDS - quiet
    if study.status == StudyStatus.RECEIVING and wait > 0:
        scheduling.renew_completeness_check(study_id)
        check_study_complete.apply_async((study_id,), countdown=wait)
        return "waiting"
    scheduling.release_completeness_check(study_id)
    return scoring.study_complete(study_id=study_id)


@shared_task(
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OperationalError,),
    retry_backoff=5,
    max_retries=3,
    soft_time_limit=600,
    time_limit=660,
)
def score_study(self: Any, study_id: int) -> str:
    try:
        model = predictor()
    except Exception as error:  # a missing or broken model: every study would wait for ever
        logger.exception("the model could not be loaded")
        scoring.study_scoring_fail(
            study_id=study_id,
            error=f"the model could not be loaded: {model_problem(error)}",
            result_id=scoring.running_result_id(study_id),  # a redelivered run's, if any
        )
        return "failed"
    result = scoring.study_scoring_start(
        study_id=study_id, model_name=model.name, model_version=model.version
    )
    if result is None:
        return "not waiting for scoring"
    from inference.dicom_io import DicomInputError

    try:
        output = _run_model(model, scoring.scoring_instances(result.study))
    except OperationalError:
        raise
    except SoftTimeLimitExceeded:
        scoring.study_scoring_fail(
            study_id=study_id, result_id=result.pk, error="scoring timed out"
        )
        return "failed"
    except DicomInputError as error:  # the series itself: inference names the file and reason
        logger.warning("study %s cannot be scored: %s", study_id, type(error).__name__)
        scoring.study_scoring_fail(study_id=study_id, result_id=result.pk, error=str(error))
        return "failed"
    except Exception as error:  # the study must show why, never vanish
        logger.exception("scoring study %s failed", study_id)
        scoring.study_scoring_fail(
            study_id=study_id, result_id=result.pk, error=_internal_error(error, self)
        )
        return "failed"
    try:
        scoring.study_scoring_finish(result_id=result.pk, output=output)
    except OperationalError:
        raise
    except Exception as error:  # e.g. a full disk: fail with a reason, never stay "scoring"
        logger.exception("storing the result of study %s failed", study_id)
        error_text = f"the result could not be stored: {_internal_error(error, self)}"
        scoring.study_scoring_fail(study_id=study_id, result_id=result.pk, error=error_text)
        return "failed"
    export_results.delay(result.pk)
    return "scored"


def _internal_error(error: BaseException, task: Any) -> str:
    """What users see of a failure that is not the study's fault: its kind and where the log
    has the rest. Its message stays out of the database and the live updates (it may quote
    what it failed on, a header value among them)."""
    return (
        f"internal error ({type(error).__name__}); the worker log has the details under"
        f" task {task.request.id}"
    )


@shared_task(
    acks_late=True,
    autoretry_for=(ConnectionError, OperationalError),
    retry_backoff=10,
    max_retries=5,
)
def export_results(result_id: int) -> int:
    """The result as DICOM (SR + heatmap series) beside it, and to the PACS when configured."""
    from worklist import dicom_results

    result = AIResult.objects.get(pk=result_id)
    if not scoring.is_latest(result):  # a late instance made a newer run: that one is sent
        return 0
    try:
        paths = dicom_results.write_results(result)
    except OperationalError:
        raise
    except Exception as error:  # said on the result; the log has the traceback, not the text
        logger.exception("writing the DICOM results of result %s failed", result_id)
        AIResult.objects.filter(pk=result_id).update(
            export_error=f"the DICOM results could not be written ({type(error).__name__})"
        )
        return 0
    AIResult.objects.filter(pk=result_id).exclude(export_error="").update(export_error="")
    sent = dicom_results.send_results(paths)
    if sent:  # patient data left for another system: audited as any export is
        from worklist.services import result_sent_audit

        result_sent_audit(result=result, files=sent)
    return sent


def _run_model(model: Any, instances: list[Instance]) -> scoring.ScoringOutput:
    from inference.dicom_io import DicomInputError, load_series

    if not instances:
        raise ValueError("no CT image instances to score")
    # Ingest checks pixel data without decoding it; a slice that fails to decode is left out
    # here rather than failing the study (a series with no readable slice still fails).
    started = time.perf_counter()
    uid_of = {str(instance_file_path(i)): i.sop_instance_uid for i in instances}
    series = load_series(list(map(Path, uid_of)), skip_bad=True)
    read = time.perf_counter() - started
    skipped = [
        {"sop_instance_uid": uid_of.get(s.source, Path(s.source).stem), "reason": s.reason}
        for s in series.skipped
    ]
    if skipped:
        logger.warning("%d of %d slices could not be read", len(skipped), len(instances))
        readable = len(instances) - len(skipped)
        if readable < scoring.MIN_SLICES or readable < len(instances) / 2:
            first = "; ".join(f"{s['sop_instance_uid']}: {s['reason']}" for s in skipped[:3])
            raise DicomInputError(
                "series",
                f"only {readable} of {len(instances)} slices could be read, too few to score"
                f" it (at least {scoring.MIN_SLICES} and half are needed); {first}",
            )
    prediction = model.predict(series)
    prediction.timings = {"read": read, **prediction.timings}
    prediction.timings["total"] += read
    basis = {
        name: [
            {
                "atlas_index": b.atlas_index,
                "similarity": round(b.similarity, 4),
                "labels": [k for k, v in b.labels.items() if v],
                "source": b.source,
                "probability": round(b.probability, 4),
            }
            for b in entries
        ]
        for name, entries in prediction.prediction_basis.items()
    }
    images = {
        name: [_side_by_side(b.thumbnail, b.attention) for b in entries]
        for name, entries in prediction.prediction_basis.items()
    }
    return scoring.ScoringOutput(
        model_name=prediction.model_name,
        model_version=prediction.model_version,
        probabilities=prediction.probabilities,
        thresholds=prediction.thresholds,
        flags=prediction.flags,
        slice_probabilities=prediction.slice_probabilities.tolist(),
        key_slices=prediction.key_slices,
        sop_instance_uids=prediction.sop_instance_uids,
        heatmaps=prediction.heatmaps,
        basis=basis,
        basis_images=images,
        timings=prediction.timings,
        skipped=skipped,
    )


def _side_by_side(thumbnail: Any, attention: Any) -> Any:
    """An atlas slice and the same slice with its attention map in red, side by side (RGB)."""
    import numpy as np

    gray = np.repeat(thumbnail[..., None], 3, axis=-1).astype(np.float32)
    heat = attention.astype(np.float32)[..., None] / 255
    red = np.zeros_like(gray)
    red[..., 0] = 255
    overlay = gray * (1 - 0.5 * heat) + red * 0.5 * heat
    return np.concatenate([gray, overlay], axis=1).round().astype(np.uint8)


@shared_task
def sweep_stuck_studies() -> int:
    """Re-queues studies stuck in queued or scoring past the limit, and studies whose
    completeness check was lost. Runs every minute from celery beat."""
    period = settings.ICH_SCORING_STUCK_MINUTES * 60
    limit = timezone.now() - timedelta(seconds=period)
    stuck = Study.objects.filter(
        status__in=[StudyStatus.QUEUED, StudyStatus.SCORING], status_changed_at__lt=limit
    )
    count = 0
    for study in stuck:
        if scheduling.claim_stuck_requeue(study.pk, seconds=period):
            score_study.apply_async((study.pk,), queue="gpu")
            count += 1
    quiet_limit = timezone.now() - timedelta(seconds=settings.ICH_STUDY_QUIET_SECONDS * 3 + 30)
    for study in Study.objects.filter(
        status=StudyStatus.RECEIVING, last_instance_at__lt=quiet_limit
    ):
        if scheduling.schedule_completeness_check(study.pk, delay=0):
            count += 1
    return count
