"""Everything that reads: querysets for the API, the admin and the services."""

from datetime import datetime

from django.db.models import QuerySet

from worklist.models import AuditEvent, Finding, Instance, Study


def worklist_studies() -> QuerySet[Study]:
    """Highest priority first, then the longest waiting."""
    return Study.objects.order_by("-priority", "received_at", "pk")


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
