"""Sandbox test fixtures: a shared sandbox (reset per test), SDK and control clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from parallel import AsyncParallel

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests.receivers import ThreadedReceiver

TEST_CONFIG = SandboxConfig(default_latency_s=0.3, queued_s=0.05, webhook_retry_base_s=0.1)


@pytest.fixture(scope="session")
def shared_sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(TEST_CONFIG) as server:
        yield server


@pytest.fixture
def sandbox(shared_sandbox: SandboxServer) -> SandboxServer:
    httpx.post(f"{shared_sandbox.url}/_sandbox/reset").raise_for_status()
    return shared_sandbox


@pytest.fixture
async def control(sandbox: SandboxServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=10) as client:
        yield client


@pytest.fixture
def client(sandbox: SandboxServer) -> AsyncParallel:
    return AsyncParallel(
        api_key="k", base_url=sandbox.url, _strict_response_validation=True, max_retries=0
    )


@pytest.fixture
def receiver() -> Iterator[ThreadedReceiver]:
    rec = ThreadedReceiver()
    rec.thread.start()
    yield rec
    rec.server.shutdown()
    rec.server.server_close()
