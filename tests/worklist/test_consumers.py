from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from ichweb.asgi import application
from tests.factories import FindingFactory, UserFactory
from worklist import services
from worklist.consumers import CLOSE_FORBIDDEN, CLOSE_UNAUTHENTICATED
from worklist.models import AuditAction, AuditEvent

pytestmark = pytest.mark.django_db(transaction=True)


def _headers(client: Client | None) -> list[tuple[bytes, bytes]]:
    headers = [(b"origin", b"http://localhost"), (b"host", b"localhost")]
    if client is not None:
        cookie = f"sessionid={client.cookies['sessionid'].value}"
        headers.append((b"cookie", cookie.encode()))
    return headers


def _connect(client: Client | None) -> tuple[bool, Any]:
    async def scenario() -> tuple[bool, Any]:
        communicator = WebsocketCommunicator(application, "/ws/worklist/", headers=_headers(client))
        connected, code = await communicator.connect()
        await communicator.disconnect()
        return connected, code

    return async_to_sync(scenario)()


def test_an_anonymous_websocket_is_closed_with_4401() -> None:
    assert _connect(None) == (False, CLOSE_UNAUTHENTICATED)


def test_a_user_without_a_role_is_closed_with_4403_and_audited(client_as) -> None:
    assert _connect(client_as(None)) == (False, CLOSE_FORBIDDEN)
    (event,) = AuditEvent.objects.all()
    assert event.action == AuditAction.ACCESS_DENIED and event.user is not None
    assert event.details == {"channel": "websocket", "method": "CONNECT", "path": "/ws/worklist/"}


def test_an_anonymous_or_allowed_websocket_writes_no_refusal(ed_client: Client) -> None:
    assert _connect(None) == (False, CLOSE_UNAUTHENTICATED)
    assert _connect(ed_client)[0] is True
    assert not AuditEvent.objects.filter(action=AuditAction.ACCESS_DENIED).exists()


def test_a_websocket_from_another_origin_is_refused(ed_client: Client) -> None:
    async def scenario() -> bool:
        headers = [h for h in _headers(ed_client) if h[0] != b"origin"]
        headers.append((b"origin", b"http://evil.example"))
        communicator = WebsocketCommunicator(application, "/ws/worklist/", headers=headers)
        connected, _ = await communicator.connect()
        return connected

    assert async_to_sync(scenario)() is False


def test_a_saved_review_reaches_an_open_worklist_through_redis(ed_client: Client) -> None:
    finding = FindingFactory()
    reviewer = UserFactory(role="radiologist")

    async def scenario() -> dict:
        communicator = WebsocketCommunicator(
            application, "/ws/worklist/", headers=_headers(ed_client)
        )
        connected, _ = await communicator.connect()
        assert connected
        review = await database_sync_to_async(services.finding_review)(
            finding=finding, reviewer=reviewer, decision="rejected", comment="", address=None
        )
        event = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return {"event": event, "review_id": review.pk}

    outcome = async_to_sync(scenario)()
    assert outcome["event"] == {
        "type": "review.saved",
        "study_id": finding.result.study_id,
        "review_id": outcome["review_id"],
        "finding_id": finding.pk,
        "class": "subdural",
        "decision": "rejected",
    }


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("logout", CLOSE_UNAUTHENTICATED),
        ("deactivate", CLOSE_UNAUTHENTICATED),
        ("lose the role", CLOSE_FORBIDDEN),
    ],
)
def test_an_open_worklist_closes_once_its_session_or_user_may_no_longer_see_it(
    client_as: Any, monkeypatch: pytest.MonkeyPatch, change: str, code: int
) -> None:
    """Checked at connect and again before events are forwarded (here before each one)."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group

    monkeypatch.setattr("worklist.consumers.RECHECK_SECONDS", 0.0)
    client = client_as("ed_physician")
    user = get_user_model().objects.get(pk=client.session["_auth_user_id"])
    finding = FindingFactory()
    reviewer = UserFactory(role="radiologist")

    def review() -> None:
        services.finding_review(
            finding=finding, reviewer=reviewer, decision="rejected", comment="", address=None
        )

    def make_the_change() -> None:
        if change == "logout":
            client.logout()  # deletes the session the socket was opened with
        elif change == "deactivate":
            type(user).objects.filter(pk=user.pk).update(is_active=False)
        else:
            user.groups.remove(*Group.objects.all())

    async def scenario() -> tuple[dict, Any]:
        communicator = WebsocketCommunicator(application, "/ws/worklist/", headers=_headers(client))
        connected, _ = await communicator.connect()
        assert connected
        await database_sync_to_async(review)()
        before = await communicator.receive_json_from(timeout=5)  # still allowed: forwarded
        await database_sync_to_async(make_the_change)()
        await database_sync_to_async(review)()
        closed = await communicator.receive_output(timeout=5)
        await communicator.disconnect()
        return before, closed

    before, closed = async_to_sync(scenario)()
    assert before["type"] == "review.saved"
    assert closed == {"type": "websocket.close", "code": code}  # and no event after the change
