"""The event log: JSON pages, or an SSE stream that stays open (DESIGN.md §3, Events)."""

from __future__ import annotations

import asyncio
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
from service.db import turns as turn_db
from service.db.pool import DB_UNAVAILABLE
from service.domain.cursors import parse_sequence
from service.domain.progress import ProgressRelay, Watch
from service.domain.validation import INT8_MAX
from service.errors import NotFound
from service.http import examples as ex
from service.http.deps import Limit, tenant_of
from service.http.problems import problem_responses
from service.models import TERMINAL_STATUSES
from service.resources import Resources
from service.schemas import EventPage

HEARTBEAT_S = 15.0
PAGE = 100
After = Annotated[
    int | None,
    QueryParameter(ge=0, le=INT8_MAX, description="Return events with a higher sequence than this"),
]
LastEventId = Annotated[
    str | None, HeaderParameter(name="Last-Event-ID", description="SSE resume point (a sequence)")
]


class EventController(Controller):
    path = "/v1/conversations/{conversation_id:str}/events"
    tags = ["events"]

    @get(operation_id="ListEvents",
         summary="List a conversation's events; with Accept: text/event-stream, stream them",
         responses={**problem_responses(404), **ex.answer(
             200, EventPage, "A page of events after `after` (JSON). With `Accept: "
             "text/event-stream` the answer is an SSE stream instead: one message per event "
             "(`id:` its sequence, `event:` its type, `data:` the event), `turn.progress` "
             "messages while a turn runs, and heartbeats; resume with `Last-Event-ID`",
             ex.example("page", "A turn's completion", {"data": [ex.EVENT], "next_cursor": None}))})
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
            # The Content-Type header is explicit: Litestar 2 would otherwise label the stream
            # with the handler's media type (JSON), which an EventSource refuses.
            return ServerSentEvent(  # type: ignore[return-value]
                _stream(resources, conversation_id, start),
                headers={"Content-Type": "text/event-stream; charset=utf-8"},
            )
        events = await event_db.list_events(resources.pool, conversation_id, start, limit)
        more = len(events) == limit
        return EventPage(data=events, next_cursor=str(events[-1].sequence) if more else None)


def _start_sequence(after: int | None, cursor: str | None, last_event_id: str | None) -> int:
    # Last-Event-ID first: an EventSource reconnects to the same URL (with its ?after=) and
    # adds the header, which must win or the stream would replay from `after` again.
    for value in (last_event_id, after, cursor):
        if value is not None:
            return parse_sequence(value)
    return 0


async def _stream(
    resources: Resources, conversation_id: str, after: int
) -> AsyncIterator[ServerSentEventMessage]:
    """Events after `after`, then new ones as they are committed, with heartbeats between.

    While a turn runs, its progress comes too (`turn.progress`, relayed from Parallel by
    resources.relay): no `id:`, since it is neither stored nor resumable.
    """
    assert resources.hub is not None
    relay = resources.relay
    last = after
    watch: Watch | None = None
    try:
        with resources.hub.subscribe(conversation_id) as changed:
            read = True
            while True:
                if read:
                    changed.clear()  # before reading: a commit after this wakes the next wait
                    try:
                        # The running turn first: its turn.running event is then in `events`
                        # or before them, so progress never precedes it.
                        running = (await turn_db.running_turn(resources.pool, conversation_id)
                                   if relay is not None else None)
                        events = await event_db.list_events(
                            resources.pool, conversation_id, last, PAGE
                        )
                    except DB_UNAVAILABLE:
                        return  # the client reconnects with Last-Event-ID
                    for event in events:
                        last = event.sequence
                        yield ServerSentEventMessage(
                            data=msgspec.json.encode(event).decode(), event=event.type,
                            id=str(event.sequence),
                        )
                    if len(events) == PAGE:
                        continue
                    if running is not None and any(
                        e.turn_id == running[0] and e.data.status in TERMINAL_STATUSES
                        for e in events
                    ):
                        running = None  # it ended since: no progress after its last event
                    watch = _follow_running(relay, watch, conversation_id, running)
                if watch is not None:
                    for progress in watch.drain():
                        yield ServerSentEventMessage(
                            data=msgspec.json.encode(progress).decode(), event=progress.type
                        )
                sources = [changed] if watch is None else [changed, watch.ready]
                if not await _wait_any(sources, HEARTBEAT_S):
                    yield ServerSentEventMessage(comment="heartbeat")
                read = changed.is_set()
    finally:
        if watch is not None and relay is not None:
            relay.unwatch(watch)


def _follow_running(
    relay: ProgressRelay | None, watch: Watch | None, conversation_id: str,
    running: tuple[str, str] | None,
) -> Watch | None:
    """Watch the progress of the conversation's running turn, if any (and only of that one)."""
    if relay is None:
        return None
    if watch is not None and running is not None and watch.run_id == running[1]:
        return watch
    if watch is not None:
        relay.unwatch(watch)
    return relay.watch(conversation_id, *running) if running is not None else None


async def _wait_any(events: list[asyncio.Event], timeout: float) -> bool:
    """Wait until one of the events is set; False when `timeout` passed first."""
    if any(e.is_set() for e in events):
        return True
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)
