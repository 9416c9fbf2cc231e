"""The event log: JSON pages, or an SSE stream that stays open (docs/design.md §3, Events).

The stream itself is service.domain.streams'; this module only writes its frames in SSE syntax.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.response import Stream

from service.domain import streams
from service.domain.cursors import parse_sequence
from service.domain.validation import INT8_MAX
from service.errors import Unavailable
from service.http import examples as ex
from service.http.deps import Limit, tenant_of
from service.http.problems import problem_responses
from service.resources import Resources
from service.schemas import EventPage

After = Annotated[
    int | None,
    QueryParameter(ge=0, le=INT8_MAX, description="Return events with a higher sequence than this"),
]
LastEventId = Annotated[
    str | None, HeaderParameter(name="Last-Event-ID", description="SSE resume point (a sequence)")
]
# Litestar's ServerSentEvent is not used: its heartbeat comment carries an empty `data:` line,
# which standard clients dispatch as an empty message.
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies such as nginx must not hold the stream back
}


class EventController(Controller):
    path = "/v1/conversations/{conversation_id:str}/events"
    tags = ("events",)

    @get(operation_id="ListEvents",
         summary="List a conversation's events; with Accept: text/event-stream, stream them",
         responses={**problem_responses(404), **ex.answer(
             200, EventPage, "A page of events after `after` (JSON). With `Accept: "
             "text/event-stream` the answer is an SSE stream instead: `retry:` once, one "
             "message per event (`id:` its sequence, `event:` its type, `data:` the event), "
             "`turn.progress` messages (no `id:`) while a turn runs, and heartbeat comment "
             "lines. It ends when the key is revoked, the conversation deleted, or after "
             "MAX_STREAM_S; resume with `Last-Event-ID`. Open streams plus `?wait=` long-polls "
             "are limited per tenant (429 `/problems/too-many-streams`)",
             ex.example("page", "A turn's completion", {"data": [ex.EVENT], "next_cursor": None}))})
    async def list(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        conversation_id: FromPath[str],
        after: After = None, cursor: Annotated[str | None, QueryParameter(max_length=64)] = None,
        limit: Limit = 100, last_event_id: LastEventId = None,
    ) -> EventPage:
        """The conversation's events (every status change of a turn, numbered by `sequence`) after a
        start point: a JSON page, or with `Accept: text/event-stream` a Server-Sent Events stream
        that stays open for new ones."""
        tenant_id = tenant_of(request)
        start = _start_sequence(after, cursor, last_event_id)
        if "text/event-stream" in request.headers.get("accept", ""):
            if resources.streams is None:
                raise Unavailable("This process does not serve event streams.")
            key = request.headers.get("authorization", "").partition(" ")[2].strip()
            frames = await resources.streams.open(tenant_id, key, conversation_id, start)
            # The Content-Type header is explicit: Litestar 2 would otherwise label the stream
            # with the handler's media type (JSON), which an EventSource refuses.
            # The annotation (EventPage) is the JSON answer's, which OpenAPI derives from; the
            # stream's answer is documented beside it (service.http.openapi_extras).
            return Stream(_sse(frames), headers=SSE_HEADERS)  # type: ignore[return-value]
        return await streams.list_events(resources.pool, tenant_id, conversation_id, start, limit)


def _start_sequence(after: int | None, cursor: str | None, last_event_id: str | None) -> int:
    # Last-Event-ID first: an EventSource reconnects to the same URL (with its ?after=) and
    # adds the header, which must win or the stream would replay from `after` again.
    for value in (last_event_id, after, cursor):
        if value is not None:
            return parse_sequence(value)
    return 0


async def _sse(frames: AsyncIterator[streams.Frame]) -> AsyncIterator[bytes]:
    async for frame in frames:
        yield encode_frame(frame)


def encode_frame(frame: streams.Frame) -> bytes:
    """One frame in SSE syntax. Only a message ends with the blank line that dispatches it: a
    comment or `retry:` line stands alone, since a blank line after it would make some clients
    (httpx-sse, once it has seen an `id:`) dispatch an empty message."""
    lines: list[str] = []
    if frame.comment is not None:
        lines.append(f": {frame.comment}")
    if frame.retry_ms is not None:
        lines.append(f"retry: {frame.retry_ms}")
    if frame.id is not None:
        lines.append(f"id: {frame.id}")
    if frame.event is not None:
        lines.append(f"event: {frame.event}")
    if frame.data is not None:
        lines.extend(f"data: {line}" for line in frame.data.split("\n"))
        lines.append("")
    return ("\n".join(lines) + "\n").encode()
