"""The one function that sends live events to every open worklist."""

from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

WORKLIST_GROUP = "worklist"

STUDY_RECEIVED = "study.received"
STUDY_SCORING = "study.scoring"
STUDY_SCORED = "study.scored"
STUDY_FAILED = "study.failed"
REVIEW_SAVED = "review.saved"
EVENT_TYPES = frozenset({STUDY_RECEIVED, STUDY_SCORING, STUDY_SCORED, STUDY_FAILED, REVIEW_SAVED})


def send_event(event_type: str, payload: dict[str, Any]) -> None:
    """Broadcasts a typed event once the surrounding transaction commits (never a phantom)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    message = {"type": "worklist.event", "event": {"type": event_type, **payload}}
    # robust: the data is committed whatever happens here; a broadcast lost to a Redis outage
    # must not turn a stored instance or a saved review into an error (pages refresh anyway).
    transaction.on_commit(lambda: _group_send(message), robust=True)


def _group_send(message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("CHANNEL_LAYERS is not configured")
    async_to_sync(layer.group_send)(WORKLIST_GROUP, message)
