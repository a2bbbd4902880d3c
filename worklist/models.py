"""The worklist's data: studies as they arrive, AI results, findings, reviews and the audit log.

PHI (patient name and id) lives only on Study; ``__str__`` never shows it, so
objects can be logged safely.
"""

from datetime import datetime, timedelta
from typing import ClassVar

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

UID_LENGTH = 64  # DICOM UI value representation: at most 64 characters


class StudyStatus(models.TextChoices):
    RECEIVING = "receiving", "Receiving"
    QUEUED = "queued", "Queued for AI"
    SCORING = "scoring", "AI scoring"
    SCORED = "scored", "AI scored"
    FAILED = "failed", "AI unavailable"
    NOT_ELIGIBLE = "not_eligible", "Not eligible for AI"


class ReviewState(models.TextChoices):
    UNREVIEWED = "unreviewed", "Not reviewed"
    REVIEWED = "reviewed", "Reviewed"


class HaemorrhageClass(models.TextChoices):
    ANY = "any", "Any haemorrhage"
    INTRAPARENCHYMAL = "intraparenchymal", "Intraparenchymal"
    INTRAVENTRICULAR = "intraventricular", "Intraventricular"
    SUBDURAL = "subdural", "Subdural"
    EPIDURAL = "epidural", "Epidural"
    SUBARACHNOID = "subarachnoid", "Subarachnoid"


S = StudyStatus
# Which status may follow which. A late instance sends any study back to receiving.
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    S.RECEIVING: frozenset({S.QUEUED, S.NOT_ELIGIBLE, S.FAILED}),
    S.QUEUED: frozenset({S.SCORING, S.FAILED, S.RECEIVING}),
    S.SCORING: frozenset({S.SCORED, S.FAILED, S.RECEIVING, S.QUEUED}),
    S.SCORED: frozenset({S.RECEIVING, S.QUEUED}),
    S.FAILED: frozenset({S.QUEUED, S.RECEIVING}),
    S.NOT_ELIGIBLE: frozenset({S.RECEIVING}),
}


class InvalidTransition(Exception):
    def __init__(self, study_id: int, current: str, target: str) -> None:
        super().__init__(f"Study {study_id} cannot go from '{current}' to '{target}'.")


class Study(models.Model):
    study_instance_uid = models.CharField(max_length=UID_LENGTH, unique=True)
    accession_number = models.CharField(max_length=64, blank=True)
    patient_id = models.CharField(max_length=64, blank=True)  # PHI
    patient_name = models.CharField(max_length=256, blank=True)  # PHI
    study_datetime = models.DateTimeField(null=True, blank=True)
    # StudyDate and StudyTime as the header gives them, in the study's own local time: QIDO
    # matches and answers with these (study_datetime is the same moment, stored in UTC).
    study_date = models.DateField(null=True, blank=True)
    study_time = models.CharField(max_length=16, blank=True)
    received_at = models.DateTimeField(default=timezone.now)
    last_instance_at = models.DateTimeField(default=timezone.now)
    status = models.CharField(
        max_length=16, choices=StudyStatus.choices, default=StudyStatus.RECEIVING
    )
    status_changed_at = models.DateTimeField(default=timezone.now)
    priority = models.FloatField(default=0.0)
    review_state = models.CharField(
        max_length=16, choices=ReviewState.choices, default=ReviewState.UNREVIEWED
    )

    class Meta:
        verbose_name_plural = "studies"
        indexes: ClassVar = [models.Index(fields=["-priority", "received_at"])]
        constraints: ClassVar = [
            models.CheckConstraint(
                condition=Q(status__in=StudyStatus.values), name="study_status_valid"
            ),
            models.CheckConstraint(
                condition=Q(review_state__in=ReviewState.values), name="study_review_state_valid"
            ),
            models.CheckConstraint(
                condition=Q(last_instance_at__gte=models.F("received_at")),
                name="study_last_instance_not_before_first",
            ),
        ]

    def __str__(self) -> str:
        return f"Study {self.pk}"

    def can_transition_to(self, target: str) -> bool:
        return target in ALLOWED_TRANSITIONS[self.status]

    def transition_to(self, target: str, *, at: datetime | None = None) -> None:
        """Move to ``target`` if allowed; the UPDATE re-checks the status, so no race skips it."""
        if not self.can_transition_to(target):
            raise InvalidTransition(self.pk, self.status, target)
        at = at or timezone.now()
        updated = Study.objects.filter(pk=self.pk, status=self.status).update(
            status=target, status_changed_at=at
        )
        if updated != 1:
            raise InvalidTransition(self.pk, f"{self.status} (changed concurrently)", target)
        self.status, self.status_changed_at = target, at

    def waiting_time(self, now: datetime | None = None) -> timedelta:
        return (now or timezone.now()) - self.received_at

    def is_overdue(self, now: datetime | None = None) -> bool:
        """A study waiting past the maximum is lifted to the top, flagged or not."""
        limit = timedelta(minutes=settings.ICH_MAX_WAIT_MINUTES)
        return self.review_state == ReviewState.UNREVIEWED and self.waiting_time(now) > limit


class Series(models.Model):
    study = models.ForeignKey(Study, on_delete=models.PROTECT, related_name="series")
    series_instance_uid = models.CharField(max_length=UID_LENGTH, unique=True)
    modality = models.CharField(max_length=16)
    series_number = models.IntegerField(null=True, blank=True)
    series_description = models.CharField(max_length=256, blank=True)
    body_part = models.CharField(max_length=64, blank=True)

    class Meta:
        verbose_name_plural = "series"

    def __str__(self) -> str:
        return f"Series {self.pk} of study {self.study_id}"


class Instance(models.Model):
    series = models.ForeignKey(Series, on_delete=models.PROTECT, related_name="instances")
    sop_instance_uid = models.CharField(max_length=UID_LENGTH, unique=True)
    sop_class_uid = models.CharField(max_length=UID_LENGTH)
    path = models.CharField(max_length=512, unique=True, help_text="Relative to the media root.")
    sha256 = models.CharField(max_length=64)
    size_bytes = models.PositiveBigIntegerField()
    instance_number = models.IntegerField(null=True, blank=True)
    slice_position = models.FloatField(null=True, blank=True)
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["series", "slice_position", "instance_number"]
        constraints: ClassVar = [
            models.CheckConstraint(condition=Q(sha256__regex=r"^[0-9a-f]{64}$"), name="sha256_hex"),
        ]

    def __str__(self) -> str:
        return f"Instance {self.pk} of series {self.series_id}"


class AIResultStatus(models.TextChoices):
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"


class AIResult(models.Model):
    """One scoring run of one study; a late instance makes a new one."""

    study = models.ForeignKey(Study, on_delete=models.PROTECT, related_name="ai_results")
    status = models.CharField(
        max_length=16, choices=AIResultStatus.choices, default=AIResultStatus.RUNNING
    )
    model_name = models.CharField(max_length=128)
    model_version = models.CharField(max_length=64)
    class_probabilities = models.JSONField(default=dict, blank=True)
    slice_probabilities = models.JSONField(default=list, blank=True)
    key_slices = models.JSONField(default=dict, blank=True)
    heatmaps = models.JSONField(default=dict, blank=True)
    prediction_basis = models.JSONField(default=dict, blank=True)
    timings = models.JSONField(default=dict, blank=True)
    # the operating point each class's flag used (the package's, or for a class a strip reader
    # fuses but could not read on this series, the ensemble's own), as the predictor returned it
    thresholds = models.JSONField(default=dict, blank=True)
    # slices of the series that could not be read and were left out: [{sop_instance_uid, reason}]
    skipped = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)
    # why the result could not be written as DICOM (SR and heatmap series); empty when it was
    export_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        get_latest_by = "created_at"
        constraints: ClassVar = [
            models.CheckConstraint(
                condition=Q(status__in=AIResultStatus.values), name="airesult_status_valid"
            ),
            models.CheckConstraint(
                condition=~Q(status=AIResultStatus.FAILED) | ~Q(error=""),
                name="airesult_failure_has_reason",
            ),
            models.CheckConstraint(
                condition=Q(status=AIResultStatus.RUNNING) | Q(finished_at__isnull=False),
                name="airesult_finished_has_time",
            ),
        ]

    def __str__(self) -> str:
        return f"AIResult {self.pk} of study {self.study_id}"


class Finding(models.Model):
    result = models.ForeignKey(AIResult, on_delete=models.PROTECT, related_name="findings")
    haemorrhage_class = models.CharField(max_length=32, choices=HaemorrhageClass.choices)
    probability = models.FloatField()
    flagged = models.BooleanField(
        help_text="At or above the model's operating point for this class."
    )
    key_instance = models.ForeignKey(
        Instance, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )

    class Meta:
        constraints: ClassVar = [
            models.UniqueConstraint(
                fields=["result", "haemorrhage_class"], name="one_finding_per_class_per_result"
            ),
            models.CheckConstraint(
                condition=Q(probability__gte=0.0) & Q(probability__lte=1.0),
                name="finding_probability_in_unit_interval",
            ),
            models.CheckConstraint(
                condition=Q(haemorrhage_class__in=HaemorrhageClass.values),
                name="finding_class_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"Finding {self.pk} ({self.haemorrhage_class})"


class ReviewDecision(models.TextChoices):
    CONFIRMED = "confirmed", "Confirmed"
    REJECTED = "rejected", "Rejected"
    MISSED = "missed", "Missed by AI"


class Review(models.Model):
    """A radiologist's decision on an AI finding, or a finding the AI missed."""

    study = models.ForeignKey(Study, on_delete=models.PROTECT, related_name="reviews")
    finding = models.ForeignKey(
        Finding, on_delete=models.PROTECT, null=True, blank=True, related_name="reviews"
    )
    haemorrhage_class = models.CharField(max_length=32, choices=HaemorrhageClass.choices)
    decision = models.CharField(max_length=16, choices=ReviewDecision.choices)
    comment = models.TextField(blank=True)
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering: ClassVar = ["created_at"]
        constraints: ClassVar = [
            models.CheckConstraint(
                condition=(Q(decision=ReviewDecision.MISSED) & Q(finding__isnull=True))
                | (~Q(decision=ReviewDecision.MISSED) & Q(finding__isnull=False)),
                name="review_missed_iff_no_finding",
            ),
            models.CheckConstraint(
                condition=Q(decision__in=ReviewDecision.values), name="review_decision_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"Review {self.pk} ({self.decision} {self.haemorrhage_class})"


class AuditAction(models.TextChoices):
    LOGIN = "auth.login", "Logged in"
    LOGOUT = "auth.logout", "Logged out"
    LOGIN_FAILED = "auth.login_failed", "Failed login"
    WORKLIST_VIEWED = "worklist.viewed", "Worklist viewed"
    STUDY_OPENED = "study.opened", "Study opened"
    IMAGES_FETCHED = "images.fetched", "Images fetched"
    REVIEW_SAVED = "review.saved", "Review saved"
    EXPORT = "export", "Export"
    INSTANCE_RECEIVED = "instance.received", "Instance received"
    INSTANCE_QUARANTINED = "instance.quarantined", "Instance refused and quarantined"
    DICOMWEB_QUERY = "dicomweb.query", "DICOMweb query (QIDO-RS)"
    DICOMWEB_RETRIEVE = "dicomweb.retrieve", "DICOMweb retrieve (WADO-RS)"
    ACCESS_DENIED = "access.denied", "Access refused to a logged-in user"
    AUDIT_VIEWED = "audit.viewed", "Audit log viewed"


class AuditEvent(models.Model):
    """Who did what to which object, when and from where. Append-only in the database.

    Migration 0002 installs a trigger that refuses UPDATE and DELETE on this table.
    """

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    username = models.CharField(max_length=150, blank=True, help_text="As typed or as logged in.")
    action = models.CharField(max_length=32, choices=AuditAction.choices, db_index=True)
    object_type = models.CharField(max_length=32, blank=True)
    object_id = models.CharField(max_length=64, blank=True)
    study = models.ForeignKey(
        Study, on_delete=models.PROTECT, null=True, blank=True, related_name="audit_events"
    )
    client_address = models.GenericIPAddressField(null=True, blank=True)
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering: ClassVar = ["-created_at", "-id"]
        indexes: ClassVar = [models.Index(fields=["user", "-created_at"])]

    def __str__(self) -> str:
        return f"AuditEvent {self.pk} {self.action}"


class IngestSource(models.TextChoices):
    C_STORE = "c-store", "DICOM C-STORE"
    STOW_RS = "stow-rs", "DICOMweb STOW-RS"
    UPLOAD = "upload", "Browser upload"


class QuarantinedFile(models.Model):
    """A file refused at ingest, kept for an admin to inspect; never deleted by the app.

    The file and a JSON side-car with the same facts lie under ``quarantine/`` in the media root.
    """

    path = models.CharField(max_length=512, unique=True, help_text="Relative to the media root.")
    reason = models.TextField()
    source = models.CharField(max_length=16, choices=IngestSource.choices)
    calling_ae = models.CharField(max_length=16, blank=True)
    client_address = models.GenericIPAddressField(null=True, blank=True)
    sop_instance_uid = models.CharField(
        max_length=UID_LENGTH, blank=True, help_text="When the file was readable enough to tell."
    )
    received_at = models.DateTimeField(default=timezone.now, db_index=True)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.PositiveBigIntegerField()

    class Meta:
        ordering: ClassVar = ["-received_at", "-id"]
        constraints: ClassVar = [
            models.CheckConstraint(
                condition=Q(sha256__regex=r"^[0-9a-f]{64}$"), name="quarantine_sha256_hex"
            ),
            models.CheckConstraint(
                condition=Q(source__in=IngestSource.values), name="quarantine_source_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"QuarantinedFile {self.pk}"
