from django.urls import path

from worklist import api

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
    path("audit/events/", api.AuditEventListView.as_view(), name="api-audit-list"),
    path("audit/events.csv", api.AuditEventExportView.as_view(), name="api-audit-export"),
]
