"""WebSocket consumers: authenticate, join the group, forward typed events."""

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from worklist.events import WORKLIST_GROUP
from worklist.roles import ED_PHYSICIAN, has_role

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403


class WorklistConsumer(AsyncJsonWebsocketConsumer):
    required_role = ED_PHYSICIAN

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if not await database_sync_to_async(has_role)(user, self.required_role):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self.channel_layer.group_add(WORKLIST_GROUP, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(WORKLIST_GROUP, self.channel_name)

    async def worklist_event(self, message: dict[str, Any]) -> None:
        await self.send_json(message["event"])
