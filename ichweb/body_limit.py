"""An ASGI guard on request bodies, in front of Django.

A request whose Content-Length is over the limit is answered 413 before anything reads its body
(Django would copy it into a temporary file first, and only then check who sent it); a body
without a length (chunked) that grows past the limit is answered 413 as it passes it, and the
application sees a client disconnect. The limit is
ICH_UPLOAD_MAX_MB, the largest STOW-RS or upload request, plus room for multipart headers.

The server, uvicorn (scripts/web.sh), hands a body to the application as it arrives, so an
oversized upload is refused before the rest of it is sent (daphne, the server before, received a
whole body first).
"""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.conf import settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]  # Django's handler types its arguments its own way

MULTIPART_ROOM = 1024 * 1024


def body_limit() -> int:
    return int(settings.ICH_UPLOAD_MAX_MB) * 1024 * 1024 + MULTIPART_ROOM


class BodyLimit:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(send, limit)
            return
        received = 0
        answered = False  # the 413 below went out: what the app sends after it is dropped

        async def counted() -> Message:
            nonlocal received, answered
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not started:
                        answered = True
                        await _too_large(send, limit)
                    return {"type": "http.disconnect"}
            return message

        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if answered:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, sending)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(send: Send, limit: int) -> None:
    body = f"Request body over the {limit // 2**20} MiB this server accepts.\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
