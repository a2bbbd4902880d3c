"""Settings come from the environment and stop start-up loudly on a bad value."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


PRODUCTION = {
    "ICH_ENV": "production",
    "ICH_SECRET_KEY": secrets.token_urlsafe(60),
    "ICH_ALLOWED_HOSTS": "ich.hospital.example",
}


def test_production_settings_pass_the_deploy_checklist() -> None:
    result = _manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ICH_SECRET_KEY": ""}, "ICH_SECRET_KEY is required"),
        ({"ICH_SECRET_KEY": "short"}, "ICH_SECRET_KEY must be a unique random string"),
        ({"ICH_ALLOWED_HOSTS": ""}, "ICH_ALLOWED_HOSTS is required"),
        ({"ICH_DEBUG": "1"}, "ICH_DEBUG must not be on"),
    ],
)
def test_production_refuses_to_start_without_safe_values(env: dict, message: str) -> None:
    result = _manage("check", **{**PRODUCTION, **env})
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ICH_SESSION_IDLE_TIMEOUT_MINUTES": "soon"}, "is not an integer"),
        ({"ICH_SESSION_IDLE_TIMEOUT_MINUTES": "0"}, "is out of range"),
        ({"ICH_DEBUG": "maybe"}, "is not a boolean"),
        ({"ICH_ENV": "staging"}, "must be one of development, production"),
        ({"REDIS_URL": "http://localhost"}, "REDIS_URL must start with redis://"),
        ({"ICH_PG_PORT": "70000"}, "ICH_PG_PORT=70000 is out of range"),
    ],
)
def test_a_bad_value_stops_start_up_naming_the_variable(env: dict, message: str) -> None:
    result = _manage("check", **env)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_idle_timeout_is_configurable() -> None:
    code = "from django.conf import settings; print(settings.SESSION_COOKIE_AGE)"
    result = _manage("shell", "-c", code, ICH_SESSION_IDLE_TIMEOUT_MINUTES="5")
    assert result.stdout.strip().splitlines()[-1] == "300", result.stderr
