"""Property-based fuzzing of the whole API: schemathesis generates requests for every operation of
the app's own OpenAPI document (valid ones and invalid ones), some are made hostile (NUL, lone
surrogates, bytes that are not UTF-8 in the body, a path id, the query or a header: see
tests/integration/hostile.py), and each is sent over HTTP to the real app (uvicorn, real
Postgres, Redis and the sandbox) with one of two tenants' keys. Every answer must be below 500;
an unchanged request's answer must be one the document describes; and a 4xx must have written
nothing: neither a row of any table nor a job in the queue.

`make test` runs FUZZ_CASES (default 400) cases with a fixed seed; `make fuzz` runs 5,000 or more
with a random seed, printed so that a failure can be replayed with FUZZ_SEED=<seed>.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import redis
import requests
import schemathesis
import structlog
import uvicorn
from hypothesis import HealthCheck, Phase, given, seed
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.config import Settings
from service.db.keys import create_key
from service.openapi import render
from tests.helpers import with_database
from tests.integration.hostile import Mutation, mutations
from tests.servers import clone_template, drop_database

CASES = int(os.environ.get("FUZZ_CASES", "400"))  # in all, spread over operations and modes
_SEED = os.environ.get("FUZZ_SEED", "20261126")
SEED = random.SystemRandom().randrange(2**32) if _SEED == "random" else int(_SEED)
# Not negative_data_rejection: the fixed Authorization header sent with every case undoes the
# generator's "missing Authorization" mutations, and unknown query parameters are ignored on
# purpose. Invalid data still runs, and must still get a documented, non-5xx answer.
CONFORMANCE = [not_a_server_error, status_code_conformance, content_type_conformance,
               response_schema_conformance, response_headers_conformance]
PLACEHOLDER = "fuzzpathvalue"


@contextlib.contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """The app under uvicorn in a daemon thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), lifespan="on", log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class WriteProbe:
    """What a request may have written: rows and the newest row version (xmin) of every table,
    and the queue's length. A committed INSERT, UPDATE or DELETE changes the first, an enqueued
    job the second. Read on a connection of its own, in a loop of its own."""

    def __init__(self, database_url: str, redis_url: str, queue_name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._conn: asyncpg.Connection = self._run(asyncpg.connect(database_url))
        tables = self._run(self._conn.fetch(
            "SELECT relname FROM pg_class WHERE relkind = 'r'"
            " AND relnamespace = 'public'::regnamespace ORDER BY relname"))
        parts = [f"(SELECT count(*) FROM {t['relname']}), (SELECT coalesce(max(xmin::text::bigint),"
                 f" 0) FROM {t['relname']})" for t in tables]
        self._sql = "SELECT " + ", ".join(parts)
        self._redis = redis.Redis.from_url(redis_url)
        self._queue = queue_name
        self.last = self.snapshot()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def snapshot(self) -> tuple[Any, ...]:
        return (*self._run(self._conn.fetchrow(self._sql)), self._redis.zcard(self._queue))

    def changed(self) -> bool:
        """Whether anything was written since the last call."""
        now = self.snapshot()
        changed, self.last = now != self.last, now
        return changed

    def close(self) -> None:
        self._run(self._conn.close())
        self._redis.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


async def _prepare(admin_url: str, name: str) -> list[str]:
    conn = await asyncpg.connect(await clone_template(admin_url, name))
    try:
        return [(await create_key(conn, tenant, rate_limit_per_min=0))[1]
                for tenant in ("fuzz_a", "fuzz_b")]
    finally:
        await conn.close()


@pytest.fixture
def app_url(pg_admin_url: str, redis_url: str, sandbox_server
            ) -> Iterator[tuple[str, list[dict[str, str]], WriteProbe]]:
    name = f"research_fuzz_{secrets.token_hex(6)}"
    keys = asyncio.run(_prepare(pg_admin_url, name))
    settings = Settings(
        database_url=with_database(pg_admin_url, name), redis_url=redis_url,
        parallel_api_key="test-key", parallel_base_url=sandbox_server.url,
        queue_name=f"test:{secrets.token_hex(6)}", db_pool_min=1, db_pool_max=4,
        webhook_allow_private=True, log_format="console",
    )
    probe = WriteProbe(settings.database_url, redis_url, settings.queue_name)
    logs = structlog.get_config()
    # Thousands of requests: their access lines would bury the report (problems still show).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        with serve(settings) as url:
            yield url, [{"Authorization": f"Bearer {key}"} for key in keys], probe
    finally:
        structlog.configure(**logs)
        probe.close()
        asyncio.run(drop_database(pg_admin_url, name))


def real_ids(url: str, headers: dict[str, str]) -> dict[str, str]:
    """A conversation, a turn and a webhook delivery of the first tenant, so that generated
    requests also reach past the 404s. The turn is cancelled (terminal: ?wait= on it answers at
    once), which queues the delivery. A second turn stays queued (no worker runs here), so the
    conversation is busy: a generated `if_busy: "reject"` meets its 409, `"interrupt"` its
    cancels."""
    conversation = httpx.post(f"{url}/v1/conversations", headers=headers,
                              json={"webhook_url": "http://127.0.0.1:9999/hook"}).json()
    path = f"{url}/v1/conversations/{conversation['id']}"
    turn = httpx.post(f"{path}/turns", json={"input": "q"}, headers=headers).json()
    httpx.post(f"{path}/turns/{turn['id']}/cancel", headers=headers).raise_for_status()
    httpx.post(f"{path}/turns", json={"input": "open"}, headers=headers).raise_for_status()
    delivery = httpx.get(f"{path}/webhook-deliveries", headers=headers).json()["data"][0]
    return {"conversation_id": conversation["id"], "turn_id": turn["id"],
            "delivery_id": delivery["id"]}


def send_hostile(case: Any, mutation: Mutation, url: str, headers: dict[str, str]
                 ) -> requests.Response:
    """The generated request with the mutation applied, sent as is (no re-encoding)."""
    if mutation.path is not None:
        case.path_parameters[mutation.path[0]] = PLACEHOLDER
    kwargs = case.as_transport_kwargs(base_url=url, headers=headers)
    if mutation.path is not None:
        kwargs["url"] = kwargs["url"].replace(PLACEHOLDER, mutation.path[1])
    if mutation.query is not None:
        kwargs["url"], kwargs["params"] = f"{kwargs['url']}?{mutation.query}", None
    if mutation.body is not None:
        kwargs.pop("json", None)
        kwargs["data"] = mutation.body
        kwargs["headers"]["Content-Type"] = "application/json"
    kwargs["headers"].update(mutation.headers)
    return requests.request(**kwargs, timeout=30)


class Tally:
    """Answers by status class and by mutation, and what went wrong."""

    def __init__(self) -> None:
        self.statuses: collections.Counter[str] = collections.Counter()
        self.kinds: collections.Counter[str] = collections.Counter()
        self.writes_from_4xx: list[str] = []
        self.problems: collections.Counter[str] = collections.Counter()  # 4xx by problem type

    def report(self) -> str:
        return (f"fuzz: {sum(self.statuses.values())} cases (seed {SEED}): "
                f"{dict(sorted(self.statuses.items()))};"
                f" hostile {dict(sorted(self.kinds.items()))};"
                f" problems {dict(sorted(self.problems.items()))};"
                f" 5xx {self.statuses['5xx']}; writes from a 4xx {len(self.writes_from_4xx)}")


def fuzz_operation(operation: Any, mode: GenerationMode, url: str, keys: list[dict[str, str]],
                   ids: dict[str, str], probe: WriteProbe, tally: Tally, examples: int,
                   seed_: int) -> None:
    keep_ids = operation.method.upper() == "DELETE"  # don't delete the shared conversation

    @seed(seed_)
    @hypothesis_settings(
        max_examples=examples, derandomize=False, database=None, deadline=None,
        suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Any, data: Any) -> None:
        headers = data.draw(st.sampled_from(keys), label="tenant")
        if data.draw(st.booleans(), label="real ids") and not keep_ids:
            for name in case.path_parameters or {}:
                if name in ids:
                    case.path_parameters[name] = ids[name]
        mutation = data.draw(mutations(case), label="mutation")
        try:
            if mutation is None:
                response: Any = case.call_and_validate(base_url=url, headers=headers,
                                                       checks=CONFORMANCE, timeout=30)
            else:
                tally.kinds[mutation.kind] += 1
                response = send_hostile(case, mutation, url, headers)
        except BaseException:
            probe.changed()  # a failed check: its request's writes are not the next one's
            raise
        status, wrote = response.status_code, probe.changed()
        tally.statuses[f"{status // 100}xx"] += 1
        name = f"{case.method} {case.path} -> {status}"
        assert status < 500, f"{name}: {response.text[:500]}"
        if wrote and 400 <= status < 500:
            tally.writes_from_4xx.append(name)
            raise AssertionError(f"{name} wrote: {response.text[:300]}")
        if mutation is not None and status >= 400:
            assert response.headers["content-type"].startswith("application/problem+json"), name
        content_type = response.headers.get("content-type") or ""
        if isinstance(content_type, list):  # schemathesis' own responses list each header's values
            content_type = content_type[0]
        if 400 <= status < 500 and content_type.startswith("application/problem+json"):
            tally.problems[response.json()["type"].rsplit("/", 1)[-1]] += 1

    try:
        run()
    except Unsatisfiable:
        # Nothing about this operation can be made invalid (no parameters, no body).
        assert mode is GenerationMode.NEGATIVE


def check_busy_answers(schema: Any, url: str, headers: dict[str, str], ids: dict[str, str],
                       probe: WriteProbe) -> None:
    """Each if_busy value on the busy conversation, checked as the generated cases are: the
    reject's 409 is an answer the document describes and writes nothing; the others queue."""
    operation = schema["/v1/conversations/{conversation_id}/turns"]["POST"]
    path = {"conversation_id": ids["conversation_id"]}
    for if_busy, expected in (("reject", 409), ("interrupt", 202), ("enqueue", 202)):
        case = operation.Case(path_parameters=path, body={"input": "q", "if_busy": if_busy},
                              media_type="application/json")
        response = case.call_and_validate(base_url=url, headers=headers, checks=CONFORMANCE,
                                          timeout=30)
        assert response.status_code == expected, response.text
        assert probe.changed() is (expected == 202), if_busy
        if expected == 409:
            assert response.json()["type"] == "/problems/conversation-busy"


async def test_the_write_probe_sees_inserts_updates_deletes_and_jobs(
    database_url, redis_url, resources
):
    probe = await asyncio.to_thread(WriteProbe, database_url, redis_url,
                                    resources.settings.queue_name)
    conn = await asyncpg.connect(database_url)
    try:
        assert not await asyncio.to_thread(probe.changed)
        await conn.execute("INSERT INTO tenant (id, name) VALUES ('ten_probe', 'probe')")
        assert await asyncio.to_thread(probe.changed)
        assert not await asyncio.to_thread(probe.changed)
        await conn.execute("UPDATE tenant SET name = 'renamed' WHERE id = 'ten_probe'")
        assert await asyncio.to_thread(probe.changed)
        await conn.execute("DELETE FROM tenant WHERE id = 'ten_probe'")
        assert await asyncio.to_thread(probe.changed)
        async with conn.transaction():  # the same count and ids, a new row version
            await conn.execute("INSERT INTO tenant (id, name) VALUES ('ten_probe', 'again')")
        await asyncio.to_thread(probe.changed)
        await conn.execute("UPDATE tenant SET name = name WHERE id = 'ten_probe'")
        assert await asyncio.to_thread(probe.changed)
        await resources.queue.zadd(resources.settings.queue_name, {"start_turn:x": 1})
        assert await asyncio.to_thread(probe.changed)
    finally:
        await conn.close()
        await asyncio.to_thread(probe.close)


def test_fuzz_finds_no_server_error_no_write_from_a_4xx_and_no_answer_off_the_schema(app_url):
    url, keys, probe = app_url
    ids = real_ids(url, keys[0])
    probe.changed()  # the setup's writes are not a request's
    schema = schemathesis.openapi.from_dict(json.loads(render()))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 19
    assert {"ListSources", "GetTranscript"} <= {o.definition.raw["operationId"] for o in operations}
    check_busy_answers(schema, url, keys[0], ids, probe)
    tally, failures = Tally(), []
    # Hypothesis may run fewer examples than asked (an operation with little to vary): further
    # rounds, each with the next seed, until CASES cases have been sent.
    for round_ in range(10):
        missing = CASES - sum(tally.statuses.values())
        if missing <= 0 or failures:
            break
        examples = max(1, -(-missing // (2 * len(operations))))
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    fuzz_operation(operation, mode, url, keys, ids, probe, tally, examples,
                                   SEED + round_)
                # Collect every operation's failures (a FailureGroup is a BaseExceptionGroup).
                except (Exception, BaseExceptionGroup) as exc:
                    name = f"{operation.method.upper()} {operation.path} ({mode.value})"
                    failures.append(f"{name}: {exc}")
    print(tally.report())
    assert failures or sum(tally.statuses.values()) >= CASES, tally.report()
    assert tally.statuses["5xx"] == 0 and not tally.writes_from_4xx, tally.report()
    assert not failures, f"{tally.report()}\n\n" + "\n\n".join(failures)
