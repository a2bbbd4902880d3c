"""The ASGI server as `make run` starts it (scripts/web.sh, the Procfile's web process), over
real sockets: an oversized upload is refused before it is sent, the worklist WebSocket opens
for a logged-in physician only, and a query string never reaches the server's log."""

import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.conftest import _worker_env

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.django_db(transaction=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """The web process on a free port, on the test database; its port and its log."""
    port = _free_port()
    log = tmp_path / "web.log"
    env = _worker_env({"PYTHON": sys.executable, "ICH_PORT": str(port), "ICH_UPLOAD_MAX_MB": "1"})
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(ROOT / "scripts" / "web.sh")], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        yield port, log
    finally:
        process.terminate()
        process.wait(timeout=30)


def _session_cookie(user: Any) -> str:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def _exchange(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send ``request`` and read the status line and headers the server answers with."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = connection.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


def test_an_upload_over_the_limit_is_refused_before_it_is_sent(
    server: tuple[int, Path],
) -> None:
    """A STOW-RS request declaring 10 GiB, of which 64 KiB are sent: answered 413 at once.
    (daphne, the server before, waited for the whole body and stored it first.)"""
    port, _ = server
    head = (
        "POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        'Content-Type: multipart/related; type="application/dicom"; boundary=x\r\n'
        f"Content-Length: {10 * 1024**3}\r\n\r\n"
    )
    answer = _exchange(port, head.encode() + b"x" * 65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer


def test_a_chunked_upload_that_grows_past_the_limit_is_answered_413(
    server: tuple[int, Path],
) -> None:
    """No length declared: the guard counts the body as it comes and answers 413 when it
    passes the limit (1 MiB + 1 MiB of room here), not a 500 from an app that never answered."""
    port, log = server
    head = (
        "POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        'Content-Type: multipart/related; type="application/dicom"; boundary=x\r\n'
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n" % (256 * 1024) + b"x" * (256 * 1024) + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(head.encode())
        try:
            for _ in range(16):  # 4 MiB at most
                connection.sendall(chunk)
        except OSError:
            pass  # closed once answered
        answer = connection.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    time.sleep(0.3)
    assert "ERROR" not in log.read_text()


def _websocket_request(port: int, cookie: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws/worklist/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Origin: http://127.0.0.1:{port}\r\n"
        + (f"Cookie: {cookie}\r\n" if cookie else "")
        + "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {key}\r\n\r\n"
    ).encode()


def test_the_worklist_websocket_opens_for_a_logged_in_physician_only(
    server: tuple[int, Path], user_with_role: Any
) -> None:
    port, _ = server
    anonymous = _exchange(port, _websocket_request(port, None))
    assert anonymous.startswith(b"HTTP/1.1 403"), anonymous
    cookie = _session_cookie(user_with_role("ed_physician"))
    accepted = _exchange(port, _websocket_request(port, cookie))
    assert accepted.startswith(b"HTTP/1.1 101"), accepted


def test_a_query_string_never_reaches_the_servers_log(
    server: tuple[int, Path], user_with_role: Any
) -> None:
    port, log = server
    cookie = _session_cookie(user_with_role("ed_physician"))
    request = (
        "GET /dicomweb/studies?PatientName=SECRETNAME HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Cookie: {cookie}\r\nAccept: application/dicom+json\r\n\r\n"
    )
    assert _exchange(port, request.encode()).startswith(b"HTTP/1.1 20")
    missing = "GET /nowhere?PatientID=SECRETID HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    assert _exchange(port, missing.encode()).startswith(b"HTTP/1.1 404")
    time.sleep(0.5)
    text = log.read_text()
    assert "SECRET" not in text, text


def test_an_exception_uvicorn_logs_keeps_its_type_not_its_message() -> None:
    """uvicorn configures its loggers with a handler of its own before it loads the app; the
    app's LOGGING then routes them through the filter that withholds patient data."""
    code = (
        "import logging, uvicorn.config\n"
        "uvicorn.config.Config('ichweb.asgi:application', log_level='warning')\n"
        "import ichweb.asgi\n"
        "try:\n"
        "    raise ValueError('PatientName SECRETNAME')\n"
        "except ValueError:\n"
        "    logging.getLogger('uvicorn.error').exception('Exception in ASGI application')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=_worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Exception in ASGI application" in result.stderr
    assert "ValueError" in result.stderr
    assert "SECRETNAME" not in result.stderr
