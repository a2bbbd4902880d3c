from rest_framework import serializers

from worklist.models import (
    AIResult,
    AuditAction,
    AuditEvent,
    Finding,
    HaemorrhageClass,
    Review,
    ReviewDecision,
    Study,
)


class StudyListSerializer(serializers.ModelSerializer):
    status_label = serializers.CharField(source="get_status_display", read_only=True)
    is_overdue = serializers.BooleanField(read_only=True)

    class Meta:
        model = Study
        fields = (
            "id",
            "study_instance_uid",
            "accession_number",
            "patient_id",
            "patient_name",
            "study_datetime",
            "received_at",
            "last_instance_at",
            "status",
            "status_label",
            "priority",
            "review_state",
            "is_overdue",
        )


class FindingSerializer(serializers.ModelSerializer):
    class Meta:
        model = Finding
        fields = ("id", "haemorrhage_class", "probability", "flagged", "key_instance")


TRIAGE_NOTICE = "Triage support, not diagnosis: a clinician reads the full images."


class AIResultSerializer(serializers.ModelSerializer):
    findings = FindingSerializer(many=True, read_only=True)
    notice = serializers.SerializerMethodField()

    def get_notice(self, result: AIResult) -> str:
        return TRIAGE_NOTICE

    class Meta:
        model = AIResult
        fields = (
            "id",
            "status",
            "model_name",
            "model_version",
            "class_probabilities",
            "key_slices",
            "timings",
            "thresholds",
            "skipped",
            "error",
            "export_error",
            "created_at",
            "finished_at",
            "findings",
            "notice",
        )


class ReviewSerializer(serializers.ModelSerializer):
    reviewer = serializers.CharField(source="reviewer.get_username", read_only=True)

    class Meta:
        model = Review
        fields = (
            "id",
            "finding",
            "haemorrhage_class",
            "decision",
            "comment",
            "reviewer",
            "created_at",
        )


class StudyDetailSerializer(StudyListSerializer):
    ai_results = AIResultSerializer(many=True, read_only=True)
    reviews = ReviewSerializer(many=True, read_only=True)

    class Meta(StudyListSerializer.Meta):
        fields = (*StudyListSerializer.Meta.fields, "ai_results", "reviews")  # type: ignore[assignment]


class FindingReviewInputSerializer(serializers.Serializer):
    decision = serializers.ChoiceField(
        choices=[ReviewDecision.CONFIRMED.value, ReviewDecision.REJECTED.value]
    )
    comment = serializers.CharField(required=False, allow_blank=True, max_length=4000, default="")


class MissedFindingInputSerializer(serializers.Serializer):
    haemorrhage_class = serializers.ChoiceField(choices=HaemorrhageClass.choices)
    comment = serializers.CharField(required=False, allow_blank=True, max_length=4000, default="")


class AuditEventSerializer(serializers.ModelSerializer):
    study_instance_uid = serializers.CharField(
        source="study.study_instance_uid", read_only=True, default=None
    )

    class Meta:
        model = AuditEvent
        fields = (
            "id",
            "created_at",
            "username",
            "action",
            "object_type",
            "object_id",
            "study",
            "study_instance_uid",
            "client_address",
            "details",
        )


class AuditFilterSerializer(serializers.Serializer):
    username = serializers.CharField(required=False, max_length=150)
    study = serializers.CharField(required=False, max_length=64, help_text="id or StudyInstanceUID")
    action = serializers.ChoiceField(required=False, choices=AuditAction.choices)
    since = serializers.DateTimeField(required=False)
    until = serializers.DateTimeField(required=False)
