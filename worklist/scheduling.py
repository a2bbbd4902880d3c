"""When to score: a study is complete when no instance has arrived for a quiet period.

Every ingest path calls ``study_instance_arrived`` inside its transaction. The first instance of a
quiet period schedules one completeness check (a Redis key guards it), so a 500-slice study
enqueues one check, not 500. A late instance sends a scored study back to receiving, and it is
scored again as a new AIResult.
"""

import functools

import redis
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from worklist import events
from worklist.models import Study, StudyStatus

CHECK_KEY = "ich:completeness-check:{study_id}"
REQUEUE_KEY = "ich:stuck-requeued:{study_id}"
ATTEMPTS_KEY = "ich:scoring-attempts:{result_id}"


@functools.cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def _redis() -> redis.Redis:
    """One connection pool per process (and per URL, so tests can point elsewhere)."""
    return _client(settings.REDIS_URL)


def study_instance_arrived(*, study: Study, new_study: bool) -> None:
    """Record the arrival, reopen a finished study, announce it and schedule one check."""
    now = timezone.now()
    Study.objects.filter(pk=study.pk).update(last_instance_at=now)
    study.last_instance_at = now
    reopened = study.status != StudyStatus.RECEIVING and study.can_transition_to(
        StudyStatus.RECEIVING
    )
    if reopened:
        study.transition_to(StudyStatus.RECEIVING, at=now)
    if new_study or reopened:
        events.send_event(events.STUDY_RECEIVED, {"study_id": study.pk, "status": study.status})
    # robust: the instance is committed; if Redis is down the beat sweep schedules the check
    # of a quiet study later, and the sender must not be told that a stored instance failed.
    transaction.on_commit(lambda: schedule_completeness_check(study.pk), robust=True)


def schedule_completeness_check(study_id: int, delay: float | None = None) -> bool:
    """Enqueue one check per quiet period; returns whether this call enqueued it."""
    from worklist.tasks import check_study_complete

    delay = settings.ICH_STUDY_QUIET_SECONDS if delay is None else delay
    if not _redis().set(CHECK_KEY.format(study_id=study_id), 1, nx=True, ex=_check_expiry(delay)):
        return False
    check_study_complete.apply_async((study_id,), countdown=delay)
    return True


def _check_expiry(delay: float) -> int:
    return int(delay * 10) + 60


def renew_completeness_check(study_id: int) -> None:
    """The check is looking again later: keep its guard, or a long send would start a second."""
    _redis().expire(
        CHECK_KEY.format(study_id=study_id), _check_expiry(settings.ICH_STUDY_QUIET_SECONDS)
    )


def release_completeness_check(study_id: int) -> None:
    _redis().delete(CHECK_KEY.format(study_id=study_id))


def claim_stuck_requeue(study_id: int, *, seconds: int) -> bool:
    """At most one re-queue of a stuck study per period: a backlog must not snowball."""
    return bool(_redis().set(REQUEUE_KEY.format(study_id=study_id), 1, nx=True, ex=seconds))


def count_scoring_attempt(result_id: int) -> int:
    """How many times a scoring run has started (a redelivery after a lost worker counts)."""
    key = ATTEMPTS_KEY.format(result_id=result_id)
    pipeline = _redis().pipeline()
    pipeline.incr(key)
    pipeline.expire(key, 7 * 24 * 3600)
    attempts, _ = pipeline.execute()
    return int(attempts)


MODEL_STATUS_KEY = "ich:model-status"


def model_status_set(status: dict[str, object]) -> None:
    """What the last worker that loaded (or failed to load) the model found, for /healthz."""
    import json

    _redis().set(MODEL_STATUS_KEY, json.dumps(status))


def model_status() -> dict[str, object] | None:
    import json

    raw = _redis().get(MODEL_STATUS_KEY)
    return None if raw is None else json.loads(raw)
