"""Small helpers the tests share: waiting for turns, reading the sandbox's records."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.config import Settings
from service.db.keys import create_key, split_key
from service.resources import Resources

TERMINAL = {"completed", "failed", "cancelled"}

# TEST_TASK_GROUPS=off runs the suite against a sandbox whose task-group routes answer 404, so
# the service (PARALLEL_TASK_GROUPS=auto) falls back to one-by-one runs; "on" (the default) runs
# it in group mode. The end-to-end tests pass both ways.
TASK_GROUPS = os.environ.get("TEST_TASK_GROUPS", "on").lower() != "off"


def with_database(dsn: str, name: str) -> str:
    """The same server's URL for database `name`."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def new_key(resources: Resources, tenant: str) -> str:
    """A new API key of `tenant`, in full."""
    async with resources.pool.acquire() as conn:
        return (await create_key(conn, tenant))[1]


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response is a problem+json body of `status` (and no traceback); returns the body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    assert "Traceback" not in response.text
    return body


async def counts(database_url: str) -> tuple[int, int, int]:
    """How many conversations, turns and events the database holds."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM conversation), (SELECT count(*) FROM turn),"
            " (SELECT count(*) FROM event)")
        assert row is not None
        return row[0], row[1], row[2]
    finally:
        await conn.close()


def settings_of(resources: Resources, **changes: Any) -> None:
    """Change the running app's settings for this test (the handlers read resources.settings)."""
    resources.settings = msgspec.structs.replace(resources.settings, **changes)


async def create_conversation(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await api.post("/v1/conversations", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def post_turn(api: httpx.AsyncClient, conversation_id: str, question: str | dict[str, Any],
                    **body: Any) -> dict[str, Any]:
    response = await api.post(f"/v1/conversations/{conversation_id}/turns",
                              json={"input": question, **body})
    assert response.status_code == 202, response.text
    return response.json()


async def wait_turn(api: httpx.AsyncClient, turn: dict[str, Any], timeout_s: float = 30.0,
                    statuses: set[str] = TERMINAL) -> dict[str, Any]:
    """Long-poll the turn until its status is one of `statuses`."""
    deadline = time.monotonic() + timeout_s
    path = f"/v1/conversations/{turn['conversation_id']}/turns/{turn['id']}"
    # ?wait= only answers early for terminal turns; for others, poll.
    params = {"wait": 2} if statuses <= TERMINAL else {}
    while True:
        response = await api.get(path, params=params)
        assert response.status_code == 200, response.text
        current = response.json()
        if current["status"] in statuses:
            return current
        assert current["status"] not in TERMINAL, f"turn ended {current['status']}: {current}"
        assert time.monotonic() < deadline, f"turn still {current['status']}: {current}"
        await asyncio.sleep(0 if params else 0.05)


def sandbox_runs(sandbox_url: str, turn_id: str | None = None) -> list[dict[str, Any]]:
    """Runs the sandbox recorded, optionally only those created for one turn."""
    runs = httpx.get(f"{sandbox_url}/_sandbox/runs").json()["data"]
    if turn_id is None:
        return runs
    return [r for r in runs if (r.get("metadata") or {}).get("rs_turn") == turn_id]


async def sandbox_record(sandbox_url: str, name: str) -> Any:
    """One of the sandbox's records (`calls`, `runs`, `webhooks`...), without blocking the loop."""
    async with httpx.AsyncClient(base_url=sandbox_url) as http:
        response = await http.get(f"/_sandbox/{name}")
        response.raise_for_status()
        return response.json()


def set_faults(sandbox_url: str, **faults: Any) -> None:
    httpx.post(f"{sandbox_url}/_sandbox/faults", json=faults).raise_for_status()


async def forgotten(resources: Resources, key: str) -> float:
    """Seconds until the process has Postgres's notification of a change to the key."""
    start = asyncio.get_running_loop().time()
    while split_key(key) in resources.keys:
        assert asyncio.get_running_loop().time() - start < 2, "no notification of the change"
        await asyncio.sleep(0.001)
    return asyncio.get_running_loop().time() - start


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, **overrides: Any) -> AsyncIterator[Any]:
    """An arq worker with its follower and dispatcher, in this event loop, until the block ends.

    Jobs in hand are let finish first (5 s at most): arq's close() cancels the ones still running
    and re-raises their CancelledError, which would skip the worker's shutdown (its follower and
    dispatcher would outlive the test).
    """
    from worker.main import build_worker

    w = build_worker(settings, handle_signals=False, **overrides)
    task = asyncio.create_task(w.async_run())
    try:
        yield w
    finally:
        for _ in range(100):
            if all(t.done() for t in w.tasks.values()):
                break
            await asyncio.sleep(0.05)
        try:
            await w.close()
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this test is being cancelled, not only a job of the worker
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def until(condition: Any, timeout_s: float = 10.0) -> None:
    """Wait until condition() holds (checked every 10 ms); fail after `timeout`."""
    await wait_until(condition, timeout_s, interval=0.01, what="the condition to hold")


async def wait_until(condition: Callable[[], Awaitable[Any] | Any], timeout_s: float = 20.0,
                     interval: float = 0.02, what: str = "the condition") -> Any:
    """Poll `condition` (sync or async) until it returns something truthy; returns that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval)


async def wait_all_terminal(database_url: str, expected: int, timeout_s: float) -> dict[str, dict]:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = await conn.fetch(
                "SELECT id, conversation_id, seq, status, run_id, interaction_id, "
                "previous_interaction_id, error, start_attempts, doubtful_attempts, "
                "(SELECT coalesce(jsonb_object_agg(attempt::text, run_id), '{}') "
                " FROM turn_extra_run x WHERE x.turn_id = turn.id) AS extra_runs FROM turn")
            open_turns = [r for r in rows if r["status"] in ("queued", "running")]
            if len(rows) == expected and not open_turns:
                return {r["id"]: dict(r) for r in rows}
            assert time.monotonic() < deadline, f"{len(open_turns)} turns still open"
            await asyncio.sleep(0.25)
    finally:
        await conn.close()


def assert_chains_and_single_runs(turns: dict[str, dict], sandbox_url: str) -> None:
    assert Counter(t["status"] for t in turns.values()) == {"completed": len(turns)}, [
        (t["status"], t["error"]) for t in turns.values() if t["status"] != "completed"]
    runs: dict[str, list[dict]] = {turn_id: [] for turn_id in turns}
    for run in sandbox_runs(sandbox_url):
        turn_id = (run.get("metadata") or {}).get("rs_turn")
        if turn_id in runs:
            runs[turn_id].append(run)
    for turn_id, turn in turns.items():
        assert_runs_explained(turn, runs[turn_id])
    by_conversation: dict[str, list[dict]] = {}
    for turn in turns.values():
        by_conversation.setdefault(turn["conversation_id"], []).append(turn)
    for chain in by_conversation.values():
        chain.sort(key=lambda t: t["seq"])
        assert chain[0]["previous_interaction_id"] is None
        for before, after in itertools.pairwise(chain):
            assert after["previous_interaction_id"] == before["interaction_id"]


def assert_runs_explained(turn: dict, runs: list[dict]) -> None:
    """The turn's recorded run is its last attempt's; any other run is an attempt in doubt's."""
    attempts = Counter(int(run["metadata"]["rs_attempt"]) for run in runs)
    assert all(count == 1 for count in attempts.values()), f"an attempt made two runs: {turn}"
    recorded = [run for run in runs if run["run_id"] == turn["run_id"]]
    assert len(recorded) == 1, f"the turn's run is not at Parallel: {turn}"
    # Its last attempt's, or (group mode) an earlier attempt's in doubt that the last adopted.
    made_by = int(recorded[0]["metadata"]["rs_attempt"])
    assert made_by == turn["start_attempts"] or made_by in turn["doubtful_attempts"], turn
    extra = {int(a): r for a, r in msgspec.json.decode(turn.get("extra_runs") or "{}").items()}
    for run in runs:
        attempt = int(run["metadata"]["rs_attempt"])
        if attempt in extra:
            assert extra[attempt] == run["run_id"], f"an extra run with another id: {turn}"
    others = set(attempts) - {turn["start_attempts"]} - set(extra)
    assert others <= set(turn["doubtful_attempts"]), f"a second run not in doubt: {turn}, {runs}"


def assert_one_run_each(turns: dict[str, dict], sandbox_url: str) -> None:
    """Every turn completed with exactly one Parallel run, the one it follows."""
    ended_otherwise = [t for t in turns.values() if t["status"] != "completed"]
    assert not ended_otherwise, ended_otherwise
    runs: dict[str, list[str]] = {turn_id: [] for turn_id in turns}
    for run in sandbox_runs(sandbox_url):
        turn_id = (run.get("metadata") or {}).get("rs_turn")
        if turn_id in runs:
            runs[turn_id].append(run["run_id"])
    paid_twice = {t: r for t, r in runs.items() if r != [turns[t]["run_id"]]}
    assert not paid_twice, f"turns without exactly their one run: {paid_twice}"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@contextlib.asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Resources]]:
    """The app over its own Resources, with a fresh tenant's key on every request."""
    resources = await Resources.open(settings, listen=True)
    try:
        async with resources.pool.acquire() as conn:
            key = (await create_key(conn, "acme"))[1]
        transport = httpx.ASGITransport(app=create_app(settings, resources=resources))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                     headers={"Authorization": f"Bearer {key}"}) as api:
            yield api, resources
    finally:
        await resources.close()


async def ledger(api, conversation_id: str) -> list[dict]:
    response = await api.get(f"/v1/conversations/{conversation_id}/webhook-deliveries")
    assert response.status_code == 200, response.text
    return response.json()["data"]


async def wait_ledger(api, conversation_id: str, status: str, timeout_s: float = 20) -> dict:
    """The conversation's only delivery once it has `status`."""
    deadline = time.monotonic() + timeout_s
    while True:
        deliveries = await ledger(api, conversation_id)
        if deliveries and deliveries[-1]["status"] == status:
            return deliveries[-1]
        assert time.monotonic() < deadline, f"delivery never {status}: {deliveries}"
        await asyncio.sleep(0.1)


def fast_webhook_retries(settings: Settings) -> Settings:
    """Retries a fifth of a second apart instead of 5 s, 30 s, 2 min, …, and 2 s per attempt."""
    return msgspec.structs.replace(settings, webhook_retry_schedule_s=[0.2] * 4,
                                   webhook_timeout_s=2)


@contextlib.asynccontextmanager
async def guarded_client(
    settings: Settings, resources: Resources, api_key: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The API with WEBHOOK_ALLOW_PRIVATE off, with `api_key` on every request."""
    guarded = dataclasses.replace(
        resources, settings=msgspec.structs.replace(settings, webhook_allow_private=False))
    transport = httpx.ASGITransport(app=create_app(guarded.settings, resources=guarded))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                 headers={"Authorization": f"Bearer {api_key}"}) as http:
        yield http
