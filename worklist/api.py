"""The JSON API. Views validate input, call one service or selector and serialise the output."""

from django.core.exceptions import ObjectDoesNotExist
from django.http import FileResponse, HttpResponse, StreamingHttpResponse
from django.urls import reverse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler

from worklist import selectors, services
from worklist.media import open_instance_file
from worklist.models import AIResult, InvalidTransition
from worklist.roles import IsAdmin, IsEdPhysician, IsRadiologist, roles_of
from worklist.serializers import (
    AIResultSerializer,
    AuditEventSerializer,
    AuditFilterSerializer,
    FindingReviewInputSerializer,
    MissedFindingInputSerializer,
    ReviewSerializer,
    StudyDetailSerializer,
    StudyListSerializer,
)
from worklist.streaming import streamed


class MeView(APIView):
    permission_classes = [IsEdPhysician]

    @extend_schema(responses={200: dict})
    def get(self, request: Request) -> Response:
        return Response({"username": request.user.get_username(), "roles": roles_of(request.user)})


class StudyListView(generics.ListAPIView):
    """The worklist, highest priority first. Audited as "worklist viewed"."""

    permission_classes = [IsEdPhysician]
    serializer_class = StudyListSerializer

    def get_queryset(self):
        return services.worklist_open(
            user=self.request.user, address=services.client_address(self.request)
        )


class StudyDetailView(APIView):
    permission_classes = [IsEdPhysician]

    @extend_schema(responses=StudyDetailSerializer)
    def get(self, request: Request, study_id: int) -> Response:
        study = services.study_open(
            study_id=study_id, user=request.user, address=services.client_address(request)
        )
        return Response(StudyDetailSerializer(study).data)


class InstanceFileView(APIView):
    """One stored DICOM instance as application/dicom. Audited as "images fetched"."""

    permission_classes = [IsEdPhysician]

    @extend_schema(responses={(200, "application/dicom"): bytes})
    def get(self, request: Request, instance_id: int) -> FileResponse:
        instance = services.instance_fetch(
            instance_id=instance_id, user=request.user, address=services.client_address(request)
        )
        response = FileResponse(open_instance_file(instance), content_type="application/dicom")
        return streamed(response, request)


class FindingReviewView(APIView):
    """A radiologist confirms or rejects an AI finding; every open worklist hears of it."""

    permission_classes = [IsRadiologist]

    @extend_schema(request=FindingReviewInputSerializer, responses={201: ReviewSerializer})
    def post(self, request: Request, finding_id: int) -> Response:
        data = _validated(FindingReviewInputSerializer, request.data)
        finding = selectors.finding_get(finding_id=finding_id)
        review = services.finding_review(
            finding=finding,
            reviewer=request.user,
            address=services.client_address(request),
            **data,
        )
        return Response(ReviewSerializer(review).data, status=status.HTTP_201_CREATED)


class MissedFindingView(APIView):
    """A radiologist adds a haemorrhage the AI did not flag."""

    permission_classes = [IsRadiologist]

    @extend_schema(request=MissedFindingInputSerializer, responses={201: ReviewSerializer})
    def post(self, request: Request, study_id: int) -> Response:
        data = _validated(MissedFindingInputSerializer, request.data)
        review = services.missed_finding_add(
            study=selectors.study_get(study_id=study_id),
            reviewer=request.user,
            address=services.client_address(request),
            **data,
        )
        return Response(ReviewSerializer(review).data, status=status.HTTP_201_CREATED)


_AUDIT_FILTERS = [
    OpenApiParameter("username", str),
    OpenApiParameter("study", str, description="Study id or StudyInstanceUID"),
    OpenApiParameter("action", str),
    OpenApiParameter("since", str, description="ISO 8601, inclusive"),
    OpenApiParameter("until", str, description="ISO 8601, exclusive"),
]


class AuditEventListView(generics.ListAPIView):
    """The audit log, newest first, filtered by user, study, action and time."""

    permission_classes = [IsAdmin]
    serializer_class = AuditEventSerializer

    @extend_schema(parameters=_AUDIT_FILTERS)
    def get(self, request: Request, *args: object, **kwargs: object) -> Response:
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        filters = _validated(AuditFilterSerializer, self.request.query_params)
        services.audit_viewed(
            user=self.request.user,
            address=services.client_address(self.request),
            filters=filters,
            what="api",
        )
        return selectors.audit_events(**filters)


class AuditEventExportView(APIView):
    """The filtered audit log as CSV. The export itself is audited."""

    permission_classes = [IsAdmin]

    @extend_schema(parameters=_AUDIT_FILTERS, responses={(200, "text/csv"): str})
    def get(self, request: Request) -> StreamingHttpResponse:
        rows = services.audit_export(
            user=request.user,
            address=services.client_address(request),
            filters=_validated(AuditFilterSerializer, request.query_params),
        )
        response = StreamingHttpResponse(
            (services.csv_line(row) for row in rows), content_type="text/csv"
        )
        response["Content-Disposition"] = 'attachment; filename="audit-log.csv"'
        return streamed(response, request, database=True)


def _validated(serializer_class: type, data: object) -> dict:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


def exception_handler(exc: Exception, context: dict) -> Response | None:
    """DRF's handler, plus: a missing object is a 404, a refused domain rule a 400."""
    if isinstance(exc, ObjectDoesNotExist):
        exc = NotFound()
    elif isinstance(exc, ValueError | InvalidTransition):
        exc = ValidationError({"detail": str(exc)})
    return drf_exception_handler(exc, context)


class StudyResultView(APIView):
    """The latest AI result of a study: findings, per-slice probabilities, heatmap and
    prediction-basis image URLs. Audited as "study opened"."""

    permission_classes = [IsEdPhysician]

    @extend_schema(responses={200: dict})
    def get(self, request: Request, study_id: int) -> Response:
        result = services.study_result_open(
            study_id=study_id, user=request.user, address=services.client_address(request)
        )
        return Response(result_payload(result, request))


class ResultImageView(APIView):
    """A stored result image (a heatmap slice or a prediction-basis picture) as PNG."""

    permission_classes = [IsEdPhysician]

    @extend_schema(responses={(200, "image/png"): bytes})
    def get(self, request: Request, result_id: int, kind: str, name: str, key: str) -> FileResponse:
        path = services.result_image_fetch(
            result_id=result_id,
            kind=kind,
            class_name=name,
            key=key,
            user=request.user,
            address=services.client_address(request),
        )
        return FileResponse(path.open("rb"), content_type="image/png")


class ResultDicomView(APIView):
    """The result as DICOM: the Structured Report and the heatmap series, zipped."""

    permission_classes = [IsEdPhysician]

    @extend_schema(responses={(200, "application/zip"): bytes})
    def get(self, request: Request, result_id: int) -> HttpResponse:
        content = services.result_dicom_export(
            result_id=result_id, user=request.user, address=services.client_address(request)
        )
        response = HttpResponse(content, content_type="application/zip")
        response["Content-Disposition"] = f'attachment; filename="ai-result-{result_id}.zip"'
        return response


def result_payload(result: AIResult, request: Request) -> dict:
    def url(kind: str, name: str, key: str) -> str:
        return request.build_absolute_uri(
            reverse("api-result-image", args=[result.pk, kind, name, key])
        )

    return {
        **AIResultSerializer(result).data,
        "slice_probabilities": result.slice_probabilities,
        "heatmaps": {
            name: {uid: url("heatmaps", name, uid) for uid in slices}
            for name, slices in result.heatmaps.items()
        },
        "prediction_basis": {
            name: [
                {
                    **{k: v for k, v in entry.items() if k != "image"},
                    "image": url("basis", name, str(rank)),
                }
                for rank, entry in enumerate(entries)
            ]
            for name, entries in result.prediction_basis.items()
        },
        "dicom": request.build_absolute_uri(reverse("api-result-dicom", args=[result.pk])),
    }
