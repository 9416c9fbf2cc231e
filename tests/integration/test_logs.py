"""Log lines are JSON, carry the ids of what they concern, and never carry a secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from service.devstack import free_port
from service.logs import Redactor, configure_logging
from tests.helpers import create_conversation, post_turn, wait_turn, wait_until


class LogBuffer:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines() if line.strip()]


@pytest.fixture
def logs(settings) -> Iterator[LogBuffer]:
    """JSON logging as `research-service api` and `worker` set it up, written to a buffer."""
    buffer = LogBuffer()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("json", stream=buffer.stream, cache=False, coalesce=True,
                      secrets=[settings.parallel_api_key, settings.parallel_webhook_secret])
    try:
        yield buffer
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = handlers, level


def find(lines: list[dict[str, Any]], event: str, **fields: Any) -> list[dict[str, Any]]:
    return [line for line in lines
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())]


async def test_a_workload_logs_json_lines_with_ids_and_no_secrets(logs, api, api_key, worker):
    conversation = await create_conversation(api, webhook_url=f"http://127.0.0.1:{free_port()}/hook")
    secret = conversation["webhook_secret"]
    turn = await post_turn(api, conversation["id"], "Who won the 2026 Winter Olympics?")
    done = await wait_turn(api, turn)
    assert done["status"] == "completed"
    # The worker logs the turn's end after its commit, which the long-poll may answer first.
    await wait_until(lambda: find(logs.lines(), "turn_finished", turn_id=turn["id"]),
                     what="the turn_finished line")
    bad_key = api_key[:-4] + "zzzz"
    response = await api.get("/v1/conversations", headers={"Authorization": f"Bearer {bad_key}"})
    assert response.status_code == 401
    # Code that carelessly logs a secret still writes none.
    structlog.get_logger("careless").warning("oops", authorization=f"Bearer {api_key}",
                                             note=f"key={api_key} secret={secret}")
    logging.getLogger("careless.stdlib").warning("key %s secret %s", api_key, secret)

    lines = logs.lines()  # every line parses as JSON
    text = logs.text()
    assert api_key not in text and bad_key not in text
    # rsk_<id>_<secret>: the secret (token_urlsafe) may hold "_" itself.
    assert api_key.split("_", 2)[2] not in text, "not even the secret half of the key"
    assert secret not in text and "test-key" not in text
    key_id = api_key.split("_")[1]
    assert find(lines, "oops", authorization="[redacted]",
                note=f"key=rsk_{key_id}_[redacted] secret=whsec_[redacted]")
    assert find(lines, f"key rsk_{key_id}_[redacted] secret whsec_[redacted]")

    tenant_id = find(lines, "request", route="/v1/conversations", status=201)[0]["tenant_id"]
    assert tenant_id.startswith("ten_")
    created = find(lines, "request", route="/v1/conversations/{conversation_id}/turns", status=202)
    assert created and created[0]["conversation_id"] == conversation["id"]
    assert created[0]["tenant_id"] == tenant_id and created[0]["request_id"].startswith("req_")
    polled = find(lines, "request", route="/v1/conversations/{conversation_id}/turns/{turn_id}")
    assert polled and all(line["turn_id"] == turn["id"] for line in polled)
    assert all(line["level"] and line["timestamp"] for line in lines)

    started = find(lines, "run_started", turn_id=turn["id"])
    assert started and started[0]["run_id"] == done["run_id"]
    finished = find(lines, "turn_finished", turn_id=turn["id"], status="completed")
    assert finished and finished[0]["run_id"] == done["run_id"]
    assert finished[0]["conversation_id"] == conversation["id"]

    refused = find(lines, "request", status=401)
    assert refused and "tenant_id" not in refused[0], "no tenant for a refused key"
    # tenant_id is unbound when a request ends: later lines outside requests carry none.
    assert "tenant_id" not in find(lines, "oops")[0]


async def test_request_id_from_the_client_is_kept(logs, api):
    response = await api.get("/v1/conversations", headers={"X-Request-ID": "client-req-42"})
    assert response.headers["X-Request-ID"] == "client-req-42"
    # Info lines are written at the end of the event loop's pass (LineWriter's coalescing).
    assert await wait_until(
        lambda: find(logs.lines(), "request", request_id="client-req-42", status=200), 5
    )


def test_redactor_removes_secrets_wherever_they_are():
    redact = Redactor(["parallel-key-0123456789"])
    event = redact(None, "info", {
        "event": "calling with parallel-key-0123456789",
        "headers": {"Authorization": "Bearer rsk_abc_def", "x-api-key": "whatever-it-is"},
        "args": ["rsk_0123abcd_SeCrEt-value", "whsec_c2VjcmV0"],
        "dsn": "postgresql://app:hunter22@db:5432/app",
        "count": 3,
    })
    assert event == {
        "event": "calling with [redacted]",
        "headers": {"Authorization": "[redacted]", "x-api-key": "[redacted]"},
        "args": ["rsk_0123abcd_[redacted]", "whsec_[redacted]"],
        "dsn": "postgresql://app:[redacted]@db:5432/app",
        "count": 3,
    }


@pytest.mark.parametrize("fields, hidden", [
    # A literal secret that JSON escapes (quote, backslash, non-ASCII) is still found.
    ({"note": 'pw is se"cr\\et-ünïcode'}, 'se"cr\\et-ünïcode'),
    # A secret field name nested anywhere, with a value no pattern knows.
    ({"request": {"meta": {"Password": "correct horse"}}}, "correct horse"),
    ({"auth": [{"api_key": "plain-value-1"}]}, "plain-value-1"),
])
def test_json_lines_are_redacted_even_where_only_the_rendered_line_shows_it(fields, hidden):
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("json", stream=stream, cache=False, secrets=['se"cr\\et-ünïcode'])
    try:
        structlog.get_logger("x").info("careless", **fields)
        structlog.get_logger("x").info("clean", turn_id="turn_1", route="/v1/conversations")
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = handlers, level
    careless, clean = (json.loads(line) for line in stream.getvalue().splitlines())
    assert hidden not in json.dumps(careless, ensure_ascii=False) and "[redacted]" in str(careless)
    assert clean["turn_id"] == "turn_1" and clean["route"] == "/v1/conversations"


def test_console_format_is_for_people():
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("console", stream=stream, cache=False)
    try:
        structlog.get_logger("dev").info("turn_finished", turn_id="turn_1")
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = handlers, level
    line = stream.getvalue()
    assert "turn_finished" in line and "turn_id" in line and "turn_1" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_httpx_request_lines_are_left_out_but_its_warnings_are_not():
    """One line per Parallel call or webhook attempt would double the worker's log; the
    service's own lines say what happened."""
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("json", stream=stream, cache=False)
    try:
        logging.getLogger("httpx").info("HTTP Request: GET http://x/v1/tasks/runs/r \"200 OK\"")
        logging.getLogger("httpx").warning("something httpx warns about")
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = handlers, level
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["something httpx warns about"]
