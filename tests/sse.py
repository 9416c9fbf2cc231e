"""Reading the service's SSE streams as clients do: httpx-sse, and a browser's rules.

`read_events` uses httpx-sse, a standard client. `WhatwgEventStream` interprets a stream by the
WHATWG HTML standard's "event stream interpretation" and "dispatch the event" steps, to the
letter (https://html.spec.whatwg.org/multipage/server-sent-events.html), which is what a
browser's EventSource hands an application.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse


async def read_events(
    http: httpx.AsyncClient, conversation_id: str, until: Callable[[ServerSentEvent], bool] | None,
    *, headers: dict[str, str] | None = None, params: dict[str, Any] | None = None,
    timeout_s: float = 30,
) -> list[ServerSentEvent]:
    """The messages httpx-sse dispatches on one connection, up to the first where until() holds
    (until=None: to the end of the stream, which must end within `timeout`)."""
    got: list[ServerSentEvent] = []
    async with asyncio.timeout(timeout_s), aconnect_sse(
        http, "GET", f"/v1/conversations/{conversation_id}/events", params=params,
        headers=dict(headers or {}),
    ) as source:
        assert source.response.status_code == 200, await source.response.aread()
        async for message in source.aiter_sse():
            got.append(message)
            if until is not None and until(message):
                return got
    if until is not None:
        raise AssertionError(f"stream ended early: {[(m.id, m.event) for m in got]}")
    return got


@dataclass
class MessageEvent:
    """What an EventSource hands its listeners: the MessageEvent's type, data and lastEventId."""

    type: str
    data: str
    last_event_id: str


@dataclass
class WhatwgEventStream:
    """An event stream interpreter with the standard's buffers and steps, fed decoded text."""

    events: list[MessageEvent] = field(default_factory=list)
    reconnection_time_ms: int | None = None
    retry_fields: int = 0
    comments: int = 0
    # The standard's buffers.
    _data: str = ""
    _event_type: str = ""
    _last_event_id: str = ""  # the "last event ID buffer"
    last_event_id: str = ""  # the EventSource's "last event ID string"
    _pending: str = ""
    _first: bool = True
    _after_cr: bool = False

    def feed(self, text: str) -> None:
        if self._first and text:
            self._first = False
            text = text.removeprefix("\ufeff")  # one leading U+FEFF BOM is skipped
        for char in text:
            # Lines end with CRLF, a lone LF or a lone CR.
            if self._after_cr:
                self._after_cr = False
                if char == "\n":
                    continue
            if char in "\r\n":
                self._after_cr = char == "\r"
                line, self._pending = self._pending, ""
                self._line(line)
            else:
                self._pending += char

    def _line(self, line: str) -> None:
        if line == "":
            self._dispatch()
        elif line.startswith(":"):
            self.comments += 1  # a comment: ignored
        elif ":" in line:
            name, _, value = line.partition(":")
            self._field(name, value.removeprefix(" "))
        else:
            self._field(line, "")

    def _field(self, name: str, value: str) -> None:
        if name == "event":
            self._event_type = value
        elif name == "data":
            self._data += value + "\n"
        elif name == "id":
            if "\0" not in value:
                self._last_event_id = value
        elif name == "retry":
            self.retry_fields += 1
            if value and all("0" <= c <= "9" for c in value):
                self.reconnection_time_ms = int(value)
        # Any other field is ignored.

    def _dispatch(self) -> None:
        # 1. Set the last event ID string to the last event ID buffer's value.
        self.last_event_id = self._last_event_id
        # 2. An empty data buffer: reset the data and event type buffers, dispatch nothing.
        if self._data == "":
            self._event_type = ""
            return
        # 3. Drop one trailing LF from the data buffer.
        data = self._data.removesuffix("\n")
        # 4-7. The event: its type ("message" unless set), data and lastEventId.
        self.events.append(MessageEvent(self._event_type or "message", data, self.last_event_id))
        self._data = ""
        self._event_type = ""


async def read_whatwg(
    http: httpx.AsyncClient, conversation_id: str,
    until: Callable[[WhatwgEventStream], bool], *, headers: dict[str, str] | None = None,
    timeout_s: float = 30,
) -> WhatwgEventStream:
    """Interpret one connection's bytes by the standard until until(stream) holds."""
    stream = WhatwgEventStream()
    async with asyncio.timeout(timeout_s), http.stream(
        "GET", f"/v1/conversations/{conversation_id}/events",
        headers={"Accept": "text/event-stream", **(headers or {})},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for text in _texts(response):
            stream.feed(text)
            if until(stream):
                return stream
    raise AssertionError(f"stream ended early: {stream.events}")


async def _texts(response: httpx.Response) -> AsyncIterator[str]:
    # The standard decodes the stream as UTF-8.
    async for text in response.aiter_text():
        yield text
