"""WebSocket consumers: authenticate, join the group, forward typed events."""

import time
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.contrib.auth import get_user_model
from django.contrib.sessions.backends.base import SessionBase

from worklist import services
from worklist.events import WORKLIST_GROUP
from worklist.roles import ED_PHYSICIAN, has_role

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
# An open socket checks again, at most this often and before it forwards an event, that its
# session is still there (not logged out, not expired) and its user still active and allowed.
RECHECK_SECONDS = 15.0


class WorklistConsumer(AsyncJsonWebsocketConsumer):
    required_role = ED_PHYSICIAN

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if not await database_sync_to_async(has_role)(user, self.required_role):
            await database_sync_to_async(self._audit_refusal)(user)
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self._checked_at = time.monotonic()
        await self.channel_layer.group_add(WORKLIST_GROUP, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(WORKLIST_GROUP, self.channel_name)

    async def worklist_event(self, message: dict[str, Any]) -> None:
        if time.monotonic() - self._checked_at >= RECHECK_SECONDS:
            code = await database_sync_to_async(self._still_allowed)()
            if code is not None:
                await self.channel_layer.group_discard(WORKLIST_GROUP, self.channel_name)
                await self.close(code=code)
                return
            self._checked_at = time.monotonic()
        await self.send_json(message["event"])

    def _audit_refusal(self, user: Any) -> None:
        client = self.scope.get("client") or (None, None)
        headers = self.scope.get("headers") or []
        forwarded = b",".join(v for k, v in headers if k == b"x-forwarded-for").decode("latin-1")
        services.access_denied_audit(
            user=user,
            address=services.address_seen(client[0], forwarded),
            details={
                "channel": "websocket",
                "method": "CONNECT",
                "path": self.scope.get("path", ""),
            },
        )

    def _still_allowed(self) -> int | None:
        """None while the session and its user may still see the worklist, else the close
        code: logged out, expired or deleted sessions, inactive users and lost roles."""
        session: SessionBase | None = self.scope.get("session")
        user = self.scope.get("user")
        if session is None or user is None or not session.session_key:
            return CLOSE_UNAUTHENTICATED
        if not session.exists(session.session_key):
            return CLOSE_UNAUTHENTICATED
        current = get_user_model().objects.filter(pk=user.pk, is_active=True).first()
        if current is None:
            return CLOSE_UNAUTHENTICATED
        return None if has_role(current, self.required_role) else CLOSE_FORBIDDEN
