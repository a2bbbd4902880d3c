from django.urls import path

from worklist import api, uploads

urlpatterns = [
    path("me/", api.MeView.as_view(), name="api-me"),
    path("studies/", api.StudyListView.as_view(), name="api-study-list"),
    path("studies/<int:study_id>/", api.StudyDetailView.as_view(), name="api-study-detail"),
    path(
        "studies/<int:study_id>/missed-findings/",
        api.MissedFindingView.as_view(),
        name="api-missed-finding",
    ),
    path("instances/<int:instance_id>/dicom", api.InstanceFileView.as_view(), name="api-instance"),
    path(
        "findings/<int:finding_id>/reviews/",
        api.FindingReviewView.as_view(),
        name="api-finding-review",
    ),
    path("studies/<int:study_id>/result/", api.StudyResultView.as_view(), name="api-study-result"),
    path(
        "results/<int:result_id>/<str:kind>/<str:name>/<str:key>.png",
        api.ResultImageView.as_view(),
        name="api-result-image",
    ),
    path("uploads/", uploads.UploadView.as_view(), name="api-uploads"),
    path(
        "results/<int:result_id>/dicom.zip", api.ResultDicomView.as_view(), name="api-result-dicom"
    ),
    path("audit/events/", api.AuditEventListView.as_view(), name="api-audit-list"),
    path("audit/events.csv", api.AuditEventExportView.as_view(), name="api-audit-export"),
]
