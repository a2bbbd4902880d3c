"""Scoring services: which series to score, the AIResult lifecycle, findings, priority, events.

The model itself is reached only through ``worklist/tasks.py`` (the adapter to ``inference``):
these functions take plain data (``ScoringOutput``) so the web app never imports PyTorch.
"""

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from PIL import Image

from worklist import events, scheduling
from worklist.models import (
    AIResult,
    AIResultStatus,
    Finding,
    HaemorrhageClass,
    Instance,
    Series,
    Study,
    StudyStatus,
)
from worklist.serializers import TRIAGE_NOTICE

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
HEAD_BODY_PARTS = {"", "HEAD", "BRAIN", "SKULL", "HEADNECK", "HEAD_NECK"}
MIN_SLICES = 3
# Clinical urgency of each class when flagged: epidural bleeds need a surgeon soonest.
SEVERITY = {
    HaemorrhageClass.EPIDURAL: 6,
    HaemorrhageClass.SUBDURAL: 5,
    HaemorrhageClass.INTRAPARENCHYMAL: 4,
    HaemorrhageClass.INTRAVENTRICULAR: 3,
    HaemorrhageClass.SUBARACHNOID: 2,
    HaemorrhageClass.ANY: 1,
}
FLAGGED_BASE = 10.0
# A run started this often without finishing keeps killing its worker (e.g. out of memory):
# it fails with a reason instead of being redelivered for ever.
MAX_SCORING_ATTEMPTS = 5


@dataclass
class ScoringOutput:
    """What a model run produced, as plain data."""

    model_name: str
    model_version: str
    probabilities: dict[str, float]
    thresholds: dict[str, float]
    flags: dict[str, bool]
    slice_probabilities: list[list[float]]  # (N, 6) in the order of sop_instance_uids
    key_slices: dict[str, int]
    sop_instance_uids: list[str]
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)  # class -> (N, H, W) uint8
    basis: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # class -> entries
    basis_images: dict[str, list[np.ndarray]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {sop_instance_uid, reason}


def scoring_series(study: Study) -> Series | None:
    """The series to score: the largest CT image series of the head, or None (not eligible)."""
    candidates = [
        series
        for series in study.series.all()
        if series.modality.upper() == "CT"
        and series.body_part.upper().replace(" ", "") in HEAD_BODY_PARTS
    ]
    counted = [
        (series.instances.filter(sop_class_uid=CT_IMAGE_STORAGE).count(), series)
        for series in candidates
    ]
    counted = [(n, s) for n, s in counted if n >= MIN_SLICES]
    return max(counted, key=lambda pair: pair[0])[1] if counted else None


@transaction.atomic
def study_complete(*, study_id: int) -> str:
    """A quiet study is queued for scoring, or marked not eligible. Returns the new status."""
    study = Study.objects.select_for_update().get(pk=study_id)
    if study.status != StudyStatus.RECEIVING:
        return study.status
    if scoring_series(study) is None:
        study.transition_to(StudyStatus.NOT_ELIGIBLE)
        events.send_event(events.STUDY_SCORED, _summary(study, findings=[], eligible=False))
        return study.status
    study.transition_to(StudyStatus.QUEUED)
    transaction.on_commit(lambda: _enqueue_scoring(study.pk), robust=True)  # the sweep re-queues
    return study.status


def _enqueue_scoring(study_id: int) -> None:
    from worklist.tasks import score_study

    score_study.apply_async((study_id,), queue="gpu")


@transaction.atomic
def study_scoring_start(*, study_id: int, model_name: str, model_version: str) -> AIResult | None:
    """Marks the study as scoring and returns its running AIResult (reused after a crash, so a
    redelivered task never makes a second one). None when the study is not waiting for scoring,
    or when this run has been started too often (a study that kills its worker each time)."""
    study = Study.objects.select_for_update().get(pk=study_id)
    if study.status == StudyStatus.QUEUED:
        study.transition_to(StudyStatus.SCORING)
        events.send_event(events.STUDY_SCORING, {"study_id": study.pk, "status": study.status})
    elif study.status != StudyStatus.SCORING:
        return None
    result = _current_run(study) or AIResult.objects.create(
        study=study, model_name=model_name, model_version=model_version
    )
    attempts = scheduling.count_scoring_attempt(result.pk)
    if attempts > MAX_SCORING_ATTEMPTS:
        error = f"scoring was interrupted {attempts - 1} times (the worker was lost each time)"
        study_scoring_fail(study_id=study.pk, result_id=result.pk, error=error)
        return None
    return result


def _current_run(study: Study) -> AIResult | None:
    """The running result of this scoring run. One left running by an earlier run (its study
    was reopened by a late instance and queued again since) belongs to fewer instances."""
    return (
        study.ai_results.filter(
            status=AIResultStatus.RUNNING, created_at__gte=study.status_changed_at
        )
        .order_by("-created_at")
        .first()
    )


def is_latest(result: AIResult) -> bool:
    return not AIResult.objects.filter(study_id=result.study_id, pk__gt=result.pk).exists()


def running_result_id(study_id: int) -> int | None:
    """The running result of the study's present scoring run, if one was started."""
    study = Study.objects.get(pk=study_id)
    run = _current_run(study) if study.status == StudyStatus.SCORING else None
    return None if run is None else run.pk


def scoring_instances(study: Study) -> list[Instance]:
    series = scoring_series(study)
    if series is None:
        return []
    return list(series.instances.filter(sop_class_uid=CT_IMAGE_STORAGE))


def study_scoring_finish(*, result_id: int, output: ScoringOutput) -> AIResult:
    """Stores the result once: findings are keyed by (result, class), so a repeat is a no-op.

    The images are written first, outside the transaction: hundreds of PNGs must not hold the
    study's row lock, which every arriving instance of the study waits for."""
    result = AIResult.objects.get(pk=result_id)
    if result.status == AIResultStatus.SUCCEEDED:
        return result
    heatmaps, basis = _store_heatmaps(result.pk, output), _store_basis(result.pk, output)
    return _scoring_finish_record(
        result_id=result_id, output=output, heatmaps=heatmaps, basis=basis
    )


@transaction.atomic
def _scoring_finish_record(
    *,
    result_id: int,
    output: ScoringOutput,
    heatmaps: dict[str, dict[str, str]],
    basis: dict[str, list[dict[str, Any]]],
) -> AIResult:
    study_id = AIResult.objects.values_list("study_id", flat=True).get(pk=result_id)
    study = Study.objects.select_for_update().get(pk=study_id)  # the study first, as ingest does
    result = AIResult.objects.select_for_update().get(pk=result_id)
    if result.status == AIResultStatus.SUCCEEDED:
        return result
    instances = {
        i.sop_instance_uid: i
        for i in Instance.objects.filter(sop_instance_uid__in=output.sop_instance_uids)
    }
    for name in HaemorrhageClass.values:
        key_uid = output.sop_instance_uids[output.key_slices[name]]
        Finding.objects.update_or_create(
            result=result,
            haemorrhage_class=name,
            defaults={
                "probability": min(max(output.probabilities[name], 0.0), 1.0),
                "flagged": output.flags[name],
                "key_instance": instances.get(key_uid),
            },
        )
    result.heatmaps, result.prediction_basis = heatmaps, basis
    result.class_probabilities = output.probabilities
    result.slice_probabilities = [
        {"sop_instance_uid": uid, **dict(zip(HaemorrhageClass.values, row, strict=True))}
        for uid, row in zip(output.sop_instance_uids, output.slice_probabilities, strict=True)
    ]
    result.key_slices = {
        name: output.sop_instance_uids[index] for name, index in output.key_slices.items()
    }
    result.timings = output.timings
    result.thresholds = output.thresholds
    result.skipped = output.skipped
    result.model_name, result.model_version = output.model_name, output.model_version
    result.status, result.finished_at = AIResultStatus.SUCCEEDED, timezone.now()
    result.save()
    if not is_latest(result):
        return result  # superseded by a newer run of the reopened study: that one speaks for it
    study.priority = priority_of(output)
    if study.status == StudyStatus.SCORING:
        study.transition_to(StudyStatus.SCORED)
    study.save(update_fields=["priority"])
    findings = list(result.findings.all())
    events.send_event(events.STUDY_SCORED, _summary(study, findings=findings, result=result))
    return result


FAILURE_REASON_CHARS = 600


@transaction.atomic
def study_scoring_fail(*, study_id: int, error: str, result_id: int | None = None) -> None:
    """The study stays listed, marked "AI unavailable" with the reason, in arrival order.

    Only a study waiting for this run fails: one reopened by a late instance meanwhile is
    scored again, and a newer run speaks for the study."""
    study = Study.objects.select_for_update().get(pk=study_id)
    reason = error.strip() or "unknown error"
    if len(reason) > FAILURE_REASON_CHARS:  # the stored and the announced reason are one text
        reason = reason[: FAILURE_REASON_CHARS - 1] + "…"
    current = True
    if result_id is not None:
        AIResult.objects.filter(pk=result_id, status=AIResultStatus.RUNNING).update(
            status=AIResultStatus.FAILED, error=reason, finished_at=timezone.now()
        )
        current = is_latest(AIResult.objects.get(pk=result_id))
    if not current or study.status not in (StudyStatus.QUEUED, StudyStatus.SCORING):
        return
    study.transition_to(StudyStatus.FAILED)
    study.priority = 0.0
    study.save(update_fields=["priority"])
    events.send_event(
        events.STUDY_FAILED, {"study_id": study.pk, "status": study.status, "error": reason}
    )


@transaction.atomic
def study_rescore(*, study_id: int) -> bool:
    """Queues a study whose scoring failed (a model that could not be loaded, a fault since
    mended) for scoring again. False when it is not in "AI unavailable"."""
    study = Study.objects.select_for_update().get(pk=study_id)
    if study.status != StudyStatus.FAILED:
        return False
    study.transition_to(StudyStatus.QUEUED)
    events.send_event(events.STUDY_SCORING, {"study_id": study.pk, "status": study.status})
    transaction.on_commit(lambda: _enqueue_scoring(study.pk), robust=True)  # the sweep re-queues
    return True


def priority_of(output: ScoringOutput) -> float:
    """Flagged studies first, by the most severe flagged class and its probability; unflagged
    studies share priority 0 and keep arrival order (the maximum wait lifts them later)."""
    flagged = [name for name, flag in output.flags.items() if flag]
    if not flagged:
        return 0.0
    return FLAGGED_BASE + max(
        SEVERITY[HaemorrhageClass(name)] + output.probabilities[name] for name in flagged
    )


def results_dir(result_id: int) -> Path:
    return Path(settings.MEDIA_ROOT) / "results" / str(result_id)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # No optimize=True: it is 8x slower (35 ms a 512 x 512 slice) for files 10 % smaller,
    # and a 500-slice study stores 500 per flagged class.
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _store_heatmaps(result_id: int, output: ScoringOutput) -> dict[str, dict[str, str]]:
    """One compressed PNG per slice and flagged class; slices with no attention are skipped."""
    stored: dict[str, dict[str, str]] = {}
    for name, maps in output.heatmaps.items():
        folder = results_dir(result_id) / "heatmaps" / name
        folder.mkdir(parents=True, exist_ok=True)
        stored[name] = {}
        for index, uid in enumerate(output.sop_instance_uids):
            if maps[index].max() == 0:
                continue
            path = folder / f"{index:04d}.png"
            path.write_bytes(_png(maps[index]))
            stored[name][uid] = str(path.relative_to(settings.MEDIA_ROOT))
    return stored


def _store_basis(result_id: int, output: ScoringOutput) -> dict[str, list[dict[str, Any]]]:
    stored: dict[str, list[dict[str, Any]]] = {}
    for name, entries in output.basis.items():
        folder = results_dir(result_id) / "basis" / name
        folder.mkdir(parents=True, exist_ok=True)
        stored[name] = []
        for rank, (entry, image) in enumerate(
            zip(entries, output.basis_images.get(name, []), strict=False)
        ):
            path = folder / f"{rank}.png"
            path.write_bytes(_png(image))
            stored[name].append({**entry, "image": str(path.relative_to(settings.MEDIA_ROOT))})
    return stored


def _summary(
    study: Study, *, findings: list[Finding], result: AIResult | None = None, eligible: bool = True
) -> dict[str, Any]:
    return {
        "study_id": study.pk,
        "status": study.status,
        "priority": study.priority,
        "eligible": eligible,
        "result_id": result.pk if result else None,
        "notice": TRIAGE_NOTICE,
        "findings": [
            {
                "class": f.haemorrhage_class,
                "probability": round(f.probability, 4),
                "flagged": f.flagged,
            }
            for f in findings
        ],
    }
