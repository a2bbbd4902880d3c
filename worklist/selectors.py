"""Everything that reads: querysets for the API, the admin and the services."""

from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Case, IntegerField, QuerySet, Value, When
from django.utils import timezone

from worklist.models import (
    AIResult,
    AIResultStatus,
    AuditEvent,
    Finding,
    Instance,
    ReviewState,
    Study,
)


def worklist_studies(now: datetime | None = None) -> QuerySet[Study]:
    """Unreviewed studies waiting past the maximum first (so no study starves, flagged or not),
    then the highest priority, then the longest waiting. Failed studies keep arrival order."""
    limit = (now or timezone.now()) - timedelta(minutes=settings.ICH_MAX_WAIT_MINUTES)
    overdue = Case(
        When(received_at__lt=limit, review_state=ReviewState.UNREVIEWED, then=Value(1)),
        default=Value(0),
        output_field=IntegerField(),
    )
    return Study.objects.annotate(overdue=overdue).order_by(
        "-overdue", "-priority", "received_at", "pk"
    )


def study_get(*, study_id: int) -> Study:
    return Study.objects.get(pk=study_id)


def instance_get(*, instance_id: int) -> Instance:
    return Instance.objects.select_related("series__study").get(pk=instance_id)


def audit_events(
    *,
    username: str | None = None,
    study: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    ids: list[int] | None = None,
) -> QuerySet[AuditEvent]:
    """The audit log filtered by user name, study (id or StudyInstanceUID), action and time."""
    events = AuditEvent.objects.select_related("study").order_by("-created_at", "-id")
    if username:
        events = events.filter(username=username)
    if study:
        events = (
            events.filter(study_id=int(study))
            if study.isdigit()
            else events.filter(study__study_instance_uid=study)
        )
    if action:
        events = events.filter(action=action)
    if ids is not None:
        events = events.filter(pk__in=ids)
    if since:
        events = events.filter(created_at__gte=since)
    if until:
        events = events.filter(created_at__lt=until)
    return events


def finding_get(*, finding_id: int) -> Finding:
    return Finding.objects.select_related("result__study").get(pk=finding_id)


def latest_result(*, study: Study) -> AIResult:
    """The newest finished (succeeded or failed) AI result of a study."""
    return (
        AIResult.objects.filter(study=study)
        .exclude(status=AIResultStatus.RUNNING)
        .prefetch_related("findings")
        .latest("created_at")
    )


def result_get(*, result_id: int) -> AIResult:
    return AIResult.objects.select_related("study").get(pk=result_id)
