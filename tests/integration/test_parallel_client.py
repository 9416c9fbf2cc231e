"""The Parallel client decodes the SDK's raw responses with msgspec: what it reads is what the
SDK's own models say, and a body it cannot read is an outage to retry (a create's: in doubt),
never a turn recorded with half an answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import msgspec
import pytest
from parallel import AsyncParallel

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from service.clients.parallel import (
    ParallelClient,
    RunInfo,
    RunResult,
    default_http_client,
    run_input,
)
from service.errors import UpstreamUnavailable
from tests.helpers import wait_until
from tests.receivers import serve

SANDBOX_KEY = "test-key"


async def test_what_it_reads_is_what_the_sdks_models_say(sandbox):
    client = ParallelClient(api_key=SANDBOX_KEY, base_url=sandbox.url)
    sdk = AsyncParallel(api_key=SANDBOX_KEY, base_url=sandbox.url, max_retries=0)
    try:
        first = await client.create_run(input="Who won?", processor="lite",
                                        output_schema={"type": "text"},
                                        previous_interaction_id=None, metadata={"turn_id": "t1"})
        run = await client.create_run(input={"q": "And then?"}, processor="lite",
                                      output_schema={"type": "auto"},
                                      previous_interaction_id=first.interaction_id,
                                      metadata={"turn_id": "t2"})
        result = await client.result(run.run_id, wait_s=30)
        retrieved = await client.retrieve(run.run_id)
        assert retrieved.status == "completed" and retrieved.interaction_id == run.interaction_id
        assert retrieved == msgspec.convert(
            (await sdk.task_run.retrieve(run.run_id)).model_dump(mode="json"), RunInfo)
        assert result == msgspec.convert(
            (await sdk.task_run.result(run.run_id)).model_dump(mode="json"), RunResult)
        assert result.output.content and result.run.run_id == run.run_id
    finally:
        await asyncio.gather(client.close(), sdk.close())


BODIES = [b"<html>502 Bad Gateway</html>", b'{"run_id": "trun_1"}', b"\xff\xfe", b"[]"]


@pytest.mark.parametrize("body", BODIES)
async def test_a_body_it_cannot_read_is_an_outage_and_a_creates_is_in_doubt(body):
    """Parallel (or a proxy in front of it) answers 200 with a body that is not a run."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    client = ParallelClient(api_key=SANDBOX_KEY, base_url="http://parallel.invalid",
                            http_client=httpx.AsyncClient(transport=httpx.MockTransport(answer)))
    try:
        with pytest.raises(UpstreamUnavailable) as created:
            await client.create_run(input="Q", processor="lite", output_schema={"type": "text"},
                                    previous_interaction_id=None, metadata={})
        assert created.value.in_doubt  # it answered 2xx: a run may exist
        for call in (client.retrieve("trun_1"), client.result("trun_1")):
            with pytest.raises(UpstreamUnavailable, match="unexpectedly"):
                await call
    finally:
        await client.close()


async def test_open_streams_leave_the_calls_their_connections():
    """A worker holds a stream per followed group (an API process one per relayed run): with as
    many streams open as the calls' pool has connections, calls still answer at once. They
    shared one pool once, and at 100 followed groups every add, listing and result waited for a
    connection until it timed out."""
    config = SandboxConfig(default_latency_s=120, queued_s=0.05, task_groups=True)
    with SandboxServer(config) as server:
        client = ParallelClient(api_key=SANDBOX_KEY, base_url=server.url, max_connections=2)
        streams: list[asyncio.Task[None]] = []
        try:
            runs: list[str] = []
            for n in range(2):
                group = await client.create_group({"test": "streams"})
                body = run_input(input=f"Q{n}", processor="lite", output_schema={"type": "text"},
                                 previous_interaction_id=None, metadata={}, webhook_url=None)
                runs += (await client.add_runs(group, [body]))[0]
                streams.append(asyncio.create_task(
                    _drain(client.group_events(group, None, timeout_s=60))))
            streams.append(asyncio.create_task(_drain(client.progress(runs[0]))))

            async def streaming() -> bool:
                async with httpx.AsyncClient() as sandbox:
                    calls = (await sandbox.get(f"{server.url}/_sandbox/calls")).json()["data"]
                return sum(c["path"].endswith("/events") and c["status"] == 200
                           for c in calls) == len(streams)

            await wait_until(streaming, timeout_s=10, what="every stream to be open")
            async with asyncio.timeout(5):
                assert (await client.retrieve(runs[1])).is_active
                assert await client.group_active(group)
            assert not any(task.done() for task in streams), "the streams stay open"
        finally:
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            await client.close()


async def _drain(events: AsyncGenerator[Any, None]) -> None:
    async for _ in events:
        pass


async def test_the_clients_keep_no_cookie_an_answer_sets():
    """Parallel sets no cookies; a cookie a proxy or another server in between sets is not sent
    back on later calls (the clients skip httpx's cookie jar: service.clients.parallel)."""
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append(dict(scope["headers"]).get(b"cookie", b"").decode())
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"set-cookie", b"session=abc; Path=/")]})
        await send({"type": "http.response.body", "body": b"{}"})

    async with serve(app) as url:
        client = default_http_client(2)
        try:
            for _ in range(2):
                assert (await client.get(f"{url}/v1/tasks/runs/trun_x")).status_code == 200
            assert not client.cookies
        finally:
            await client.aclose()
    assert seen == ["", ""]
