"""Server-rendered pages: login, logout, home and /healthz."""

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from worklist import health, services
from worklist.roles import (
    ED_PHYSICIAN,
    ROLE_LABELS,
    login_required,
    public,
    role_required,
    roles_of,
)


class LoginView(auth_views.LoginView):
    required_role = None  # public on purpose
    template_name = "registration/login.html"
    redirect_authenticated_user = True

    def get_context_data(self, **kwargs):
        return super().get_context_data(
            idle_minutes=settings.SESSION_IDLE_TIMEOUT_MINUTES, **kwargs
        )

    def form_valid(self, form):
        services.user_login(request=self.request, user=form.get_user())
        return redirect(self.get_success_url())

    def form_invalid(self, form):
        services.login_failure_record(
            request=self.request, username=self.request.POST.get("username", "")
        )
        return super().form_invalid(form)


@login_required
@require_POST
def logout(request: HttpRequest) -> HttpResponse:
    services.user_logout(request=request)
    return redirect("login")


@role_required(ED_PHYSICIAN)
@require_GET
def home(request: HttpRequest) -> HttpResponse:
    roles = [ROLE_LABELS[role] for role in roles_of(request.user)]
    return render(request, "worklist/home.html", {"roles": roles})


@public
@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    report = health.health_report()
    return JsonResponse(report, status=200 if report["status"] == "ok" else 503)
