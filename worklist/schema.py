"""OpenAPI description of the project's session authentication (drf-spectacular extension)."""

from drf_spectacular.authentication import SessionScheme


class IchSessionScheme(SessionScheme):
    target_class = "worklist.roles.SessionAuthentication"
