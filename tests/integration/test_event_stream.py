"""The SSE event stream over a real HTTP server: resuming, heartbeats, live progress."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from service.app import create_app
from service.http import events as events_module
from tests.helpers import create_conversation, post_turn, wait_turn
from tests.receivers import SseMessage, serve, sse_messages


@pytest.fixture
async def server(settings, resources, api_key) -> AsyncIterator[httpx.AsyncClient]:
    """The app under uvicorn in this event loop, and a client with acme's key."""
    async with serve(create_app(settings, resources=resources)) as url, httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    ) as http:
        yield http


async def read_stream(http: httpx.AsyncClient, conversation_id: str, until, *,
                      headers: dict[str, str] | None = None, params=None,
                      timeout: float = 20) -> list[SseMessage]:
    """Messages of one SSE connection, up to and including the first where until(msg) holds."""
    got: list[SseMessage] = []
    async with asyncio.timeout(timeout), http.stream(
        "GET", f"/v1/conversations/{conversation_id}/events", params=params,
        headers={"Accept": "text/event-stream", **(headers or {})},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for message in sse_messages(response.aiter_lines()):
            got.append(message)
            if until(message):
                return got
    raise AssertionError(f"stream ended early: {got}")


def ids(messages: list[SseMessage]) -> list[int]:
    return [int(m.id) for m in messages if m.id is not None]


async def test_a_client_resumes_with_last_event_id_without_gaps_or_repeats(server, api, worker):
    conversation = await create_conversation(api)
    cid = conversation["id"]
    first = await post_turn(api, cid, "First question")
    before = await read_stream(server, cid, lambda m: m.id == "2")
    assert ids(before) == [1, 2]  # disconnects after event 2

    await wait_turn(api, first)
    await wait_turn(api, await post_turn(api, cid, "Second question"))  # events 4 to 6
    # The reconnect (same URL, as an EventSource does) carries Last-Event-ID: 2.
    after = await read_stream(server, cid, lambda m: m.id == "6", params={"after": 0},
                              headers={"Last-Event-ID": "2"})
    assert ids(after) == [3, 4, 5, 6]
    assert [m.event for m in after if m.id] == [
        "turn.completed", "turn.queued", "turn.running", "turn.completed"]

    # Live: events committed while the client is connected arrive without a new request.
    async def post_later() -> None:
        await asyncio.sleep(0.3)
        await post_turn(api, cid, "Third question")

    poster = asyncio.create_task(post_later())
    live = await read_stream(server, cid, lambda m: m.id == "9", headers={"Last-Event-ID": "6"})
    await poster
    assert ids(live) == [7, 8, 9]


async def test_the_stream_sends_heartbeats_while_idle(server, api, monkeypatch):
    monkeypatch.setattr(events_module, "HEARTBEAT_S", 0.2)
    conversation = await create_conversation(api)
    messages = await read_stream(server, conversation["id"], lambda m: m.comment is not None)
    assert messages[-1].comment == "heartbeat"


async def test_a_watcher_of_a_running_turn_gets_progress(server, api, worker, resources, sandbox):
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "[sandbox:slow=2] How do glaciers move?")
    messages = await read_stream(server, conversation["id"],
                                 lambda m: m.event == "turn.completed")
    progress = [m for m in messages if m.event == "turn.progress"]
    assert progress, f"no progress among {[m.event for m in messages]}"
    assert all(m.id is None for m in progress), "progress has no sequence"
    events = [json.loads(m.data) for m in progress]
    assert {e["type"] for e in events} == {"turn.progress"}
    assert {e["turn_id"] for e in events} == {turn["id"]}
    assert any(e["data"]["progress_meter"] is not None for e in events)
    assert any(e["data"]["sources_considered"] for e in events)
    assert any(e["data"]["message"] for e in events)
    # Progress only while the turn runs: between turn.running and turn.completed.
    order = [m.event for m in messages if m.event]
    assert order.index("turn.running") < order.index("turn.progress")
    assert "turn.progress" not in order[order.index("turn.completed"):]
    # Nobody watches any more: the upstream connection is gone.
    await until(lambda: resources.relay.upstream_count == 0)


async def test_progress_is_fetched_only_while_watched_and_shared(
    server, api, worker, resources, sandbox
):
    conversation = await create_conversation(api)
    unwatched = await wait_turn(api, await post_turn(api, conversation["id"], "Nobody watches"))
    assert event_calls(sandbox.url, unwatched["run_id"]) == 0

    watched = await post_turn(api, conversation["id"], "[sandbox:slow=2] Two watchers")
    first_progress = lambda m: m.event == "turn.progress"  # noqa: E731
    both = [asyncio.create_task(read_stream(server, conversation["id"], first_progress,
                                            headers={"Last-Event-ID": "3"})) for _ in range(2)]
    await asyncio.gather(*both)
    running = await wait_turn(api, watched, statuses={"running", "completed"})
    assert event_calls(sandbox.url, running["run_id"]) == 1, "two watchers share one upstream"
    await until(lambda: resources.relay.upstream_count == 0)


def event_calls(sandbox_url: str, run_id: str) -> int:
    calls = httpx.get(f"{sandbox_url}/_sandbox/calls").json()["data"]
    return sum(1 for c in calls if c.get("path") == f"/v1/tasks/runs/{run_id}/events")


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)
