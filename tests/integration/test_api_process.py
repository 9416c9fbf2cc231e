"""The API as its own process: SIGTERM drains requests in flight before it exits; a key revoked
with the console script is refused at once although the process keeps keys in memory."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from service.devstack import free_port
from tests.helpers import new_key
from tests.processes import ApiProcess, settings_env

pytestmark = pytest.mark.slow


async def test_sigterm_lets_a_long_poll_in_flight_finish(settings, resources):
    key = await new_key(resources, "acme")
    api = ApiProcess(settings, free_port()).start()
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30,
                                     headers={"Authorization": f"Bearer {key}"}) as http:
            conversation = (await http.post("/v1/conversations", json={})).json()
            turn = (await http.post(f"/v1/conversations/{conversation['id']}/turns",
                                    json={"input": "nobody runs this"})).json()
            poll = asyncio.create_task(http.get(
                f"/v1/conversations/{conversation['id']}/turns/{turn['id']}", params={"wait": 3}))
            await asyncio.sleep(1.0)
            api.process.send_signal(signal.SIGTERM)
            response = await poll
            assert response.status_code == 200
            assert response.json()["status"] == "queued"
            # uvicorn re-raises the signal once drained: a clean exit reads as -SIGTERM.
            assert await asyncio.to_thread(api.process.wait, 10) in (0, -signal.SIGTERM)
    finally:
        api.stop()


async def test_keys_revoke_is_refused_by_a_running_api_on_the_next_request(settings):
    # Black box: keys made and revoked with the console script, used against a running API
    # process that keeps verified keys in memory. Several requests first, so the key is cached.
    import subprocess
    import sys

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "keys", *args], env=settings_env(settings),
            capture_output=True, text=True, timeout=60, check=True,
        )
        return done.stdout

    api = ApiProcess(settings, free_port()).start()
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            for revoke_with in ("id", "whole key"):
                key = (await asyncio.to_thread(cli, "create", "--tenant", "acme")).splitlines()[-1]
                headers = {"Authorization": f"Bearer {key}"}
                for _ in range(3):
                    assert (await http.get("/v1/conversations", headers=headers)).status_code == 200
                key_id = key.split("_")[1] if revoke_with == "id" else key
                await asyncio.to_thread(cli, "revoke", key_id)
                refused = await http.get("/v1/conversations", headers=headers)
                assert refused.status_code == 401, revoke_with
    finally:
        api.stop()


async def _get_healthz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One GET /healthz on an open connection: its status line."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    length = 0
    while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def test_an_idle_connection_is_kept_longer_than_clients_keep_theirs(settings):
    """httpx keeps an idle connection 5 s (aiohttp 15, AWS's load balancer 60): the API keeps
    its own longer (HTTP_KEEP_ALIVE_S, 75 s), so a request sent on a connection idle that long
    is answered instead of meeting the API closing it (uvicorn's default, 5 s, is the race a
    benchmark's client hit: a ReadError on a long-poll sent as the API hung up)."""
    api = ApiProcess(settings, free_port()).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(api.url.rsplit(":")[-1]))
        assert (await _get_healthz(reader, writer)).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(6)  # the idle time itself is what is tested: past httpx's 5 s
        assert not reader.at_eof()
        assert (await _get_healthz(reader, writer)).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        api.stop()
