"""The SSE event stream over a real HTTP server, read with standard clients: resuming,
heartbeats, live progress."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest

from service.app import create_app
from service.config import Settings
from tests.helpers import create_conversation, post_turn, until, wait_turn
from tests.receivers import serve
from tests.sse import read_events, read_whatwg

HEARTBEAT_S = 0.3


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, sse_heartbeat_s=HEARTBEAT_S)


@pytest.fixture
async def server(settings, resources, api_key) -> AsyncIterator[httpx.AsyncClient]:
    """The app under uvicorn in this event loop, and a client with acme's key."""
    async with serve(create_app(settings, resources=resources)) as url, httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    ) as http:
        yield http


def stored(messages) -> list:
    """The messages of stored events (not `turn.progress`)."""
    return [m for m in messages if m.event != "turn.progress"]


def ids(messages) -> list[int]:
    return [int(m.id) for m in stored(messages)]


def watching(resources, conversation_id: str, count: int = 1):
    """A condition: `count` streams (or long-polls) follow the conversation in this process."""
    def holds() -> bool:
        feed = resources.streams.feeds.get(conversation_id)
        return feed is not None and feed.watchers == count and feed.ready.is_set()
    return holds


async def test_a_client_resumes_with_last_event_id_without_gaps_or_repeats(
    server, api, worker, resources
):
    conversation = await create_conversation(api)
    cid = conversation["id"]
    first = await post_turn(api, cid, "First question")
    before = await read_events(server, cid, lambda m: m.id == "2")
    assert ids(before) == [1, 2]  # disconnects after event 2

    await wait_turn(api, first)
    await wait_turn(api, await post_turn(api, cid, "Second question"))  # events 4 to 6
    # The reconnect (same URL, as an EventSource does) carries Last-Event-ID: 2.
    after = await read_events(server, cid, lambda m: m.id == "6", params={"after": 0},
                              headers={"Last-Event-ID": "2"})
    assert ids(after) == [3, 4, 5, 6]
    assert [m.event for m in stored(after)] == [
        "turn.completed", "turn.queued", "turn.running", "turn.completed"]
    assert [json.loads(m.data)["sequence"] for m in stored(after)] == [3, 4, 5, 6]

    # Live: events committed while the client is connected arrive without a new request.
    live = asyncio.create_task(
        read_events(server, cid, lambda m: m.id == "9", headers={"Last-Event-ID": "6"}))
    await until(watching(resources, cid))
    await post_turn(api, cid, "Third question")
    assert ids(await live) == [7, 8, 9]


async def test_heartbeats_and_retry_reach_no_application(server, api, worker, resources):
    """Heartbeats are comment lines only and `retry:` comes once: neither httpx-sse nor a
    browser's EventSource hands the application anything for them, however long it waits."""
    conversation = await create_conversation(api)
    cid = conversation["id"]
    await wait_turn(api, await post_turn(api, cid, "Before anyone watches"))  # events 1 to 3

    # httpx-sse, connected first; then a browser-grade reader, until it has had 3 heartbeats
    # (so the first stream, older and as idle, has had at least as many).
    standard = asyncio.create_task(read_events(server, cid, lambda m: m.id == "6"))
    await until(watching(resources, cid))
    browser = await read_whatwg(server, cid, lambda s: s.comments >= 3)
    assert [(e.type, e.last_event_id) for e in browser.events] == [
        ("turn.queued", "1"), ("turn.running", "2"), ("turn.completed", "3")]
    assert all(json.loads(e.data)["sequence"] == int(e.last_event_id) for e in browser.events)
    assert browser.retry_fields == 1
    assert browser.reconnection_time_ms == 2000

    await post_turn(api, cid, "While both watch")
    messages = await standard
    assert [(m.event, m.id) for m in stored(messages)] == [
        ("turn.queued", "1"), ("turn.running", "2"), ("turn.completed", "3"),
        ("turn.queued", "4"), ("turn.running", "5"), ("turn.completed", "6")]
    assert all(json.loads(m.data)["sequence"] == int(m.id) for m in stored(messages))
    assert all(json.loads(m.data)["type"] == m.event for m in messages), "none is empty"


async def test_a_watcher_of_a_running_turn_gets_progress(server, api, worker, resources, sandbox):
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "[sandbox:slow=2] How do glaciers move?")
    messages = await read_events(server, conversation["id"],
                                 lambda m: m.event == "turn.completed")
    progress = [m for m in messages if m.event == "turn.progress"]
    assert progress, f"no progress among {[m.event for m in messages]}"
    # Progress has no id: the client's last event id stays that of the stored event before it.
    assert {m.id for m in progress} == {"2"}, "progress carries no sequence"
    events = [json.loads(m.data) for m in progress]
    assert {e["type"] for e in events} == {"turn.progress"}
    assert {e["turn_id"] for e in events} == {turn["id"]}
    assert any(e["data"]["progress_meter"] is not None for e in events)
    assert any(e["data"]["sources_considered"] for e in events)
    assert any(e["data"]["message"] for e in events)
    # Progress only while the turn runs: between turn.running and turn.completed.
    order = [m.event for m in messages]
    assert order.index("turn.running") < order.index("turn.progress")
    assert "turn.progress" not in order[order.index("turn.completed"):]
    # Nobody watches any more: the upstream connection is gone.
    await until(lambda: resources.relay.upstream_count == 0)


async def test_progress_is_fetched_only_while_watched_and_shared(
    server, api, worker, resources, sandbox
):
    conversation = await create_conversation(api)
    cid = conversation["id"]
    unwatched = await wait_turn(api, await post_turn(api, cid, "Nobody watches"))
    assert event_calls(sandbox.url, unwatched["run_id"]) == 0

    watched = await post_turn(api, cid, "[sandbox:slow=2] Two watchers")
    # Two watchers that overlap for sure: neither leaves before both have had progress.
    both_had_progress = asyncio.Barrier(3)

    async def watch() -> None:
        await read_events(server, cid, lambda m: m.event == "turn.progress",
                          headers={"Last-Event-ID": "3"})
        await both_had_progress.wait()

    async def leave_when_both_had_progress() -> None:
        await both_had_progress.wait()

    watchers = [asyncio.create_task(watch()) for _ in range(2)]
    async with asyncio.timeout(30):
        await leave_when_both_had_progress()
        await asyncio.gather(*watchers)
    running = await wait_turn(api, watched, statuses={"running", "completed"})
    assert event_calls(sandbox.url, running["run_id"]) == 1, "two watchers share one upstream"
    await until(lambda: resources.relay.upstream_count == 0)


def event_calls(sandbox_url: str, run_id: str) -> int:
    calls = httpx.get(f"{sandbox_url}/_sandbox/calls").json()["data"]
    return sum(1 for c in calls if c.get("path") == f"/v1/tasks/runs/{run_id}/events")
