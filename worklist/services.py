"""Everything that writes: each function writes its models and its audit row in one transaction."""

import csv
import io
import ipaddress
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib import auth
from django.contrib.auth.models import Group, Permission, User
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from worklist import events, selectors
from worklist.media import media_path
from worklist.models import (
    AIResult,
    AuditAction,
    AuditEvent,
    Finding,
    HaemorrhageClass,
    Instance,
    Review,
    ReviewDecision,
    ReviewState,
    Study,
)
from worklist.roles import ADMIN, ROLES


def client_address(request: HttpRequest) -> str | None:
    """REMOTE_ADDR as the server saw it; behind a proxy listed in ICH_TRUSTED_PROXIES, the
    right-most X-Forwarded-For address that is not itself a trusted proxy (what the nearest
    untrusted hop claimed cannot be checked further)."""
    return address_seen(
        request.META.get("REMOTE_ADDR") or None, request.META.get("HTTP_X_FORWARDED_FOR", "")
    )


def address_seen(remote: str | None, forwarded_for: str) -> str | None:
    """``client_address`` from the peer's address and its X-Forwarded-For header (a WebSocket's
    ASGI scope has both too)."""
    if remote is None or not _trusted(remote):
        return remote
    forwarded = [a.strip() for a in forwarded_for.split(",")]
    for address in reversed([a for a in forwarded if a]):
        if not _trusted(address):
            return address if _is_ip(address) else remote
    return remote


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _trusted(address: str) -> bool:
    if not _is_ip(address):
        return False
    ip = ipaddress.ip_address(address)
    return any(ip in network for network in settings.ICH_TRUSTED_PROXIES)


def audit_record(
    *,
    action: str,
    user: Any,
    address: str | None,
    study: Study | None = None,
    obj: Any = None,
    username: str = "",
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    authenticated = user is not None and user.is_authenticated
    return AuditEvent.objects.create(
        action=action,
        user=user if authenticated else None,
        username=username or (user.get_username() if authenticated else ""),
        study=study,
        object_type=type(obj).__name__ if obj is not None else "",
        object_id=str(obj.pk) if obj is not None else "",
        client_address=address,
        details=details or {},
    )


def access_denied_audit(*, user: Any, address: str | None, details: dict[str, Any]) -> None:
    """A logged-in user was refused: a missing role, a CSRF failure, a WebSocket without the
    role. ``details`` names the channel, method and path; never a query string, which may
    carry a patient's name."""
    audit_record(action=AuditAction.ACCESS_DENIED, user=user, address=address, details=details)


def audit_viewed(*, user: Any, address: str | None, filters: dict[str, Any], what: str) -> None:
    """Reading the audit log is itself audited (it names users, studies and addresses)."""
    audit_record(
        action=AuditAction.AUDIT_VIEWED,
        user=user,
        address=address,
        details={"what": what, "filters": {k: str(v) for k, v in filters.items()}},
    )


@transaction.atomic
def user_login(*, request: HttpRequest, user: User) -> None:
    auth.login(request, user)
    audit_record(action=AuditAction.LOGIN, user=user, address=client_address(request))


@transaction.atomic
def user_logout(*, request: HttpRequest) -> None:
    audit_record(action=AuditAction.LOGOUT, user=request.user, address=client_address(request))
    auth.logout(request)


def login_failure_record(*, request: HttpRequest, username: str) -> AuditEvent:
    return audit_record(
        action=AuditAction.LOGIN_FAILED,
        user=None,
        username=username[:150],
        address=client_address(request),
    )


@transaction.atomic
def worklist_open(*, user: Any, address: str | None) -> QuerySet[Study]:
    audit_record(action=AuditAction.WORKLIST_VIEWED, user=user, address=address)
    return selectors.worklist_studies()


@transaction.atomic
def study_open(*, study_id: int, user: Any, address: str | None) -> Study:
    study = selectors.study_get(study_id=study_id)
    audit_record(
        action=AuditAction.STUDY_OPENED, user=user, address=address, study=study, obj=study
    )
    return study


@transaction.atomic
def instance_fetch(*, instance_id: int, user: Any, address: str | None) -> Instance:
    instance = selectors.instance_get(instance_id=instance_id)
    audit_record(
        action=AuditAction.IMAGES_FETCHED,
        user=user,
        address=address,
        study=instance.series.study,
        obj=instance,
    )
    return instance


@transaction.atomic
def study_result_open(*, study_id: int, user: Any, address: str | None) -> AIResult:
    """The study's latest finished AI result; opening it is opening the study."""
    study = selectors.study_get(study_id=study_id)
    result = selectors.latest_result(study=study)
    audit_record(
        action=AuditAction.STUDY_OPENED,
        user=user,
        address=address,
        study=study,
        obj=result,
        details={"what": "ai result"},
    )
    return result


RESULT_IMAGE_KINDS = ("heatmaps", "basis")


@transaction.atomic
def result_image_fetch(
    *, result_id: int, kind: str, class_name: str, key: str, user: Any, address: str | None
) -> Path:
    """The file of one heatmap slice (key = SOPInstanceUID) or basis picture (key = rank)."""
    result = selectors.result_get(result_id=result_id)
    if kind not in RESULT_IMAGE_KINDS:
        raise AIResult.DoesNotExist(f"no result images of kind {kind!r}")
    if kind == "heatmaps":
        relative = result.heatmaps.get(class_name, {}).get(key)
    else:
        entries = result.prediction_basis.get(class_name, [])
        rank = key.isascii() and key.isdigit()  # "²" is a digit to isdigit, not to int
        relative = entries[int(key)]["image"] if rank and int(key) < len(entries) else None
    if relative is None:
        raise AIResult.DoesNotExist(f"no {kind} image {class_name}/{key}")
    path = media_path(relative)
    if not path.is_file():  # nothing is shown, so nothing is audited
        raise AIResult.DoesNotExist(f"the {kind} image {class_name}/{key} is missing")
    audit_record(
        action=AuditAction.IMAGES_FETCHED,
        user=user,
        address=address,
        study=result.study,
        obj=result,
        details={"kind": kind, "class": class_name},
    )
    return path


def result_sent_audit(*, result: AIResult, files: int) -> None:
    """The result's DICOM files went by C-STORE to ICH_RESULTS_DESTINATION: audited as an
    export by the system (no user, no address)."""
    ae_title, host, port = settings.ICH_RESULTS_DESTINATION or ("", "", 0)
    audit_record(
        action=AuditAction.EXPORT,
        user=None,
        address=None,
        study=result.study,
        obj=result,
        details={
            "what": "ai result as DICOM, sent by C-STORE",
            "to": f"{ae_title}@{host}:{port}",
            "files": files,
        },
    )


@transaction.atomic
def result_dicom_export(*, result_id: int, user: Any, address: str | None) -> bytes:
    """The SR and heatmap series of a result as a zip; the export is audited."""
    from worklist import dicom_results

    result = selectors.result_get(result_id=result_id)
    content = dicom_results.results_zip(result)
    if len(content) <= 22:  # an empty zip: the worker has not written them (yet)
        raise AIResult.DoesNotExist("the DICOM results of this AI result are not ready")
    audit_record(
        action=AuditAction.EXPORT,
        user=user,
        address=address,
        study=result.study,
        obj=result,
        details={"what": "ai result as DICOM"},
    )
    return content


@transaction.atomic
def finding_review(
    *, finding: Finding, reviewer: Any, decision: str, comment: str, address: str | None
) -> Review:
    if decision == ReviewDecision.MISSED:
        raise ValueError("A finding the AI made is confirmed or rejected, not missed.")
    study = finding.result.study
    review = Review.objects.create(
        study=study,
        finding=finding,
        haemorrhage_class=finding.haemorrhage_class,
        decision=decision,
        comment=comment,
        reviewer=reviewer,
    )
    return _review_saved(review=review, address=address)


@transaction.atomic
def missed_finding_add(
    *, study: Study, reviewer: Any, haemorrhage_class: str, comment: str, address: str | None
) -> Review:
    if haemorrhage_class not in HaemorrhageClass.values:
        raise ValueError(f"Unknown haemorrhage class {haemorrhage_class!r}.")
    review = Review.objects.create(
        study=study,
        finding=None,
        haemorrhage_class=haemorrhage_class,
        decision=ReviewDecision.MISSED,
        comment=comment,
        reviewer=reviewer,
    )
    return _review_saved(review=review, address=address)


def _review_saved(*, review: Review, address: str | None) -> Review:
    study = review.study
    if study.review_state != ReviewState.REVIEWED:
        study.review_state = ReviewState.REVIEWED
        study.save(update_fields=["review_state"])
    audit_record(
        action=AuditAction.REVIEW_SAVED,
        user=review.reviewer,
        address=address,
        study=study,
        obj=review,
        details={"decision": review.decision, "class": review.haemorrhage_class},
    )
    events.send_event(
        events.REVIEW_SAVED,
        {
            "study_id": study.pk,
            "review_id": review.pk,
            "finding_id": review.finding_id,
            "class": review.haemorrhage_class,
            "decision": review.decision,
        },
    )
    return review


AUDIT_CSV_COLUMNS = (
    "id",
    "created_at",
    "username",
    "action",
    "object_type",
    "object_id",
    "study_instance_uid",
    "client_address",
    "details",
)


@transaction.atomic
def audit_export(*, user: Any, address: str | None, filters: dict[str, Any]) -> Iterable[list[str]]:
    """Audits the export itself, then returns the filtered log as CSV lines."""
    events_qs = selectors.audit_events(**filters)
    audit_record(
        action=AuditAction.EXPORT,
        user=user,
        address=address,
        details={"what": "audit log", "filters": {k: str(v) for k, v in filters.items()}},
    )
    return _csv_lines(events_qs)


def _csv_lines(events_qs: QuerySet[AuditEvent]) -> Iterable[list[str]]:
    yield list(AUDIT_CSV_COLUMNS)
    for event in events_qs.select_related("study").iterator(chunk_size=2000):
        yield [
            str(event.pk),
            event.created_at.isoformat(),
            event.username,
            event.action,
            event.object_type,
            event.object_id,
            event.study.study_instance_uid if event.study else "",
            event.client_address or "",
            _json(event.details),
        ]


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def csv_line(row: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(row)
    return buffer.getvalue()


# Model permissions each role group gets in the Django admin (roles include lower roles).
ADMIN_GROUP_PERMISSIONS = (
    ("auth", "user", ("view", "add", "change")),
    ("auth", "group", ("view",)),
    ("worklist", "study", ("view",)),
    ("worklist", "series", ("view",)),
    ("worklist", "instance", ("view",)),
    ("worklist", "airesult", ("view",)),
    ("worklist", "finding", ("view",)),
    ("worklist", "review", ("view",)),
    ("worklist", "auditevent", ("view",)),
    ("worklist", "quarantinedfile", ("view",)),
)


@transaction.atomic
def roles_sync() -> None:
    """Makes sure every role group exists and the admin group has its admin-site permissions."""
    for role in ROLES:
        Group.objects.get_or_create(name=role)
    admin_group = Group.objects.get(name=ADMIN)
    for app_label, model, actions in ADMIN_GROUP_PERMISSIONS:
        codenames = [f"{action}_{model}" for action in actions]
        admin_group.permissions.add(
            *Permission.objects.filter(content_type__app_label=app_label, codename__in=codenames)
        )
