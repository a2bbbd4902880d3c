"""Downloads under the ASGI server are sent as they are read. Django's ASGI handler reads a
synchronous body into a list before the first byte (a whole study, a whole multi-frame file or
the whole audit log in memory per download); ``worklist.streaming`` makes those bodies
asynchronous there. Each test goes through Django's real ASGIHandler."""

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from django.core.handlers.asgi import ASGIHandler
from django.core.signals import request_finished
from django.db import connections
from django.test import Client

from tests.worklist.dicom_samples import part10, small_image, stub_scheduling
from worklist import api, dicomweb, services
from worklist.ingest import instance_ingest
from worklist.models import AuditAction, AuditEvent, IngestSource, Instance

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def scheduled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    monkeypatch.setattr("worklist.events._group_send", lambda message: None)
    return stub_scheduling(monkeypatch)


def _asgi_get(
    user: Any, path: str, at_first_byte: Callable[[], int]
) -> tuple[int, bytes, int, int]:
    """GET ``path`` as ``user`` through the ASGI handler: the status, the body, how many body
    messages it came in and what ``at_first_byte()`` said when the first one was sent."""
    client = Client()
    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": b"",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 5555),
        "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"127.0.0.1"), (b"cookie", cookie.encode())],
    }
    status: list[int] = []
    first: list[int] = []
    body = bytearray()
    messages = [0]
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
            if not first:
                first.append(at_first_byte())
            messages[0] += 1
            body.extend(message["body"])

    def close_in_request_thread(**_: Any) -> None:
        connections.close_all()  # CONN_MAX_AGE would keep the request thread's connection

    request_finished.connect(close_in_request_thread)
    try:
        asyncio.run(ASGIHandler()(scope, receive, send))
    finally:
        request_finished.disconnect(close_in_request_thread)
    return status[0], bytes(body), messages[0], first[0] if first else -1


def _ingest(dataset: Any) -> bytes:
    data = part10(dataset)
    assert instance_ingest(data=data, source=IngestSource.UPLOAD, address=None).accepted
    return data


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
        total += len(_ingest(dataset))
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
    status, body, _, read_at_first_byte = _asgi_get(
        user_with_role("ed_physician"), f"/dicomweb/studies/{study_uid}", lambda: read["bytes"]
    )
    assert status == 200
    assert read_at_first_byte < total / 4  # one file, not the study, read before sending
    assert read["bytes"] == total and len(body) > total  # every file, with the part headers


def test_an_instance_file_is_sent_as_it_is_read(
    user_with_role: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /api/instances/N/dicom of a 4 MiB instance: sent in blocks, the first before the
    file is read through, every byte as stored, with its length."""
    data = _ingest(small_image(rows=1024, columns=1024, frames=2))
    opened: list[Any] = []
    original = api.open_instance_file

    def spy(instance: Instance) -> Any:
        opened.append(original(instance))
        return opened[-1]

    monkeypatch.setattr(api, "open_instance_file", spy)
    instance = Instance.objects.get()
    status, body, messages, read_at_first_byte = _asgi_get(
        user_with_role("ed_physician"),
        f"/api/instances/{instance.pk}/dicom",
        lambda: opened[0].tell(),
    )
    assert status == 200
    assert body == data
    assert messages > 4 and read_at_first_byte < len(data) / 4
    assert opened[0].closed


def test_the_audit_log_csv_is_sent_as_it_is_read(
    user_with_role: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export queries the database in chunks on the request's thread, and sends batches of
    lines as it goes."""
    admin = user_with_role("admin")
    AuditEvent.objects.bulk_create(
        AuditEvent(action=AuditAction.LOGIN, username=f"user{i}", object_type="user")
        for i in range(5000)
    )
    lines = [0]
    original = services.csv_line

    def counting(row: list[str]) -> str:
        lines[0] += 1
        return original(row)

    monkeypatch.setattr(services, "csv_line", counting)
    status, body, _, lines_at_first_byte = _asgi_get(
        admin, "/api/audit/events.csv", lambda: lines[0]
    )
    assert status == 200
    rows = body.decode().splitlines()
    assert len(rows) == 1 + AuditEvent.objects.count()  # the header, then every row, its own too
    assert sum("user4999" in row for row in rows) == 1
    assert lines_at_first_byte < 5000 / 4  # a batch of lines, not the log
