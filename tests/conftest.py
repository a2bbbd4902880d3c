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


@pytest.fixture(scope="session", autouse=True)
def _feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The network-embedding cache of `ich convexity`, `refit-heads` and `atlas build`
    (inference.feature_cache) in a folder of this run: every run starts without one, and the
    tests that refit on the same studies with the same networks share it."""
    before = os.environ.get("ICH_FEATURE_CACHE")
    os.environ["ICH_FEATURE_CACHE"] = str(tmp_path_factory.mktemp("feature-cache"))
    yield
    if before is None:
        os.environ.pop("ICH_FEATURE_CACHE", None)
    else:
        os.environ["ICH_FEATURE_CACHE"] = before


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


def _worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment, pointed at the test database, Redis and media root."""
    env = dict(os.environ)
    env["ICH_DB_NAME"] = settings.DATABASES["default"]["NAME"]  # the test database
    env["REDIS_URL"] = settings.REDIS_URL
    env["ICH_MEDIA_ROOT"] = str(settings.MEDIA_ROOT)
    env.update(extra or {})
    return env


def start_celery_worker(
    *, env: dict[str, str] | None = None, task_events: bool = False, loglevel: str = "WARNING"
) -> tuple[subprocess.Popen, str]:
    """A real Celery worker process (solo pool, queues default and gpu) that answers a ping.

    ``env``: variables added to the test database, Redis and media root of ``_worker_env``.
    ``task_events``: the worker publishes task events (tests count the tasks it received).
    ``loglevel``: INFO lists every task received and finished (shown when a test fails)."""
    name = f"test-{os.getpid()}-{time.monotonic_ns()}@localhost"
    command = [
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
        loglevel,
        "--without-mingle",
        "--without-gossip",
        *(["--task-events"] if task_events else []),
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=_worker_env(env))
    try:
        _wait_for_worker(name, process)
    except BaseException:
        stop_celery_worker(process)
        raise
    return process, name


def stop_celery_worker(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def celery_worker_process(transactional_db) -> Iterator[subprocess.Popen]:  # type: ignore[no-untyped-def]
    """A real Celery worker process on the test database and the test Redis database."""
    process, _ = start_celery_worker()
    try:
        yield process
    finally:
        stop_celery_worker(process)


def _wait_for_worker(name: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Celery worker exited with {process.returncode}")
        if celery_app.control.ping(destination=[name], timeout=0.5):
            return
    raise RuntimeError("Celery worker did not answer a ping in time")
