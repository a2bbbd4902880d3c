"""WADO-RS under the ASGI server streams a study file by file. Django's ASGI handler reads a
synchronous body into a list before the first byte (a whole study in memory per retrieve);
the body is asynchronous there."""

import asyncio
from typing import Any

import pytest
from django.core.handlers.asgi import ASGIHandler
from django.core.signals import request_finished
from django.db import connections
from django.test import Client

from tests.worklist.dicom_samples import part10, small_image, stub_scheduling
from worklist import dicomweb
from worklist.ingest import instance_ingest
from worklist.models import IngestSource


@pytest.fixture(autouse=True)
def scheduled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    monkeypatch.setattr("worklist.events._group_send", lambda message: None)
    return stub_scheduling(monkeypatch)


@pytest.mark.django_db(transaction=True)
def test_a_study_is_sent_as_it_is_read_not_read_whole_first(
    user_with_role: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_uid, total = None, 0
    for _ in range(8):
        dataset = small_image(
            modality="CT",
            sop_class="1.2.840.10008.5.1.4.1.1.2",
            rows=256,
            columns=256,
            study_uid=study_uid,
        )
        study_uid = dataset.StudyInstanceUID
        data = part10(dataset)
        total += len(data)
        assert instance_ingest(data=data, source=IngestSource.UPLOAD, address=None).accepted
    read = {"bytes": 0}
    original = dicomweb._file_chunks

    def counting(path: Any) -> Any:
        chunks = original(path)

        def wrapped() -> Any:
            for chunk in chunks():
                read["bytes"] += len(chunk)
                yield chunk

        return wrapped

    monkeypatch.setattr(dicomweb, "_file_chunks", counting)
    client = Client()
    client.force_login(user_with_role("ed_physician"))
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"/dicomweb/studies/{study_uid}",
        "raw_path": b"",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 5555),
        "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"127.0.0.1"), (b"cookie", cookie.encode())],
    }
    status: list[int] = []
    read_at_first_byte: list[int] = []
    body = bytearray()
    received = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not received.is_set():
            received.set()
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message["type"] == "http.response.body" and message.get("body"):
            if not read_at_first_byte:
                read_at_first_byte.append(read["bytes"])
            body.extend(message["body"])

    def close_in_request_thread(**_: Any) -> None:
        connections.close_all()  # CONN_MAX_AGE would keep the request thread's connection

    request_finished.connect(close_in_request_thread)
    try:
        asyncio.run(ASGIHandler()(scope, receive, send))
    finally:
        request_finished.disconnect(close_in_request_thread)
    assert status == [200]
    assert read_at_first_byte[0] < total / 4  # one file, not the study, read before sending
    assert read["bytes"] == total and len(body) > total  # every file, with the part headers
