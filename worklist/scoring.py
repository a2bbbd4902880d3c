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

from worklist import events
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
    transaction.on_commit(lambda: _enqueue_scoring(study.pk))
    return study.status


def _enqueue_scoring(study_id: int) -> None:
    from worklist.tasks import score_study

    score_study.apply_async((study_id,), queue="gpu")


@transaction.atomic
def study_scoring_start(*, study_id: int, model_name: str, model_version: str) -> AIResult | None:
    """Marks the study as scoring and returns its running AIResult (reused after a crash, so a
    redelivered task never makes a second one). None when the study is not waiting for scoring."""
    study = Study.objects.select_for_update().get(pk=study_id)
    if study.status == StudyStatus.QUEUED:
        study.transition_to(StudyStatus.SCORING)
        events.send_event(events.STUDY_SCORING, {"study_id": study.pk, "status": study.status})
    elif study.status != StudyStatus.SCORING:
        return None
    running = study.ai_results.filter(status=AIResultStatus.RUNNING).order_by("-created_at").first()
    return running or AIResult.objects.create(
        study=study, model_name=model_name, model_version=model_version
    )


def scoring_instances(study: Study) -> list[Instance]:
    series = scoring_series(study)
    if series is None:
        return []
    return list(series.instances.filter(sop_class_uid=CT_IMAGE_STORAGE))


@transaction.atomic
def study_scoring_finish(*, result_id: int, output: ScoringOutput) -> AIResult:
    """Stores the result once: findings are keyed by (result, class), so a repeat is a no-op."""
    result = AIResult.objects.select_for_update().select_related("study").get(pk=result_id)
    if result.status == AIResultStatus.SUCCEEDED:
        return result
    study = Study.objects.select_for_update().get(pk=result.study_id)
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
    result.heatmaps = _store_heatmaps(result.pk, output)
    result.prediction_basis = _store_basis(result.pk, output)
    result.class_probabilities = output.probabilities
    result.slice_probabilities = [
        {"sop_instance_uid": uid, **dict(zip(HaemorrhageClass.values, row, strict=True))}
        for uid, row in zip(output.sop_instance_uids, output.slice_probabilities, strict=True)
    ]
    result.key_slices = {
        name: output.sop_instance_uids[index] for name, index in output.key_slices.items()
    }
    result.timings = output.timings
    result.model_name, result.model_version = output.model_name, output.model_version
    result.status, result.finished_at = AIResultStatus.SUCCEEDED, timezone.now()
    result.save()
    study.priority = priority_of(output)
    if study.status == StudyStatus.SCORING:
        study.transition_to(StudyStatus.SCORED)
    study.save(update_fields=["priority"])
    findings = list(result.findings.all())
    events.send_event(events.STUDY_SCORED, _summary(study, findings=findings, result=result))
    return result


@transaction.atomic
def study_scoring_fail(*, study_id: int, error: str, result_id: int | None = None) -> None:
    """The study stays listed, marked "AI failed" with the reason, in arrival order."""
    study = Study.objects.select_for_update().get(pk=study_id)
    reason = error.strip() or "unknown error"
    if result_id is not None:
        AIResult.objects.filter(pk=result_id, status=AIResultStatus.RUNNING).update(
            status=AIResultStatus.FAILED, error=reason[:4000], finished_at=timezone.now()
        )
    if study.can_transition_to(StudyStatus.FAILED):
        study.transition_to(StudyStatus.FAILED)
    study.priority = 0.0
    study.save(update_fields=["priority"])
    events.send_event(
        events.STUDY_FAILED, {"study_id": study.pk, "status": study.status, "error": reason[:500]}
    )


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
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
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
        "findings": [
            {
                "class": f.haemorrhage_class,
                "probability": round(f.probability, 4),
                "flagged": f.flagged,
            }
            for f in findings
        ],
    }
