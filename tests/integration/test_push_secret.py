"""A wrong PARALLEL_WEBHOOK_SECRET does not fail silently: repeated 401s of /v1/hooks/parallel
are counted by reason and logged as "the secret is probably wrong"."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
import structlog

from service.app import create_app
from service.domain.push import WRONG_SECRET_STREAK, parallel_signature
from service.logs import configure_logging
from service.resources import Resources
from tests.helpers import parse, value

REJECTED = "research_parallel_webhook_rejected_total"
SECRET = "the-right-secret"
WARNING = "parallel_webhook_secret_probably_wrong"


@pytest.fixture
async def hooks(settings) -> AsyncIterator[tuple[httpx.AsyncClient, io.StringIO]]:
    """The app with a webhook secret set, logging JSON into a buffer."""
    settings = msgspec.structs.replace(settings, parallel_webhook_secret=SECRET)
    buffer, root = io.StringIO(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("json", stream=buffer, cache=False)
    resources = await Resources.open(settings, listen=False)
    transport = httpx.ASGITransport(app=create_app(settings, resources=resources))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http, buffer
    finally:
        await resources.close()
        structlog.reset_defaults()
        root.handlers[:], root.level = handlers, level


def signed(body: bytes, secret: str, age_s: float = 0) -> dict[str, str]:
    webhook_id, ts = "whevent_secret_test", str(int(time.time() - age_s))
    return {"content-type": "application/json", "webhook-id": webhook_id,
            "webhook-timestamp": ts,
            "webhook-signature": parallel_signature(secret, webhook_id, ts, body)}


def warnings(buffer: io.StringIO) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
    return [line for line in lines if line.get("event") == WARNING]


async def test_repeated_wrong_signatures_are_counted_and_logged_as_a_wrong_secret(hooks):
    http, buffer = hooks
    body = json.dumps({"type": "task_run.status",
                       "data": {"run_id": "trun_unknown", "status": "completed"}}).encode()
    # A genuine delivery first: the streak is per process, and earlier tests may have begun one.
    good = await http.post("/v1/hooks/parallel", content=body, headers=signed(body, SECRET))
    assert good.status_code == 204
    before = parse((await http.get("/metrics")).text)
    # A stale delivery (a replay, not a wrong secret) is counted but starts no streak.
    stale = await http.post("/v1/hooks/parallel", content=body, headers=signed(body, SECRET, 900))
    assert stale.status_code == 401
    for attempt in range(1, WRONG_SECRET_STREAK + 1):
        assert not warnings(buffer), f"warned after {attempt - 1} wrong signatures"
        response = await http.post("/v1/hooks/parallel", content=body,
                                   headers=signed(body, "sandbox_webhook_secret"))
        assert response.status_code == 401
    [warning] = warnings(buffer)
    assert warning["rejected_in_a_row"] == WRONG_SECRET_STREAK and warning["level"] == "warning"
    assert "PARALLEL_WEBHOOK_SECRET" in str(warning["hint"])
    after = parse((await http.get("/metrics")).text)
    assert value(after, REJECTED, reason="mismatch") - value(
        before, REJECTED, reason="mismatch") == WRONG_SECRET_STREAK
    assert value(after, REJECTED, reason="timestamp") - value(
        before, REJECTED, reason="timestamp") == 1

    # A genuine delivery ends the streak: the next wrong ones need a full streak again.
    good = await http.post("/v1/hooks/parallel", content=body, headers=signed(body, SECRET))
    assert good.status_code == 204
    for _ in range(WRONG_SECRET_STREAK - 1):
        await http.post("/v1/hooks/parallel", content=body, headers=signed(body, "wrong"))
    assert len(warnings(buffer)) == 1
    await http.post("/v1/hooks/parallel", content=body, headers=signed(body, "wrong"))
    assert len(warnings(buffer)) == 2
