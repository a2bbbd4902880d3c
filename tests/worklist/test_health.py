import pytest
from django.test import Client
from django.urls import reverse


@pytest.mark.worker
def test_healthz_is_200_when_database_redis_and_a_worker_answer(celery_worker_process) -> None:
    response = Client().get(reverse("healthz"))
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"]["worker"]["workers"] >= 1


@pytest.mark.django_db
def test_healthz_is_503_and_names_the_worker_when_none_runs() -> None:
    response = Client().get(reverse("healthz"))
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database"] == {"ok": True}
    assert body["checks"]["redis"] == {"ok": True}
    assert body["checks"]["worker"]["ok"] is False


@pytest.mark.django_db
def test_healthz_is_503_when_redis_is_unreachable(settings) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    body = Client().get(reverse("healthz")).json()
    assert body["checks"]["redis"] == {"ok": False, "error": "ConnectionError"}
    assert body["checks"]["worker"] == {"ok": False, "error": "broker unreachable"}


@pytest.mark.django_db
def test_healthz_shows_no_patient_data_and_needs_no_login() -> None:
    body = Client().get(reverse("healthz")).content.decode()
    assert set(Client().get(reverse("healthz")).json()) == {"status", "checks"}
    assert "patient" not in body.lower()
