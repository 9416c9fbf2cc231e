"""Postgres stops mid-workload: the API answers 503 (never 500), the worker waits, and once
Postgres is back every turn completes. Uses a PostgreSQL server of its own to stop and start."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import httpx
import msgspec
import pytest

from service.app import create_app
from service.db.keys import create_key
from service.db.migrate import migrate
from service.devstack import EmbeddedPostgres, embedded_postgres_unavailable_reason, free_port
from service.resources import Resources
from tests.helpers import (
    assert_chains_and_single_runs,
    create_conversation,
    post_turn,
    sandbox_runs,
    wait_all_terminal,
    wait_until,
)
from tests.processes import WorkerProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(embedded_postgres_unavailable_reason() is not None,
                       reason=str(embedded_postgres_unavailable_reason())),
]


def started(sandbox_url: str, turn_ids: set[str]) -> bool:
    """Whether the sandbox has a run for any of the turns."""
    return any((r.get("metadata") or {}).get("rs_turn") in turn_ids
               for r in sandbox_runs(sandbox_url))


async def test_api_answers_503_while_postgres_is_down_and_all_turns_complete(settings, sandbox):
    with tempfile.TemporaryDirectory(prefix="pg-outage-") as folder:
        server = EmbeddedPostgres(Path(folder), port=free_port())
        url = server.start()
        try:
            await migrate(url)
            settings = msgspec.structs.replace(
                settings, database_url=url, start_lease_s=8.0, check_lease_s=3.0, job_timeout_s=5,
                reconcile_interval_s=2, poll_initial_s=0.2, poll_max_s=1.0)
            resources = await Resources.open(settings, listen=True)
            async with resources.pool.acquire() as conn:
                key = (await create_key(conn, "acme"))[1]
            transport = httpx.ASGITransport(app=create_app(settings, resources=resources))
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                         headers={"Authorization": f"Bearer {key}"}) as api:
                convs = [await create_conversation(api) for _ in range(5)]
                ids = {(await post_turn(api, conv["id"], f"[sandbox:slow=1] q{k}"))["id"]
                       for conv in convs for k in range(3)}
                with WorkerProcess(settings):
                    await wait_until(lambda: started(sandbox.url, ids), 30,
                                     what="the workload under way")
                    server.stop()
                    statuses = set()
                    for _ in range(10):
                        for path in ("/v1/conversations", f"/v1/conversations/{convs[0]['id']}",
                                     "/readyz"):
                            response = await api.get(path)
                            statuses.add(response.status_code)
                            assert response.headers["content-type"].startswith(
                                "application/problem+json")
                        response = await api.post(f"/v1/conversations/{convs[0]['id']}/turns",
                                                  json={"input": "during the outage"})
                        statuses.add(response.status_code)
                        await asyncio.sleep(0.2)
                    assert statuses == {503}
                    server.start()
                    assert (await api.get("/readyz")).status_code == 200
                    turns = await wait_all_terminal(url, expected=15, timeout_s=120)
            await resources.close()
            assert_chains_and_single_runs(turns, sandbox.url)
        finally:
            server.stop()
