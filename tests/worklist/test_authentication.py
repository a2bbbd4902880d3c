import pytest
from django.contrib.auth.password_validation import validate_password
from django.contrib.sessions.models import Session
from django.core.exceptions import ValidationError
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from worklist.models import AuditAction, AuditEvent

pytestmark = pytest.mark.django_db
GOOD = "correct-horse-battery-9"


def _login(client: Client, password: str) -> int:
    response = client.post(reverse("login"), {"username": "alice", "password": password})
    return response.status_code


def test_repeated_failed_logins_lock_the_account_even_with_the_right_password(
    user_with_role, settings
) -> None:
    user_with_role("ed_physician", username="alice")
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT):
        _login(client, "wrong")
    assert _login(client, GOOD) in (403, 429)
    assert not AuditEvent.objects.filter(action=AuditAction.LOGIN).exists()
    assert client.get(reverse("api-me")).status_code == 401


def test_a_good_login_lands_on_the_home_page_which_says_triage_not_diagnosis(
    user_with_role,
) -> None:
    user_with_role("ed_physician", username="alice")
    client = Client()
    assert _login(client, GOOD) == 302
    page = client.get(reverse("home"))
    assert page.status_code == 200
    assert b"Triage support, not diagnosis" in page.content


def test_the_login_page_says_triage_not_diagnosis() -> None:
    page = Client().get(reverse("login"))
    assert page.status_code == 200
    assert b"Triage support, not diagnosis" in page.content


def test_a_session_ends_after_the_idle_timeout(ed_client: Client, settings) -> None:
    assert settings.SESSION_COOKIE_AGE == 15 * 60
    assert settings.SESSION_SAVE_EVERY_REQUEST
    assert ed_client.get(reverse("api-me")).status_code == 200
    Session.objects.update(expire_date=timezone.now() - timezone.timedelta(seconds=1))
    assert ed_client.get(reverse("api-me")).status_code == 401


def test_each_request_pushes_the_idle_deadline(ed_client: Client) -> None:
    Session.objects.update(expire_date=timezone.now() + timezone.timedelta(seconds=30))
    ed_client.get(reverse("api-me"))
    remaining = Session.objects.get().expire_date - timezone.now()
    assert remaining > timezone.timedelta(minutes=14)


@pytest.mark.parametrize("password", ["short1", "password1234", "123456789012"])
def test_weak_passwords_are_refused(password: str) -> None:
    with pytest.raises(ValidationError):
        validate_password(password)


def test_a_user_without_a_role_is_told_why_on_the_home_page(client_as) -> None:
    response = client_as(None).get(reverse("home"))
    assert response.status_code == 403
    assert b"role" in response.content
