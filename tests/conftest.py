import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client

from ichweb.celery import app as celery_app
from tests.factories import UserFactory
from worklist.roles import ADMIN, ED_PHYSICIAN, RADIOLOGIST

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _test_settings(tmp_path: Path, settings) -> None:  # type: ignore[no-untyped-def]
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.PASSWORD_HASHERS = [
        "django.contrib.auth.hashers.MD5PasswordHasher"
    ]  # fast, tests only


@pytest.fixture
def user_with_role(db) -> Callable[..., object]:  # type: ignore[no-untyped-def]
    def make(role: str | None, **kwargs: object) -> object:
        return UserFactory(role=role, **kwargs)

    return make


@pytest.fixture
def client_as(user_with_role) -> Callable[[str | None], Client]:  # type: ignore[no-untyped-def]
    """A test client logged in as a new user holding ``role`` (None: logged in, no role)."""

    def make(role: str | None) -> Client:
        client = Client()
        client.force_login(user_with_role(role))
        return client

    return make


@pytest.fixture
def ed_client(client_as) -> Client:  # type: ignore[no-untyped-def]
    return client_as(ED_PHYSICIAN)


@pytest.fixture
def radiologist_client(client_as) -> Client:  # type: ignore[no-untyped-def]
    return client_as(RADIOLOGIST)


@pytest.fixture
def admin_client_(client_as) -> Client:  # type: ignore[no-untyped-def]
    return client_as(ADMIN)


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["ICH_DB_NAME"] = settings.DATABASES["default"]["NAME"]  # the test database
    env["REDIS_URL"] = settings.REDIS_URL
    return env


@pytest.fixture
def celery_worker_process(transactional_db) -> Iterator[subprocess.Popen]:  # type: ignore[no-untyped-def]
    """A real Celery worker process on the test database and the test Redis database."""
    name = f"test-{os.getpid()}-{time.monotonic_ns()}@localhost"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "--app",
            "ichweb",
            "worker",
            "--pool",
            "solo",
            "--queues",
            "default,gpu",
            "--hostname",
            name,
            "--loglevel",
            "WARNING",
            "--without-mingle",
            "--without-gossip",
        ],
        cwd=ROOT,
        env=_worker_env(),
    )
    try:
        _wait_for_worker(name, process)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_for_worker(name: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Celery worker exited with {process.returncode}")
        if celery_app.control.ping(destination=[name], timeout=0.5):
            return
    raise RuntimeError("Celery worker did not answer a ping in time")
