"""Liveness of the parts the app needs: database, Redis and at least one Celery worker."""

from typing import Any

import redis
from django.conf import settings
from django.db import connection

from ichweb.celery import app as celery_app


def _database() -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return {"ok": True}


def _redis() -> dict[str, Any]:
    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    finally:
        client.close()
    return {"ok": True}


def _worker() -> dict[str, Any]:
    replies = celery_app.control.ping(timeout=1.0)
    return {"ok": bool(replies), "workers": len(replies)}


def _model() -> dict[str, Any]:
    """Whether the workers could load the model, as the last one to try said (a worker loads
    it as it starts). Unknown until a worker has tried: not a failure."""
    from worklist.scheduling import model_status

    status = model_status()
    if status is None:
        return {"ok": True, "loaded": "no worker has loaded it yet"}
    return status


CHECKS = {"database": _database, "redis": _redis, "worker": _worker, "model": _model}


def health_report() -> dict[str, Any]:
    """Runs every check; a check that raises is reported as down with the exception's class only."""
    checks: dict[str, Any] = {}
    for name, check in CHECKS.items():
        if name in ("worker", "model") and not checks["redis"]["ok"]:
            checks[name] = {"ok": False, "error": "broker unreachable"}
            continue
        try:
            checks[name] = check()
        except Exception as error:  # a health check reports, never raises
            checks[name] = {"ok": False, "error": type(error).__name__}
    healthy = all(check["ok"] for check in checks.values())
    return {"status": "ok" if healthy else "unavailable", "checks": checks}
