"""Audits every request a logged-in user is refused (HTTP 403), whichever view refused it."""

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from worklist import services

DENIED = 403


class AuditDeniedMiddleware:
    """After the view: a 403 to a logged-in user writes an ``access.denied`` audit row with the
    method and the path (no query string). Anonymous refusals (401, or a redirect to the login
    page) are not written: they name nobody, and failed logins are audited where they happen."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        user = getattr(request, "user", None)
        if response.status_code == DENIED and user is not None and user.is_authenticated:
            services.access_denied_audit(
                user=user,
                address=services.client_address(request),
                details={"channel": "http", "method": request.method, "path": request.path},
            )
        return response
