"""Streaming response bodies under the ASGI server.

Django's ASGI handler reads a synchronous streaming body into a list before it sends the first
byte: a stored instance, a study's files or the whole audit log would sit in memory for every
download. ``streamed`` gives such a response an asynchronous body there instead, each chunk
produced in a thread as it is sent. Under WSGI (and the test client) bodies stay synchronous.
"""

from collections.abc import AsyncIterator, Iterable
from typing import Any, TypeVar, cast

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import StreamingHttpResponse

Streaming = TypeVar("Streaming", bound=StreamingHttpResponse)
BATCH = 64 * 1024  # bytes per message sent (Django's ASGI handler sends a file in such chunks)


def under_asgi(request: Any) -> bool:
    """Whether ``request`` (Django's, or DRF's wrapping it) came through the ASGI server."""
    return isinstance(getattr(request, "_request", request), ASGIRequest)


async def chunks_async(chunks: Iterable[bytes], *, database: bool = False) -> AsyncIterator[bytes]:
    """``chunks`` one at a time, each produced in a thread as it is sent. ``database``: the
    chunks query the database, so they are produced on the request's own sync thread (where
    its connection and cursor live); file reads go to any thread, so one long download does
    not hold up other requests."""
    iterator = iter(chunks)

    def following() -> bytes | None:
        """The next chunks, joined up to BATCH bytes: one thread hop per batch, not per CSV
        line."""
        batch = bytearray()
        for chunk in iterator:
            batch += chunk
            if len(batch) >= BATCH:
                break
        return bytes(batch) if batch else None

    produce = sync_to_async(following, thread_sensitive=database)
    while (chunk := await produce()) is not None:
        yield chunk


def streamed(response: Streaming, request: Any, *, database: bool = False) -> Streaming:
    """``response`` with an asynchronous body when ``request`` came through the ASGI server; its
    headers (a file's Content-Length among them) and closers stay as they were."""
    if under_asgi(request) and not response.is_async:
        body = cast(Iterable[bytes], response.streaming_content)  # synchronous: not is_async
        response.streaming_content = chunks_async(body, database=database)
    return response
