"""Walks every URL pattern the project defines: nothing answers without login and the right role.

A new endpoint that forgets its protection, or does not declare which role it needs, fails here.
"""

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.urls.resolvers import RegexPattern, RoutePattern

from worklist.roles import AUTHENTICATED, ROLES

PUBLIC_BY_DESIGN = {"login", "healthz", "admin:login"}
# Answer 403 to every role by design (read-only admin, or a GET without its query parameters):
# for these only the refusals are checked.
REFUSES_EVERYONE = re.compile(r"admin:(autocomplete|.*_(add|change|delete|history))$")
SAMPLES = ("1", "x", "worklist", "auth", str(uuid.UUID(int=1)), "")
CONVERTER_SAMPLES = {
    "int": "1",
    "str": "x",
    "slug": "x",
    "path": "x",
    "uuid": str(uuid.UUID(int=1)),
}


def _route_sample(route: str) -> str:
    return re.sub(r"<(?:(\w+):)?\w+>", lambda m: CONVERTER_SAMPLES[m.group(1) or "str"], route)


def _regex_sample(regex: str) -> str:
    def group(match: re.Match[str]) -> str:
        inner = match.group(1)
        return next(s for s in SAMPLES if re.fullmatch(inner, s))

    text = re.sub(r"\(\?P<\w+>([^()]*(?:\([^()]*\)[^()]*)*)\)", group, regex)
    return text.lstrip("^").rstrip("$").replace("\\", "")


def _sample(pattern: Any) -> str:
    if isinstance(pattern, RoutePattern):
        return _route_sample(str(pattern))
    if isinstance(pattern, RegexPattern):
        return _regex_sample(pattern.regex.pattern)
    raise TypeError(pattern)


def _walk(resolver: URLResolver, prefix: str = "/", namespace: str = "") -> Iterator[tuple]:
    for entry in resolver.url_patterns:
        path = prefix + _sample(entry.pattern)
        if isinstance(entry, URLResolver):
            yield from _walk(entry, path, entry.namespace or namespace)
        else:
            name = f"{namespace}:{entry.name}" if namespace else (entry.name or "")
            yield path, name, entry


def _required_role(name: str, entry: URLPattern) -> str | None:
    """What the view declares: a role, AUTHENTICATED, or None for a public view."""
    if name in PUBLIC_BY_DESIGN:
        return None
    if name.startswith("admin:"):
        return "admin"
    callback = entry.callback
    permission_classes = getattr(callback, "initkwargs", {}).get("permission_classes") or getattr(
        getattr(callback, "cls", None), "permission_classes", None
    )
    if permission_classes:
        return permission_classes[0].required_role
    for holder in (callback, getattr(callback, "view_class", None)):
        if holder is not None and hasattr(holder, "required_role"):
            return holder.required_role
    pytest.fail(
        f"{entry.pattern} ({name}) declares no role: use roles.role_required or a permission"
    )


PATTERNS = [
    (path, name, _required_role(name, entry)) for path, name, entry in _walk(get_resolver())
]
PROTECTED = [(path, name, role) for path, name, role in PATTERNS if role is not None]


def test_the_walk_finds_the_project_endpoints() -> None:
    names = {name for _, name, _ in PATTERNS}
    assert {"home", "api-study-list", "api-audit-list", "schema", "admin:index"} <= names
    assert len(PROTECTED) > 20


def test_only_the_login_pages_and_healthz_are_public() -> None:
    public = {name for _, name, role in PATTERNS if role is None}
    assert public == PUBLIC_BY_DESIGN


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "name", "role"), PROTECTED, ids=[p[0] for p in PROTECTED])
def test_an_anonymous_request_is_refused(path: str, name: str, role: str) -> None:
    client = Client()
    for method in (client.get, client.post):
        response = method(path)
        assert response.status_code in (401, 302), f"{method.__name__.upper()} {path}"
        if response.status_code == 302:
            assert "login" in response["Location"]


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "name", "role"), PROTECTED, ids=[p[0] for p in PROTECTED])
def test_a_wrong_role_gets_403_and_the_right_role_gets_in(
    path: str, name: str, role: str, client_as: Any
) -> None:
    allowed = ROLES[ROLES.index(role) :] if role != AUTHENTICATED else ROLES
    refused = [None, *ROLES[: ROLES.index(role)]] if role != AUTHENTICATED else []
    for wrong in refused:
        assert client_as(wrong).get(path).status_code == 403, f"{path} as {wrong or 'no role'}"
    for right in allowed if not REFUSES_EVERYONE.match(name) else ():
        assert client_as(right).get(path).status_code not in (401, 403), f"{path} as {right}"


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "name", "role"), PROTECTED, ids=[p[0] for p in PROTECTED])
def test_a_role_below_the_views_is_refused_whatever_the_method(
    path: str, name: str, role: str, client_as: Any
) -> None:
    """Writes too (POST, PUT, PATCH, DELETE): no role, or a role below the one the view
    declares, gets nothing. A method may need more than the view's role (a radiologist for
    STOW-RS and reviews; tested with the views), never less. The WebSocket's refusals are in
    test_consumers.py."""
    if role == AUTHENTICATED:
        pytest.skip("open to every logged-in user")
    for wrong in [None, *ROLES[: ROLES.index(role)]]:
        client = client_as(wrong)
        for method in (client.post, client.put, client.patch, client.delete):
            status = method(path).status_code
            assert status in (403, 405), f"{method.__name__.upper()} {path} as {wrong}: {status}"
