"""Roles and the checks every view and consumer uses.

Roles are Django groups ordered by what they may do: each role includes the
rights of the ones before it (a radiologist sees the worklist too; an admin can
also review). A user without any of these groups is logged in but may do nothing.
"""

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from rest_framework import authentication, permissions
from rest_framework.request import Request

ED_PHYSICIAN = "ed_physician"
RADIOLOGIST = "radiologist"
ADMIN = "admin"
ROLES = (ED_PHYSICIAN, RADIOLOGIST, ADMIN)
ROLE_LABELS = {ED_PHYSICIAN: "ED physician", RADIOLOGIST: "Radiologist", ADMIN: "Admin"}

User = AbstractBaseUser | AnonymousUser


def roles_of(user: Any) -> list[str]:
    """The roles a user holds, directly or through a higher role."""
    if not (user.is_authenticated and user.is_active):
        return []
    if user.is_superuser:
        return list(ROLES)
    held = set(user.groups.filter(name__in=ROLES).values_list("name", flat=True))
    if not held:
        return []
    highest = max(ROLES.index(name) for name in held)
    return list(ROLES[: highest + 1])


def has_role(user: Any, role: str) -> bool:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    return role in roles_of(user)


class SessionAuthentication(authentication.SessionAuthentication):
    """Session login for the API that answers 401 (not 403) to an anonymous caller."""

    def authenticate_header(self, request: Request) -> str:
        return 'Session realm="ich-triage"'


class DenyAll(permissions.BasePermission):
    """The API default: an endpoint that forgot to declare its role serves nobody."""

    required_role = ADMIN

    def has_permission(self, request: Request, view: Any) -> bool:
        return False


class _RolePermission(permissions.BasePermission):
    required_role: str = ADMIN

    def has_permission(self, request: Request, view: Any) -> bool:
        return has_role(request.user, self.required_role)


class IsEdPhysician(_RolePermission):
    required_role = ED_PHYSICIAN


class IsRadiologist(_RolePermission):
    required_role = RADIOLOGIST


class IsAdmin(_RolePermission):
    required_role = ADMIN


def role_required(
    role: str,
) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """For plain Django views: anonymous users go to the login page, wrong roles get 403."""

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not has_role(request.user, role):
                raise PermissionDenied(f"This page needs the {ROLE_LABELS[role]} role.")
            return view(request, *args, **kwargs)

        wrapper.required_role = role  # type: ignore[attr-defined]
        return wrapper

    return decorator


AUTHENTICATED = "authenticated"


def login_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """For the few pages any logged-in user needs whatever their role (logging out)."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        return view(request, *args, **kwargs)

    wrapper.required_role = AUTHENTICATED  # type: ignore[attr-defined]
    return wrapper


def public(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Marks a view that needs no login on purpose (the login page, /healthz)."""
    view.required_role = None  # type: ignore[attr-defined]
    return view
