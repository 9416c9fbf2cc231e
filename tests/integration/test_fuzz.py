"""Schema-based fuzzing of the whole API: schemathesis generates requests from the app's own OpenAPI
document (valid ones and invalid ones), sends them to the real app over HTTP, and every answer
must be a non-5xx answer the document describes (status, content type, body schema).

The app runs under uvicorn in a thread with resources it opens itself in its own event loop,
as in production. Generation is derandomized (a fixed seed) and bounded per operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import schemathesis
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
from tests.conftest import _drop_database, clone_template, with_database

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))  # per operation and generation mode
# Not negative_data_rejection: the fixed Authorization header sent with every case undoes the
# generator's "missing Authorization" mutations, and unknown query parameters are ignored on
# purpose. Invalid data still runs, and must still get a documented, non-5xx answer.
CONFORMANCE = [not_a_server_error, status_code_conformance, content_type_conformance,
               response_schema_conformance, response_headers_conformance]


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


async def _prepare(admin_url: str, name: str) -> str:
    conn = await asyncpg.connect(await clone_template(admin_url, name))
    try:
        return (await create_key(conn, "fuzz", rate_limit_per_min=0))[1]
    finally:
        await conn.close()


@pytest.fixture
def app_url(pg_admin_url: str, redis_url: str, sandbox_server
            ) -> Iterator[tuple[str, dict[str, str]]]:
    name = f"research_fuzz_{secrets.token_hex(6)}"
    key = asyncio.run(_prepare(pg_admin_url, name))
    settings = Settings(
        database_url=with_database(pg_admin_url, name), redis_url=redis_url,
        parallel_api_key="test-key", parallel_base_url=sandbox_server.url,
        queue_name=f"test:{secrets.token_hex(6)}", db_pool_min=1, db_pool_max=4,
        webhook_allow_private=True, log_format="console",
    )
    try:
        with serve(settings) as url:
            yield url, {"Authorization": f"Bearer {key}"}
    finally:
        asyncio.run(_drop_database(pg_admin_url, name))


def real_ids(url: str, headers: dict[str, str]) -> dict[str, str]:
    """A conversation and a turn that exist, so generated requests also reach past the 404s.

    The turn is cancelled (terminal), so that ?wait= on it answers at once.
    """
    conversation = httpx.post(f"{url}/v1/conversations", json={}, headers=headers).json()
    path = f"{url}/v1/conversations/{conversation['id']}/turns"
    turn = httpx.post(path, json={"input": "q"}, headers=headers).json()
    httpx.post(f"{path}/{turn['id']}/cancel", headers=headers).raise_for_status()
    return {"conversation_id": conversation["id"], "turn_id": turn["id"]}


def fuzz_operation(operation: Any, mode: GenerationMode, url: str, headers: dict[str, str],
                   ids: dict[str, str]) -> None:
    keep_ids = operation.method.upper() == "DELETE"  # don't delete the shared conversation

    @seed(20261126)
    @hypothesis_settings(
        max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
        suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=mode), use_real=st.booleans())
    def run(case: Any, use_real: bool) -> None:
        if use_real and not keep_ids and case.path_parameters:
            for name in case.path_parameters:
                if name in ids:
                    case.path_parameters[name] = ids[name]
        case.call_and_validate(base_url=url, headers=headers, checks=CONFORMANCE, timeout=30)

    try:
        run()
    except Unsatisfiable:
        # Nothing about this operation can be made invalid (no parameters, no body).
        assert mode is GenerationMode.NEGATIVE


def test_fuzz_finds_no_server_error_and_no_answer_off_the_schema(app_url):
    url, headers = app_url
    ids = real_ids(url, headers)
    schema = schemathesis.openapi.from_dict(json.loads(render()))
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(operation, mode, url, headers, ids)
            # Collect every operation's failures (a FailureGroup is a BaseExceptionGroup).
            except (Exception, BaseExceptionGroup) as exc:
                name = f"{operation.method.upper()} {operation.path} ({mode.value})"
                failures.append(f"{name}: {exc}")
    assert not failures, "\n\n".join(failures)
