"""The sandbox's task groups, driven by the real parallel SDK (`client.task_group`) in strict
response-validation mode over HTTP: create, add runs, the events and runs streams, faults, off."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import parallel
import pytest
from parallel import AsyncParallel
from parallel.types import TaskGroupStatusEvent, TaskRun, TaskRunEvent

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests.helpers import wait_until

pytestmark = pytest.mark.asyncio

TGRP = re.compile(r"^tgrp_[0-9a-f]{32}$")
DEADLINE_S = 30  # a bound for the waits on a loaded machine, not a timing under test


def lite(question: str, **fields: Any) -> dict[str, Any]:
    return {"input": question, "processor": "lite", **fields}


async def events(client: AsyncParallel, group_id: str, **params: Any) -> list[Any]:
    """Every event of one connection to the group's event stream, until the sandbox ends it."""
    async with asyncio.timeout(DEADLINE_S):
        return [event async for event in await client.task_group.events(group_id, **params)]


async def listing(client: AsyncParallel, group_id: str, **params: Any) -> list[TaskRunEvent]:
    async with asyncio.timeout(DEADLINE_S):
        found = [event async for event in await client.task_group.get_runs(group_id, **params)]
    assert all(isinstance(event, TaskRunEvent) for event in found)
    return found  # type: ignore[return-value]  # the assert above narrows the events


def ended(found: list[Any]) -> dict[str, str]:
    """run_id → status of the task_run.state events (asserting one per run)."""
    states = [event for event in found if event.type == "task_run.state"]
    assert len({event.run.run_id for event in states}) == len(states), "a run reported twice"
    return {event.run.run_id: event.run.status for event in states}


async def test_create_and_retrieve_a_group(client: AsyncParallel) -> None:
    group = await client.task_group.create(metadata={"owner": "svc", "shard": 3})
    assert TGRP.match(group.task_group_id) and group.created_at and group.created_at.endswith("Z")
    assert group.metadata == {"owner": "svc", "shard": 3}
    assert group.status.num_task_runs == 0 and group.status.task_run_status_counts == {}
    assert group.status.is_active is False

    fetched = await client.task_group.retrieve(group.task_group_id)
    assert fetched.task_group_id == group.task_group_id and fetched.metadata == group.metadata
    assert (await client.task_group.create()).metadata is None
    assert await events(client, group.task_group_id) == []  # no run active: the stream ends

    with pytest.raises(parallel.NotFoundError) as info:
        await client.task_group.retrieve("tgrp_unknown")
    assert info.value.body["error"]["message"] == "TaskGroup not found"  # type: ignore[index]  # the SDK types an error's body as object
    with pytest.raises(parallel.UnprocessableEntityError):
        await client.task_group.create(metadata={"a key longer than 16": "x"})


async def test_added_runs_are_ordinary_runs(client: AsyncParallel) -> None:
    first = await client.task_run.create(input="Who won in 2024?", processor="lite")
    first_done = await client.task_run.result(first.run_id, api_timeout=DEADLINE_S)
    group = await client.task_group.create()
    spec = {"output_schema": {"type": "json", "json_schema": {
        "type": "object", "properties": {"medals": {"type": "integer"}}, "required": ["medals"]}}}
    added = await client.task_group.add_runs(
        group.task_group_id,
        default_task_spec={"output_schema": {"type": "text"}},
        inputs=[
            lite("How many medals?", metadata={"rs_turn": "t0"},
                 previous_interaction_id=first_done.run.interaction_id),
            lite("Count them", processor="core", metadata={"rs_turn": "t1"}, task_spec=spec),
            lite("And in 2020?", metadata={"rs_turn": "t2"}),
        ],
    )
    assert added.run_cursor is None and added.event_cursor is None  # the group's first runs
    assert added.status.num_task_runs == 3 and added.status.is_active
    assert sum(added.status.task_run_status_counts.values()) == 3

    runs = [await client.task_run.retrieve(run_id) for run_id in added.run_ids]
    assert [run.metadata for run in runs] == [{"rs_turn": f"t{i}"} for i in range(3)]  # in order
    assert {run.task_group_id for run in runs} == {group.task_group_id}
    assert [run.processor for run in runs] == ["lite", "core", "lite"]

    chained, counted, plain = [
        await client.task_run.result(run_id, api_timeout=DEADLINE_S) for run_id in added.run_ids
    ]
    assert chained.output.content == (
        'Answer to "How many medals?" (processor lite). Context: "Who won in 2024?".'
    )
    assert chained.run.task_group_id == group.task_group_id
    assert counted.output.type == "json" and isinstance(counted.output.content["medals"], int)
    assert plain.output.type == "text"  # the default task spec applied
    echoed = await client.task_run.retrieve_input(added.run_ids[2])
    assert echoed.task_spec is not None and echoed.task_spec.output_schema.type == "text"

    one = await client.task_group.retrieve_run(added.run_ids[0], task_group_id=group.task_group_id)
    assert one.run_id == added.run_ids[0] and one.status == "completed"
    other = await client.task_group.create()
    with pytest.raises(parallel.NotFoundError):  # a run of another group
        await client.task_group.retrieve_run(added.run_ids[0], task_group_id=other.task_group_id)
    with pytest.raises(parallel.NotFoundError):
        await client.task_group.retrieve_run(first.run_id, task_group_id=group.task_group_id)


async def test_the_event_stream_reports_every_run_as_it_ends(client: AsyncParallel) -> None:
    group = await client.task_group.create()
    inputs = [lite(f"q{i}", metadata={"i": str(i)}) for i in range(8)]
    inputs.append(lite("[sandbox:fail] doomed", metadata={"i": "8"}))
    added = await client.task_group.add_runs(group.task_group_id, inputs=inputs)

    found = await events(client, group.task_group_id)  # ends once no run is active
    assert ended(found) == {
        **{run_id: "completed" for run_id in added.run_ids[:8]}, added.run_ids[8]: "failed"
    }
    failed = next(e for e in found if e.type == "task_run.state" and e.run.status == "failed")
    assert failed.run.error is not None and failed.output is None
    states = [event for event in found if event.type == "task_run.state"]
    assert {event.run.task_group_id for event in states} == {group.task_group_id}
    ids = [int(event.event_id) for event in found]
    assert ids == list(range(1, len(found) + 1))  # every event has its own, increasing id
    assert isinstance(found[0], TaskGroupStatusEvent) and found[0].status.num_task_runs == 9
    last = found[-1]
    assert isinstance(last, TaskGroupStatusEvent) and not last.status.is_active
    assert last.status.task_run_status_counts == {"completed": 8, "failed": 1}
    status = (await client.task_group.retrieve(group.task_group_id)).status
    assert status.task_run_status_counts == {"completed": 8, "failed": 1} and not status.is_active

    assert await events(client, group.task_group_id) == found  # replayed whole from the start


async def test_resuming_from_last_event_id_misses_nothing(client: AsyncParallel) -> None:
    group = await client.task_group.create()
    first = await client.task_group.add_runs(
        group.task_group_id, inputs=[lite(f"early {i}") for i in range(5)]
    )
    seen: list[Any] = []
    async with asyncio.timeout(DEADLINE_S):
        async with await client.task_group.events(group.task_group_id) as stream:
            async for event in stream:
                seen.append(event)
                if event.type == "task_run.state":
                    break  # the connection breaks after the first run's end
    second = await client.task_group.add_runs(
        group.task_group_id,
        inputs=[lite(f"late {i}") for i in range(4)] + [lite("[sandbox:slow=1] the last")],
    )
    assert second.event_cursor is not None and second.run_cursor == "5"

    seen += await events(client, group.task_group_id, last_event_id=seen[-1].event_id)
    assert [event.event_id for event in seen] == [str(i) for i in range(1, len(seen) + 1)]
    assert set(ended(seen)) == set(first.run_ids + second.run_ids)
    assert seen == await events(client, group.task_group_id)  # the same as one whole connection

    after = await events(client, group.task_group_id, last_event_id=second.event_cursor)
    assert set(second.run_ids) <= set(ended(after))  # the add's cursor precedes its runs' ends
    assert isinstance(after[0], TaskGroupStatusEvent) and after[0].status.num_task_runs == 10
    assert await events(client, group.task_group_id, last_event_id=seen[-1].event_id) == []
    with pytest.raises(parallel.UnprocessableEntityError):
        await events(client, group.task_group_id, last_event_id=str(len(seen) + 1))


async def test_the_event_stream_ends_at_its_timeout(client: AsyncParallel) -> None:
    group = await client.task_group.create()
    added = await client.task_group.add_runs(
        group.task_group_id, inputs=[lite("[sandbox:slow=60] long")]
    )
    found = await events(client, group.task_group_id, api_timeout=0.5)
    assert [event.type for event in found] == ["task_group_status"]  # no run has ended yet
    run = await client.task_run.retrieve(added.run_ids[0])
    assert run.is_active
    with pytest.raises(parallel.UnprocessableEntityError):
        await events(client, group.task_group_id, api_timeout=-1)


async def test_a_reset_ends_the_open_streams(
    client: AsyncParallel, control: httpx.AsyncClient
) -> None:
    group = await client.task_group.create()
    await client.task_group.add_runs(group.task_group_id, inputs=[lite("[sandbox:slow=60] q")])
    following = asyncio.create_task(events(client, group.task_group_id))

    async def answering() -> bool:
        calls = (await control.get("/_sandbox/calls")).json()["data"]
        return any(c["path"].endswith("/events") and c["status"] == 200 for c in calls)

    await wait_until(answering, DEADLINE_S, what="the stream to start answering")
    await control.post("/_sandbox/reset")
    found = await asyncio.wait_for(following, DEADLINE_S)
    assert [event.type for event in found] == ["task_group_status"]
    with pytest.raises(parallel.NotFoundError):
        await client.task_group.retrieve(group.task_group_id)


async def test_listing_finds_runs_by_metadata_and_status(
    client: AsyncParallel, control: httpx.AsyncClient
) -> None:
    group = await client.task_group.create()
    added = await client.task_group.add_runs(group.task_group_id, inputs=[
        lite("done", metadata={"rs_turn": "a", "rs_attempt": 1}),
        lite("[sandbox:fail] broken", metadata={"rs_turn": "b", "rs_attempt": 1}),
        lite("[sandbox:slow=60] busy", metadata={"rs_turn": "c", "rs_attempt": 2}),
    ])
    done, broken, busy = added.run_ids
    await client.task_run.result(done, api_timeout=DEADLINE_S)
    await control.post(f"/_sandbox/runs/{broken}/fail")

    everything = await listing(client, group.task_group_id)
    assert [event.run.run_id for event in everything] == added.run_ids  # in the order added
    assert [event.event_id for event in everything] == ["1", "2", "3"]
    assert [event.run.status for event in everything] == ["completed", "failed", "running"]
    assert all(event.input is None and event.output is None for event in everything)
    by_turn = {(e.run.metadata or {}).get("rs_turn"): e.run.run_id for e in everything}
    assert by_turn == {"a": done, "b": broken, "c": busy}  # how a lost create's run is found

    full = await listing(client, group.task_group_id, include_input=True, include_output=True)
    assert [event.input.input for event in full if event.input] == [
        "done", "[sandbox:fail] broken", "[sandbox:slow=60] busy"
    ]
    assert full[0].output is not None and full[0].output.content.startswith('Answer to "done"')
    assert full[1].output is None and full[2].output is None  # only a completed run has one

    for status, expected in (("completed", [done]), ("failed", [broken]), ("running", [busy])):
        found = await listing(client, group.task_group_id, status=status)
        assert [event.run.run_id for event in found] == expected
    assert await listing(client, group.task_group_id, status="queued") == []

    more = await client.task_group.add_runs(group.task_group_id, inputs=[lite("later")])
    resumed = await listing(client, group.task_group_id, last_event_id=more.run_cursor)
    assert [event.run.run_id for event in resumed] == more.run_ids
    after_first = await listing(client, group.task_group_id, last_event_id="1")
    assert [event.run.run_id for event in after_first] == [broken, busy, *more.run_ids]
    with pytest.raises(parallel.UnprocessableEntityError):
        await listing(client, group.task_group_id, status="lost")  # type: ignore[arg-type]  # an invalid status, on purpose


async def test_a_bad_input_creates_nothing(
    client: AsyncParallel, control: httpx.AsyncClient
) -> None:
    group = await client.task_group.create()
    batch = await client.task_group.add_runs(
        group.task_group_id, inputs=[lite(f"q{i}") for i in range(1000)]
    )
    assert len(batch.run_ids) == len(set(batch.run_ids)) == 1000
    assert ended(await events(client, group.task_group_id)) == dict.fromkeys(
        batch.run_ids, "completed"
    )
    await control.post("/_sandbox/reset")
    group = await client.task_group.create()
    bad_batches: list[tuple[list[Any], type[Exception]]] = [
        ([lite(f"q{i}") for i in range(1001)], parallel.UnprocessableEntityError),
        ([lite("ok"), lite("bad", metadata={"a key longer than 16": "x"})],
         parallel.UnprocessableEntityError),
        ([lite("ok"), {"input": "q", "processor": "nonsense"}], parallel.PermissionDeniedError),
        ([lite("ok"), {"processor": "lite"}], parallel.UnprocessableEntityError),
    ]
    for inputs, error in bad_batches:
        with pytest.raises(error):
            await client.task_group.add_runs(group.task_group_id, inputs=inputs)
    bad_spec: Any = {"output_schema": 3}
    with pytest.raises(parallel.UnprocessableEntityError) as info:
        await client.task_group.add_runs(
            group.task_group_id, inputs=[lite("ok")], default_task_spec=bad_spec
        )
    [error] = info.value.body["error"]["detail"]["errors"]  # type: ignore[index]  # the SDK types an error's body as object
    assert error["loc"] == ["body", "default_task_spec.output_schema"]
    with pytest.raises(parallel.UnprocessableEntityError) as info:
        await client.task_group.add_runs(
            group.task_group_id, inputs=[lite("ok"), lite("bad", metadata={"k": "v" * 513})]
        )
    [error] = info.value.body["error"]["detail"]["errors"]  # type: ignore[index]  # the SDK types an error's body as object
    assert error["loc"] == ["body", "inputs", 1, "metadata"]
    with pytest.raises(parallel.NotFoundError):
        await client.task_group.add_runs("tgrp_unknown", inputs=[lite("q")])
    await control.patch("/_sandbox/config", json={"strict_interactions": True})
    try:
        with pytest.raises(parallel.UnprocessableEntityError):
            await client.task_group.add_runs(group.task_group_id, inputs=[
                lite("ok"), lite("chained", previous_interaction_id="intr_unknown")
            ])
    finally:
        await control.patch("/_sandbox/config", json={"strict_interactions": False})
    assert (await control.get("/_sandbox/runs")).json()["data"] == []
    status = (await client.task_group.retrieve(group.task_group_id)).status
    assert status.num_task_runs == 0


async def test_create_faults_apply_to_add_runs(
    client: AsyncParallel, control: httpx.AsyncClient
) -> None:
    group = await client.task_group.create()
    await control.post("/_sandbox/faults", json={"create_status": 402, "create_status_count": 1})
    with pytest.raises(parallel.APIStatusError) as info:
        await client.task_group.add_runs(group.task_group_id, inputs=[lite("q")])
    assert info.value.status_code == 402
    assert (await control.get("/_sandbox/runs")).json()["data"] == []

    drops = {"error_rate": 1.0, "error_kinds": ["drop_after_create"]}
    await control.post("/_sandbox/faults", json=drops)
    with pytest.raises(parallel.APIConnectionError):  # the runs exist; the answer is lost
        await client.task_group.add_runs(
            group.task_group_id, inputs=[lite("lost", metadata={"rs_turn": "x"})]
        )
    with pytest.raises(parallel.APIConnectionError):  # elsewhere it is a plain drop
        await client.task_group.retrieve(group.task_group_id)
    await control.delete("/_sandbox/faults")
    [found] = await listing(client, group.task_group_id)
    assert found.run.metadata == {"rs_turn": "x"} and found.run.task_group_id == group.task_group_id
    calls = (await control.get("/_sandbox/calls")).json()["data"]
    add_calls = [c for c in calls if c["method"] == "POST" and c["path"].endswith("/runs")]
    assert [c["fault"] for c in add_calls] == ["402", "drop_after_create"]
    assert add_calls[1]["run_ids"] == [found.run.run_id]

    await control.post("/_sandbox/faults", json={"error_rate": 1.0, "error_kinds": ["503"]})
    with pytest.raises(parallel.InternalServerError):
        await events(client, group.task_group_id)
    await control.post("/_sandbox/faults", json={"fail_runs": True})
    await events(client, group.task_group_id)  # until the lost run has ended
    failing = await client.task_group.add_runs(group.task_group_id, inputs=[lite("q")])
    later = await events(client, group.task_group_id, last_event_id=failing.event_cursor)
    assert ended(later) == {failing.run_ids[0]: "failed"}


async def test_group_runs_send_their_webhooks(client: AsyncParallel, receiver: Any) -> None:
    group = await client.task_group.create()
    hook = {"url": receiver.url, "event_types": ["task_run.status"]}
    added = await client.task_group.add_runs(
        group.task_group_id, inputs=[lite("notify", webhook=hook)], betas=["webhook-2025-08-12"]
    )
    assert await asyncio.to_thread(receiver.wait_for, 1, DEADLINE_S)
    data = TaskRun.model_validate(receiver.payloads()[0]["data"], strict=True)
    assert data.run_id == added.run_ids[0] and data.task_group_id == group.task_group_id


async def test_off_the_group_routes_answer_404_like_unknown_routes() -> None:
    with SandboxServer(SandboxConfig(task_groups=False, default_latency_s=0.1)) as server:
        client = AsyncParallel(
            api_key="k", base_url=server.url, _strict_response_validation=True, max_retries=0
        )
        calls = [
            client.task_group.create(),
            client.task_group.retrieve("tgrp_x"),
            client.task_group.add_runs("tgrp_x", inputs=[lite("q")]),
            client.task_group.events("tgrp_x"),
            client.task_group.get_runs("tgrp_x"),
            client.task_group.retrieve_run("trun_x", task_group_id="tgrp_x"),
        ]
        for call in calls:
            with pytest.raises(parallel.NotFoundError) as info:
                await call
            assert info.value.body["error"]["message"] == "Not Found"  # type: ignore[index]  # the SDK types an error's body as object
        async with httpx.AsyncClient(base_url=server.url, headers={"x-api-key": "k"}) as raw:
            unknown = await raw.get("/v1/tasks/nothing-here")
            off = await raw.post("/v1beta/tasks/groups", json={})
        assert unknown.status_code == off.status_code == 404
        assert unknown.json()["error"]["message"] == off.json()["error"]["message"]
        run = await client.task_run.create(input="q", processor="lite")  # single runs still work
        result = await client.task_run.result(run.run_id, api_timeout=DEADLINE_S)
        assert result.run.status == "completed" and result.run.task_group_id is None


async def test_the_setting_reads_on_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_TASK_GROUPS", raising=False)
    assert SandboxConfig.from_env().task_groups is True
    monkeypatch.setenv("SANDBOX_TASK_GROUPS", "off")
    assert SandboxConfig.from_env().task_groups is False
    monkeypatch.setenv("SANDBOX_TASK_GROUPS", "maybe")
    with pytest.raises(ValueError, match="SANDBOX_TASK_GROUPS"):
        SandboxConfig.from_env()
