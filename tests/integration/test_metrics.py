"""/metrics after a workload shows what that workload did; so does the worker's metrics port.

Counters live in the test process's registry, which earlier tests also fed, so these tests
compare scrapes taken before and after; gauges of shared state come from this test's database.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import pytest

from service.devstack import free_port
from tests.helpers import (
    TASK_GROUPS,
    Samples,
    create_conversation,
    parse,
    post_turn,
    running_worker,
    value,
    wait_turn,
    wait_until,
)
from tests.processes import settings_env
from tests.receivers import Receiver, serve
from worker import jobs


@pytest.fixture
def settings(settings):
    """Gauges of shared state a tenth of a second old at most, so tests see their changes soon
    (test_metrics_cache.py checks the caching itself)."""
    return msgspec.structs.replace(settings, metrics_state_max_age_s=0.1)


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def scrape_until(client: httpx.AsyncClient, name: str, expected: float, **labels: str):
    """Scrape until the gauge shows `expected` (it is measured at most every 0.1 s here)."""
    deadline = time.monotonic() + 10
    while True:
        samples = await scrape(client)
        if value(samples, name, **labels) == expected:
            return samples
        assert time.monotonic() < deadline, f"{name} stays {value(samples, name, **labels)}"
        await asyncio.sleep(0.05)


async def test_metrics_count_a_workload(api, client, settings):
    receiver = Receiver()
    receiver.statuses = [500]  # the first webhook attempt fails, the retry is delivered
    settings = msgspec.structs.replace(settings, webhook_retry_schedule_s=[0.2, 0.2])
    async with serve(receiver) as url:
        await _workload_and_scrape(api, client, settings, f"{url}/hook", receiver)


async def _workload_and_scrape(api, client, settings, hook_url, receiver):
    before = await scrape(client)
    # One turn cancelled while still queued (no worker yet), then two that complete.
    other = await create_conversation(api)
    doomed = await post_turn(api, other["id"], "Never mind")
    cancel = await api.post(f"/v1/conversations/{other['id']}/turns/{doomed['id']}/cancel")
    assert cancel.status_code == 200
    conversation = await create_conversation(api, title="Metrics")
    posted = [await post_turn(api, conversation["id"], q) for q in ("First?", "Second?")]
    hooked = await create_conversation(api, webhook_url=hook_url)
    posted.append(await post_turn(api, hooked["id"], "Tell me by webhook"))
    assert (await api.get("/v1/conversations/conv_missing")).status_code == 404
    async with running_worker(settings):
        done = [await wait_turn(api, turn) for turn in posted]
        await receiver.wait_for(2)
        # The attempt is counted once the worker has recorded it.
        delivered = value(before, "research_webhook_deliveries_total", outcome="delivered")
        await scrape_until(client, "research_webhook_deliveries_total", delivered + 1,
                           outcome="delivered")
    assert [t["status"] for t in done] == ["completed"] * 3
    read = f"/v1/conversations/{conversation['id']}"
    assert (await api.get(f"{read}/sources")).status_code == 200
    markdown = await api.get(f"{read}/transcript", headers={"Accept": "text/markdown"})
    assert markdown.status_code == 200

    # The runs alone took 0.3 s, past the gauges' 0.1 s cache: open turns are measured afresh.
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    http = "research_http_requests_total"
    assert delta(http, method="POST", route="/v1/conversations", status="201") == 3
    assert delta(http, method="POST", route="/v1/conversations/{conversation_id}/turns",
                 status="202") == 4
    assert delta(http, method="GET", route="/v1/conversations/{conversation_id}",
                 status="404") == 1
    assert delta(http, method="POST", route="/v1/conversations/{conversation_id}/turns/"
                 "{turn_id}/cancel", status="200") == 1
    for route in ("sources", "transcript"):  # a route template, whatever the media type
        assert delta(http, method="GET", route=f"/v1/conversations/{{conversation_id}}/{route}",
                     status="200") == 1
    assert not any(
        name == http and "conv_missing" in dict(labels).get("route", "") for name, labels in after
    ), "routes are labelled by template, not by path"
    assert delta("research_http_request_duration_seconds_count", method="POST",
                 route="/v1/conversations") == 3

    moved = "research_turn_transitions_total"
    assert delta(moved, status="queued", processor="lite") == 4
    assert delta(moved, status="running", processor="lite") == 3
    assert delta(moved, status="completed", processor="lite") == 3
    assert delta(moved, status="cancelled", processor="lite") == 1
    assert delta(moved, status="failed", processor="lite") == 0
    assert delta("research_turn_duration_seconds_count", status="completed", processor="lite") == 3
    seconds = delta("research_turn_duration_seconds_sum", status="completed", processor="lite")
    assert 0 < seconds < 60

    # Open turns are counted in this test's database: exact, not deltas. None is left open.
    open_turns = {labels: n for (name, labels), n in after.items() if name == "research_open_turns"}
    assert open_turns == {
        frozenset({("status", "queued"), ("processor", "lite")}): 0,
        frozenset({("status", "running"), ("processor", "lite")}): 0,
    }
    assert value(after, "research_state_up") == 1

    parallel = "research_parallel_requests_total"
    assert delta(parallel, endpoint="run_result", status="ok") == 3
    if TASK_GROUPS:  # the runs were added to a task group, followed over its event stream
        assert delta(parallel, endpoint="create_run", status="ok") == 0
        assert 1 <= delta(parallel, endpoint="add_runs", status="ok") <= 3
        assert delta(parallel, endpoint="group_events", status="ok") >= 1
    else:
        assert delta(parallel, endpoint="create_run", status="ok") == 3
        assert delta(parallel, endpoint="retrieve_run", status="ok") >= 3
    assert delta("research_webhook_deliveries_total", outcome="failed") == 1
    assert delta("research_webhook_deliveries_total", outcome="delivered") == 1


async def test_queue_depth_counts_queued_jobs_and_due_checks(api, client, resources):
    turns = []
    for i in range(3):
        conversation = await create_conversation(api)
        turns.append(await post_turn(api, conversation["id"], f"Question {i}"))
    samples = await scrape_until(client, "research_queue_jobs", 3)  # no worker: all jobs wait
    assert value(samples, "research_due_checks") == 0
    assert value(samples, "research_queue_depth") == 3

    await resources.pool.execute(
        "UPDATE turn SET status = 'running', run_id = 'trun_x', next_check_at = now() - "
        "interval '1 second', started_at = now() WHERE id = $1", turns[0]["id"],
    )
    samples = await scrape_until(client, "research_due_checks", 1)
    assert value(samples, "research_queue_depth") == 4
    assert value(samples, "research_open_turns", status="running", processor="lite") == 1
    assert value(samples, "research_open_turns", status="queued", processor="lite") == 2


async def test_reconciler_repairs_count_only_lost_jobs(api, client, resources, settings):
    conversation = await create_conversation(api)
    lost = await post_turn(api, conversation["id"], "Lost in Redis?")
    kept_conversation = await create_conversation(api)
    kept = await post_turn(api, kept_conversation["id"], "Still queued")
    await resources.pool.execute("UPDATE turn SET created_at = now() - interval '1 minute'")
    # Redis loses one start job (as after a failover); the other is still queued.
    await resources.queue.zrem(settings.queue_name, f"start_turn:{lost['id']}")
    await resources.queue.delete(f"arq:job:start_turn:{lost['id']}")
    before = await scrape(client)

    assert await jobs.reconcile({"resources": resources}) == 2  # both looked at
    assert await jobs.reconcile({"resources": resources}) == 2  # the job is back: no repair

    after = await scrape(client)
    name = "research_reconciler_repairs_total"
    kind = {"kind": "requeued_start"}
    assert value(after, name, **kind) - value(before, name, **kind) == 1
    queued = await resources.queue.zrange(settings.queue_name, 0, -1)
    assert {f"start_turn:{lost['id']}".encode(), f"start_turn:{kept['id']}".encode()} <= set(queued)


async def test_worker_serves_metrics_on_its_port(settings):
    port = free_port()
    async with (
        running_worker(msgspec.structs.replace(settings, worker_metrics_port=port)),
        httpx.AsyncClient() as http,
    ):

        async def scraped() -> httpx.Response | None:
            with contextlib.suppress(httpx.HTTPError):
                return await http.get(f"http://127.0.0.1:{port}/metrics")
            return None

        response = await wait_until(scraped, 10, what="the worker's metrics port")
    assert response.status_code == 200
    assert "research_turn_transitions_total" in response.text
    assert "research_parallel_requests_total" in response.text
    assert "research_reconciler_repairs_total" in response.text


@pytest.mark.slow
def test_api_processes_share_their_totals(settings, tmp_path: Path):
    """`api --workers 2`: whichever process answers the scrape, totals cover both."""
    port = free_port()
    env = settings_env(settings, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    api = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "api", "--port", str(port), "--workers", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
        requests = 40
        for _ in range(requests):
            # A new connection each time, so both processes get some.
            assert httpx.get(f"{url}/healthz", headers={"connection": "close"}).status_code == 200
        pids = {path.name.split("_")[-1] for path in tmp_path.glob("counter_*.db")}
        assert len(pids) == 2, "both processes counted requests"
        for _ in range(6):
            samples = parse(httpx.get(f"{url}/metrics", headers={"connection": "close"}).text)
            total = value(samples, "research_http_requests_total", method="GET", route="/healthz",
                          status="200")
            assert total == requests
    finally:
        api.terminate()
        api.wait(timeout=30)
