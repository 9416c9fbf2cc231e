"""The API as its own process: SIGTERM drains requests in flight before it exits."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from service.devstack import free_port
from tests.conftest import new_key
from tests.processes import ApiProcess

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
