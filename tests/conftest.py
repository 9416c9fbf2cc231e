"""Fixtures: real PostgreSQL (a migrated template cloned per test), real Redis, the sandbox over
HTTP, the app, and an in-process worker."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvloop

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from service.app import create_app
from service.config import Settings
from service.resources import Resources
from tests.helpers import TASK_GROUPS, guarded_client, new_key, running_worker
from tests.receivers import Receiver, receiving
from tests.servers import (
    TEMPLATE_DB,
    clone_template,
    create_template,
    drop_database,
    postgres_server,
    redis_server,
)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Every async test and fixture on uvloop: the loop the API and the worker run on."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    with postgres_server() as url:
        asyncio.run(create_template(url))
        yield url
        asyncio.run(drop_database(url, TEMPLATE_DB))


@pytest.fixture
async def database_url(pg_admin_url: str) -> AsyncIterator[str]:
    """A fresh database cloned from the migrated template, dropped afterwards."""
    name = f"research_test_{secrets.token_hex(6)}"
    yield await clone_template(pg_admin_url, name)
    await drop_database(pg_admin_url, name)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    config = SandboxConfig(default_latency_s=0.3, queued_s=0.05, task_groups=TASK_GROUPS)
    with SandboxServer(config) as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> Iterator[SandboxServer]:
    """The session's sandbox, with faults cleared after each test."""
    yield sandbox_server
    httpx.delete(f"{sandbox_server.url}/_sandbox/faults")


@pytest.fixture
def settings(database_url: str, redis_url: str, sandbox: SandboxServer) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        parallel_api_key="test-key",
        parallel_base_url=sandbox.url,
        queue_name=f"test:{secrets.token_hex(6)}",
        db_pool_min=1,
        db_pool_max=8,
        poll_initial_s=0.1,
        poll_max_s=0.5,
        follower_idle_s=0.1,
        webhook_allow_private=True,
        log_format="console",
        worker_metrics_port=0,  # tests that want the port set their own
    )


@pytest.fixture
async def resources(settings: Settings) -> AsyncIterator[Resources]:
    res = await Resources.open(settings, listen=True)
    yield res
    await res.close()


@pytest.fixture
async def client(settings: Settings, resources: Resources) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client calling the app in this event loop (so it shares `resources`)."""
    transport = httpx.ASGITransport(app=create_app(settings, resources=resources))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield http


@pytest.fixture
async def api_key(resources: Resources) -> str:
    return await new_key(resources, "acme")


@pytest.fixture
async def api(client: httpx.AsyncClient, api_key: str) -> httpx.AsyncClient:
    """The test client with acme's API key on every request."""
    client.headers["Authorization"] = f"Bearer {api_key}"
    return client


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[object]:
    """An arq worker running in this event loop, with its follower, until the test ends."""
    async with running_worker(settings) as w:
        yield w


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver on a free local port, answering 200 (tests.receivers)."""
    async with receiving() as receiver:
        yield receiver


@pytest.fixture
async def guarded_api(
    settings: Settings, resources: Resources, api_key: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The API with WEBHOOK_ALLOW_PRIVATE off."""
    async with guarded_client(settings, resources, api_key) as http:
        yield http
