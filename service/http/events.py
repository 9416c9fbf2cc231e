"""The event log: JSON pages, or an SSE stream that stays open (DESIGN.md §3, Events)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from service.db import conversations as conversation_db
from service.db import events as event_db
from service.db.pool import DB_UNAVAILABLE
from service.errors import BadRequest, NotFound
from service.http.deps import Limit, tenant_of
from service.resources import Resources
from service.schemas import EventPage

HEARTBEAT_S = 15.0
After = Annotated[
    int | None, QueryParameter(ge=0, description="Return events with a higher sequence than this")
]
LastEventId = Annotated[
    str | None, HeaderParameter(header="Last-Event-ID", description="SSE resume point (a sequence)")
]


class EventController(Controller):
    path = "/v1/conversations/{conversation_id:str}/events"
    tags = ["events"]

    @get(operation_id="ListEvents",
         summary="List a conversation's events; with Accept: text/event-stream, stream them")
    async def list(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources], conversation_id: FromPath[str],
        after: After = None, cursor: Annotated[str | None, QueryParameter(max_length=64)] = None,
        limit: Limit = 100, last_event_id: LastEventId = None,
    ) -> EventPage:
        tenant_id = tenant_of(request)
        if await conversation_db.get_conversation(resources.pool, tenant_id, conversation_id) is None:
            raise NotFound(f"Conversation {conversation_id!r} not found.")
        start = _start_sequence(after, cursor, last_event_id)
        if "text/event-stream" in request.headers.get("accept", ""):
            return ServerSentEvent(_stream(resources, conversation_id, start))  # type: ignore[return-value]
        events = await event_db.list_events(resources.pool, conversation_id, start, limit)
        more = len(events) == limit
        return EventPage(data=events, next_cursor=str(events[-1].sequence) if more else None)


def _start_sequence(after: int | None, cursor: str | None, last_event_id: str | None) -> int:
    for value in (after, cursor, last_event_id):
        if value is None:
            continue
        try:
            number = int(value)
        except ValueError:
            raise BadRequest("The cursor is not valid: pass back a `next_cursor` unchanged.") from None
        if number < 0:
            raise BadRequest("Sequences start at 1.")
        return number
    return 0


async def _stream(
    resources: NamedDependency[Resources], conversation_id: FromPath[str], after: int
) -> AsyncIterator[ServerSentEventMessage]:
    """Events after `after`, then new ones as they are committed, with heartbeats between."""
    assert resources.hub is not None
    last = after
    while True:
        with resources.hub.subscribe(conversation_id) as changed:
            try:
                events = await event_db.list_events(resources.pool, conversation_id, last, 100)
            except DB_UNAVAILABLE:
                return  # the client reconnects with Last-Event-ID
            for event in events:
                last = event.sequence
                yield ServerSentEventMessage(
                    data=msgspec.json.encode(event).decode(), event=event.type, id=str(event.sequence)
                )
            if events:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=HEARTBEAT_S)
                continue
            yield ServerSentEventMessage(comment="heartbeat")


