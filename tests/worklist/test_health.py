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
    assert body["checks"]["model"]["ok"] is True  # the worker loaded it as it started
    assert body["checks"]["model"].get("model", "").startswith("ich-demo ")


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


@pytest.mark.worker
def test_healthz_is_503_and_says_why_when_the_workers_cannot_load_the_model(
    transactional_db, tmp_path
) -> None:
    """A worker loads the model as it starts: a damaged package shows on /healthz at once,
    not only on the next study."""
    from tests.conftest import start_celery_worker, stop_celery_worker
    from worklist import scheduling

    damaged = tmp_path / "model.pt"
    damaged.write_bytes(b"not a model package")
    scheduling._redis().delete(scheduling.MODEL_STATUS_KEY)
    process, _ = start_celery_worker(env={"ICH_MODEL_PATH": str(damaged)})
    try:
        body = Client().get(reverse("healthz")).json()
    finally:
        stop_celery_worker(process)
        scheduling._redis().delete(scheduling.MODEL_STATUS_KEY)
    assert body["status"] == "unavailable"
    assert body["checks"]["worker"]["ok"] is True
    assert body["checks"]["model"] == {
        "ok": False,
        "error": f"{damaged}: not a readable model package (not a PyTorch file of weights"
        " (only weights are read; nothing in it was run))",
    }
