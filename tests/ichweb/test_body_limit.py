"""The ASGI body guard: a body over ICH_UPLOAD_MAX_MB is refused before anything reads it."""

import asyncio
from typing import Any

from ichweb.body_limit import MULTIPART_ROOM, BodyLimit


def _scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/dicomweb/studies", "headers": headers}


def _run(app: Any, scope: dict[str, Any], chunks: list[bytes]) -> tuple[list[Any], list[Any]]:
    sent: list[Any] = []
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(BodyLimit(app)(scope, receive, send))
    return sent, pending


def test_a_declared_length_over_the_limit_is_a_413_and_the_app_never_runs(settings: Any) -> None:
    settings.ICH_UPLOAD_MAX_MB = 1
    called: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(scope)

    length = str(2**20 + MULTIPART_ROOM + 1).encode()
    sent, pending = _run(app, _scope([(b"content-length", length)]), [b"x"])
    assert not called
    assert sent[0]["status"] == 413
    assert pending  # the body was never read


def test_a_body_without_a_length_that_grows_past_the_limit_is_a_413_and_a_disconnect(
    settings: Any,
) -> None:
    settings.ICH_UPLOAD_MAX_MB = 1
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                return

    chunk = b"x" * (512 * 1024)
    sent, _ = _run(app, _scope([]), [chunk] * 8)  # 4 MiB, chunked
    assert seen[-1] == "http.disconnect"
    assert seen.count("http.request") == 4  # 2 MiB + room: the fifth chunk is over
    # the client is answered 413 (a server would otherwise log an app that did not answer
    # and send a 500)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413


def test_after_the_413_what_the_app_sends_is_dropped(settings: Any) -> None:
    settings.ICH_UPLOAD_MAX_MB = 1

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"no"})

    sent, _ = _run(app, _scope([]), [b"x" * (512 * 1024)] * 8)
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [413]


def test_a_body_within_the_limit_reaches_the_app_whole(settings: Any) -> None:
    settings.ICH_UPLOAD_MAX_MB = 1
    bodies: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        bodies.append(message["body"])

    _run(app, _scope([(b"content-length", b"3")]), [b"abc"])
    assert bodies == [b"abc"]
