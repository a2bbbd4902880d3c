"""The Django admin, for the admin role only: users, studies (read-only) and the audit log."""

from functools import update_wrapper
from typing import Any

from django.contrib import admin
from django.contrib.auth.admin import GroupAdmin, UserAdmin
from django.contrib.auth.models import Group, User
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, StreamingHttpResponse
from django.shortcuts import redirect
from django.urls import reverse

from worklist import services
from worklist.models import AIResult, AuditEvent, Finding, QuarantinedFile, Review, Study
from worklist.roles import ADMIN, has_role
from worklist.streaming import streamed


class IchAdminSite(admin.AdminSite):
    site_header = "ICH triage administration"
    site_title = "ICH triage admin"
    index_title = "Triage support, not diagnosis"
    required_role = ADMIN

    def has_permission(self, request: HttpRequest) -> bool:
        return has_role(request.user, ADMIN) and request.user.is_staff

    def admin_view(self, view: Any, cacheable: bool = False) -> Any:
        """Anonymous users go to the one login page; a user without the admin role gets 403."""
        inner = super().admin_view(view, cacheable)

        def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not self.has_permission(request):
                raise PermissionDenied("The admin site needs the Admin role.")
            return inner(request, *args, **kwargs)

        return update_wrapper(guarded, view)

    def login(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        """One login page for the whole app, so every login is throttled and audited alike."""
        return redirect_to_login(request.GET.get("next") or reverse("admin:index"))

    def logout(self, request: HttpRequest, extra_context: Any = None) -> Any:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        services.user_logout(request=request)
        return redirect("login")


admin_site = IchAdminSite(name="admin")


class IchUserAdmin(UserAdmin):
    """An admin who is not a superuser manages accounts and roles, but cannot make anyone (or
    themselves) a superuser or hand out single permissions: those stay with superusers."""

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fields = tuple(super().get_readonly_fields(request, obj))
        if request.user.is_superuser:
            return fields
        return (*fields, "is_superuser", "user_permissions")


admin_site.register(User, IchUserAdmin)
admin_site.register(Group, GroupAdmin)


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Study, site=admin_site)
class StudyAdmin(ReadOnlyAdmin):
    list_display = ("id", "accession_number", "status", "priority", "review_state", "received_at")
    list_filter = ("status", "review_state")
    search_fields = ("accession_number", "study_instance_uid")

    def get_object(self, request: HttpRequest, object_id: str, from_field: Any = None) -> Any:
        """Opening a study in the admin shows PHI, so it is audited like the API: whenever the
        admin finds the study, however its id was written (1, +1, 0_1)."""
        study = super().get_object(request, object_id, from_field)
        if study is not None:
            services.study_open(
                study_id=study.pk, user=request.user, address=services.client_address(request)
            )
        return study

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> Any:
        services.worklist_open(user=request.user, address=services.client_address(request))
        return super().changelist_view(request, extra_context)


@admin.register(AIResult, site=admin_site)
class AIResultAdmin(ReadOnlyAdmin):
    list_display = ("id", "study", "status", "model_name", "model_version", "created_at")
    list_filter = ("status", "model_name")


@admin.register(Finding, site=admin_site)
class FindingAdmin(ReadOnlyAdmin):
    list_display = ("id", "result", "haemorrhage_class", "probability", "flagged")
    list_filter = ("haemorrhage_class", "flagged")


@admin.register(Review, site=admin_site)
class ReviewAdmin(ReadOnlyAdmin):
    list_display = ("id", "study", "haemorrhage_class", "decision", "reviewer", "created_at")
    list_filter = ("decision", "haemorrhage_class")


@admin.action(description="Export the selected events as CSV")
def export_csv(
    modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet[AuditEvent]
) -> StreamingHttpResponse:
    rows = services.audit_export(
        user=request.user,
        address=services.client_address(request),
        filters={"ids": list(queryset.values_list("pk", flat=True))},
    )
    response = StreamingHttpResponse(
        (services.csv_line(row) for row in rows), content_type="text/csv"
    )
    response["Content-Disposition"] = 'attachment; filename="audit-log.csv"'
    return streamed(response, request, database=True)


def _admin_filters(request: HttpRequest) -> dict[str, str]:
    """The audit-log list's filters as given, values kept for the user, action and date filters
    only: a search box or a stray parameter could hold anything, a patient's name included."""
    kept = ("username", "action", "created_at")
    return {
        key: str(value) if key.split("__")[0] in kept else "(given)"
        for key, value in request.GET.items()
    }


@admin.register(AuditEvent, site=admin_site)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "username", "action", "object_type", "object_id", "study")
    list_filter = ("action", "created_at", "username")
    search_fields = ("username", "study__study_instance_uid", "object_id")
    date_hierarchy = "created_at"
    actions = (export_csv,)

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> Any:
        """Reading the audit log is audited, as in the API (the export is audited as such)."""
        if request.method == "GET":
            services.audit_viewed(
                user=request.user,
                address=services.client_address(request),
                filters=_admin_filters(request),
                what="admin list",
            )
        return super().changelist_view(request, extra_context)

    def get_object(self, request: HttpRequest, object_id: str, from_field: Any = None) -> Any:
        event = super().get_object(request, object_id, from_field)
        if event is not None:
            services.audit_viewed(
                user=request.user,
                address=services.client_address(request),
                filters={"id": event.pk},
                what="admin event",
            )
        return event


@admin.register(QuarantinedFile, site=admin_site)
class QuarantinedFileAdmin(ReadOnlyAdmin):
    """Files refused at ingest with their reason; the files are under quarantine/ in media."""

    list_display = ("received_at", "source", "calling_ae", "client_address", "reason", "size_bytes")
    list_filter = ("source", "received_at")
    search_fields = ("reason", "sha256", "sop_instance_uid", "calling_ae", "path")
    date_hierarchy = "received_at"

    # Any admin sees the quarantine, without a model permission on the admin group.
    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return has_role(request.user, ADMIN)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return has_role(request.user, ADMIN)
