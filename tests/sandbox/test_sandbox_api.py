"""The sandbox's Task API, driven by the real parallel SDK in strict response-validation mode."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import parallel
import pytest
from parallel import AsyncParallel
from parallel.types import TaskSpecParam, TextSchemaParam

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer

pytestmark = pytest.mark.asyncio

TRUN = re.compile(r"^trun_[0-9a-f]{32}$")
INTR = re.compile(r"^intr_[0-9a-f]{32}$")


async def test_create_retrieve_result(client: AsyncParallel) -> None:
    run = await client.task_run.create(
        input="Which country won the most gold medals in 2024?", processor="lite"
    )
    assert run.status == "queued" and run.is_active
    assert TRUN.match(run.run_id) and INTR.match(run.interaction_id)
    assert run.created_at is not None and run.created_at.endswith("Z")

    fetched = await client.task_run.retrieve(run.run_id)
    assert fetched.run_id == run.run_id and fetched.status in ("queued", "running")

    result = await client.task_run.result(run.run_id, api_timeout=5)
    assert result.run.status == "completed" and not result.run.is_active
    assert result.output.type == "text"
    assert (
        result.output.content
        == 'Answer to "Which country won the most gold medals in 2024?" (processor lite).'
    )
    [basis] = result.output.basis
    assert basis.field == "output" and basis.confidence == "high"
    assert basis.citations and basis.citations[0].url.startswith("https://example.org/")

    again = await client.task_run.result(run.run_id, api_timeout=0)
    assert again.output.content == result.output.content


async def test_lifecycle_moves_through_running(client: AsyncParallel) -> None:
    run = await client.task_run.create(input="[sandbox:slow=0.6] q", processor="lite")
    await asyncio.sleep(0.2)
    assert (await client.task_run.retrieve(run.run_id)).status == "running"
    result = await client.task_run.result(run.run_id, api_timeout=5)
    assert result.run.status == "completed"


async def test_result_times_out_with_408(client: AsyncParallel) -> None:
    run = await client.task_run.create(input="[sandbox:slow=5] a slow question", processor="lite")
    started = time.monotonic()
    with pytest.raises(parallel.APIStatusError) as info:
        await client.task_run.result(run.run_id, api_timeout=1)
    assert 0.9 < time.monotonic() - started < 3
    assert info.value.status_code == 408
    assert info.value.body["error"]["message"] == "Request timed out; run still active"  # type: ignore[index]  # the SDK types an error's body as object


async def test_failed_run_gives_404_on_result(client: AsyncParallel) -> None:
    run = await client.task_run.create(input="[sandbox:fail] doomed", processor="base")
    with pytest.raises(parallel.NotFoundError):
        await client.task_run.result(run.run_id, api_timeout=5)
    failed = await client.task_run.retrieve(run.run_id)
    assert failed.status == "failed" and not failed.is_active
    assert failed.error is not None and failed.error.message == "Task execution failed (sandbox)"
    assert failed.error.ref_id


async def test_unknown_run_is_404_everywhere(client: AsyncParallel) -> None:
    missing = "trun_" + "0" * 32
    with pytest.raises(parallel.NotFoundError):
        await client.task_run.retrieve(missing)
    with pytest.raises(parallel.NotFoundError):
        await client.task_run.result(missing, api_timeout=1)
    with pytest.raises(parallel.NotFoundError):
        await client.task_run.retrieve_input(missing)
    with pytest.raises(parallel.NotFoundError):
        await client.task_run.events(missing)


async def test_retrieve_input_echoes_the_request(client: AsyncParallel) -> None:
    first = await client.task_run.create(input="Who won?", processor="lite")
    run = await client.task_run.create(
        input="How many medals?",
        processor="core",
        previous_interaction_id=first.interaction_id,
        metadata={"turn": "t2", "n": 2},
    )
    echoed = await client.task_run.retrieve_input(run.run_id)
    assert echoed.input == "How many medals?" and echoed.processor == "core"
    assert echoed.previous_interaction_id == first.interaction_id
    assert echoed.metadata == {"turn": "t2", "n": 2}
    assert (await client.task_run.retrieve(run.run_id)).metadata == {"turn": "t2", "n": 2}


async def test_events_stream(client: AsyncParallel) -> None:
    run = await client.task_run.create(input="Stream me", processor="pro")
    stream = await client.task_run.events(run.run_id)
    assert stream.response.headers["content-type"].startswith("text/event-stream")
    events = [event async for event in stream]
    types = [e.type for e in events]
    assert types[0] == "task_run.state" and types[-1] == "task_run.state"
    assert "task_run.progress_stats" in types
    assert any(t.startswith("task_run.progress_msg.") for t in types)
    first, last = events[0], events[-1]
    assert first.run.is_active and first.event_id is None  # type: ignore[union-attr]  # an event union: the type checked above says which
    assert last.run.status == "completed" and last.output is not None  # type: ignore[union-attr]  # an event union: the type checked above says which
    assert last.output.content == 'Answer to "Stream me" (processor pro).'  # type: ignore[union-attr]  # an event union: the type checked above says which
    stats = [e for e in events if e.type == "task_run.progress_stats"]
    assert all(0 <= s.progress_meter <= 100 for s in stats) and stats[-1].progress_meter == 100

    replay = [event async for event in await client.task_run.events(run.run_id)]
    assert replay[0].type == "task_run.state" and replay[-1].output is not None  # type: ignore[union-attr]  # an event union: the type checked above says which


async def test_events_raw_wire_format(sandbox: SandboxServer, client: AsyncParallel) -> None:
    run = await client.task_run.create(input="[sandbox:fail] wire", processor="lite")
    async with httpx.AsyncClient(base_url=sandbox.url) as raw:
        resp = await raw.get(f"/v1/tasks/runs/{run.run_id}/events", headers={"x-api-key": "k"})
    lines = resp.text.splitlines()
    assert not any(line.startswith("id:") for line in lines)
    assert "[DONE]" not in resp.text
    assert '"status":"failed"' in [line for line in lines if line.startswith("data:")][-1]


async def test_chained_turns_name_all_ancestors(client: AsyncParallel) -> None:
    questions = [
        "Which country won the 2022 World Cup?",
        "Who was their captain?",
        "How many goals did he score?",
    ]
    prev: str | None = None
    answers = []
    for question in questions:
        kwargs: dict[str, Any] = {"previous_interaction_id": prev} if prev else {}
        run = await client.task_run.create(input=question, processor="lite", **kwargs)
        result = await client.task_run.result(run.run_id, api_timeout=5)
        answers.append(result.output.content)
        prev = run.interaction_id
    assert answers[2] == (
        f'Answer to "{questions[2]}" (processor lite). Context: "{questions[0]}"; "{questions[1]}".'
    )
    assert answers[1].endswith(f'Context: "{questions[0]}".')

    # Same input and chain: same answer.
    first = await client.task_run.create(input=questions[0], processor="lite")
    await client.task_run.result(first.run_id, api_timeout=5)
    second = await client.task_run.create(
        input=questions[1], processor="lite", previous_interaction_id=first.interaction_id
    )
    assert (await client.task_run.result(second.run_id, api_timeout=5)).output.content == answers[1]


SCHEMA = {
    "type": "object",
    "properties": {
        "country": {"type": "string", "description": "Winning country"},
        "medals": {"type": "integer", "minimum": 0, "maximum": 500},
        "share": {"type": "number"},
        "hosted": {"type": "boolean"},
        "tier": {"type": "string", "enum": ["gold", "silver", "bronze"]},
        "athletes": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "required": ["name"],
            },
        },
        "capital": {
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "required": ["name"],
        },
    },
    "required": ["country", "medals", "share", "hosted", "tier", "athletes", "capital"],
    "additionalProperties": False,
}
PY_TYPES = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "object": dict,
    "array": list,
}


def check(value: Any, schema: dict[str, Any]) -> None:
    """A small JSON-schema checker for the keywords used in SCHEMA."""
    assert isinstance(value, PY_TYPES[schema["type"]]), (value, schema)
    if "enum" in schema:
        assert value in schema["enum"]
    if "minimum" in schema:
        assert schema["minimum"] <= value <= schema["maximum"]
    if schema["type"] == "object":
        assert set(schema.get("required", [])) <= set(value)
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(schema["properties"])
        for key, sub in value.items():
            check(sub, schema["properties"][key])
    if schema["type"] == "array":
        for item in value:
            check(item, schema["items"])


async def test_json_schema_output_fits_schema(client: AsyncParallel) -> None:
    spec = {"output_schema": {"type": "json", "json_schema": SCHEMA}}
    run = await client.task_run.create(
        input="Olympics 2024 winner", processor="core", task_spec=spec
    )
    result = await client.task_run.result(run.run_id, api_timeout=5)
    assert result.output.type == "json"
    check(result.output.content, SCHEMA)
    assert [b.field for b in result.output.basis] == list(SCHEMA["properties"])


async def test_auto_and_text_schemas(client: AsyncParallel) -> None:
    auto = await client.task_run.create(
        input="q", processor="pro", task_spec={"output_schema": {"type": "auto"}}
    )
    out = (await client.task_run.result(auto.run_id, api_timeout=5)).output
    assert out.type == "json" and out.output_schema and "answer" in out.content
    bare = await client.task_run.create(
        input="q", processor="lite", task_spec={"output_schema": "A short answer"}
    )
    assert (await client.task_run.result(bare.run_id, api_timeout=5)).output.type == "text"


async def test_an_empty_output_schema_is_a_text_schema(client: AsyncParallel) -> None:
    # Parallel's guide sends TextSchemaParam(), i.e. {}: its spec reads that as a TextSchema
    # (JsonSchema needs json_schema; TextSchema requires nothing), so the answer is text.
    for spec in (TaskSpecParam(output_schema=TextSchemaParam()),
                 {"output_schema": {"description": "One sentence"}}):
        run = await client.task_run.create(input="Who won?", processor="lite", task_spec=spec)
        output = (await client.task_run.result(run.run_id, api_timeout=5)).output
        assert output.type == "text", spec
        assert output.content == 'Answer to "Who won?" (processor lite).'
        assert [b.field for b in output.basis] == ["output"]
        echoed = await client.get(f"/v1/tasks/runs/{run.run_id}/input", cast_to=object)
        assert echoed["task_spec"] == spec  # type: ignore[index]  # what the SDK sent: {} first


async def test_request_validation(client: AsyncParallel) -> None:
    with pytest.raises(parallel.PermissionDeniedError) as info:
        await client.task_run.create(input="q", processor="turbo")
    assert info.value.body["error"]["message"] == "Forbidden: invalid processor in request"  # type: ignore[index]  # the SDK types an error's body as object
    with pytest.raises(parallel.UnprocessableEntityError):
        await client.task_run.create(input="x" * 25_001, processor="lite")
    with pytest.raises(parallel.UnprocessableEntityError):
        await client.task_run.create(input="q", processor="lite", metadata={"k" * 17: "v"})
    with pytest.raises(parallel.UnprocessableEntityError):
        await client.task_run.create(input="q", processor="lite", metadata={"k": "v" * 513})
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(4):
        deep = {"type": "object", "properties": {"x": deep}}
    with pytest.raises(parallel.UnprocessableEntityError):
        await client.task_run.create(
            input="q",
            processor="lite",
            task_spec={"output_schema": {"type": "json", "json_schema": deep}},
        )
    with pytest.raises(parallel.UnprocessableEntityError):
        await client.task_run.create(input="q", processor="lite", extra_body={"processor": None})


async def test_auth_and_strict_settings() -> None:
    config = SandboxConfig(
        api_key="secret", strict_interactions=True, interaction_id_equals_run_id=True
    )
    with SandboxServer(config) as server:
        wrong = AsyncParallel(
            api_key="nope", base_url=server.url, _strict_response_validation=True, max_retries=0
        )
        with pytest.raises(parallel.AuthenticationError) as info:
            await wrong.task_run.create(input="q", processor="lite")
        assert info.value.body["type"] == "error"  # type: ignore[index]  # the SDK types an error's body as object
        async with httpx.AsyncClient(base_url=server.url) as raw:
            missing = await raw.post("/v1/tasks/runs", json={"input": "q", "processor": "lite"})
        assert missing.status_code == 401 and missing.json()["error"]["ref_id"]

        good = AsyncParallel(
            api_key="secret", base_url=server.url, _strict_response_validation=True, max_retries=0
        )
        run = await good.task_run.create(input="q", processor="lite")
        assert run.interaction_id == run.run_id
        with pytest.raises(parallel.UnprocessableEntityError):
            await good.task_run.create(
                input="q", processor="lite", previous_interaction_id="intr_unknown"
            )


async def test_control_api(control: httpx.AsyncClient, client: AsyncParallel) -> None:
    run = await client.task_run.create(
        input="[sandbox:slow=30] q", processor="ultra", metadata={"turn": "1"}
    )
    await client.task_run.retrieve(run.run_id)
    record = (await control.get(f"/_sandbox/runs/{run.run_id}")).json()
    assert record["status"] in ("queued", "running") and record["metadata"] == {"turn": "1"}

    done = (await control.post(f"/_sandbox/runs/{run.run_id}/complete")).json()
    assert (
        done["status"] == "completed" and done["completed_at"] and done["output"]["type"] == "text"
    )
    assert (await control.post(f"/_sandbox/runs/{run.run_id}/fail")).status_code == 409
    assert (await client.task_run.result(run.run_id, api_timeout=1)).run.status == "completed"

    calls = (await control.get("/_sandbox/calls")).json()["data"]
    assert [(c["method"], c["status"]) for c in calls] == [
        ("POST", 202),
        ("GET", 200),
        ("GET", 200),
    ]
    assert all(c["run_id"] == run.run_id for c in calls)

    assert len((await control.get("/_sandbox/runs")).json()["data"]) == 1
    await control.post("/_sandbox/reset")
    assert (await control.get("/_sandbox/runs")).json()["data"] == []
    assert (await control.get("/_sandbox/calls")).json()["data"] == []
