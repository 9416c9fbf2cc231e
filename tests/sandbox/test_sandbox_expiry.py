"""Expiring an interaction: by the control call or the `[sandbox:expire]` marker, after which a
create (or a task group's input) naming it as previous_interaction_id is refused, through the
real SDK."""

from __future__ import annotations

from typing import Any

import httpx
import parallel
import pytest
from parallel import AsyncParallel
from parallel.types import TaskRun

pytestmark = pytest.mark.asyncio


async def completed(client: AsyncParallel, question: str, **fields: Any) -> TaskRun:
    run = await client.task_run.create(input=question, processor="lite", **fields)
    return (await client.task_run.result(run.run_id, api_timeout=10)).run


async def test_the_marker_expires_the_interaction_once_its_run_ends(
    client: AsyncParallel, control: httpx.AsyncClient
) -> None:
    first = await completed(client, "Who won? [sandbox:expire]")
    record = (await control.get(f"/_sandbox/runs/{first.run_id}")).json()
    assert record["interaction_expired"] is True
    with pytest.raises(parallel.UnprocessableEntityError) as info:
        await client.task_run.create(input="And then?", processor="lite",
                                     previous_interaction_id=first.interaction_id)
    body = info.value.body
    assert body["error"]["message"] == "Expired previous_interaction_id"  # type: ignore[index]  # the SDK types an error's body as object
    [error] = body["error"]["detail"]["errors"]  # type: ignore[index]  # the SDK types an error's body as object
    assert error["loc"] == ["body", "previous_interaction_id"]
    # Nothing was made; the run itself still answers, and a create without the chain works.
    assert len((await control.get("/_sandbox/runs")).json()["data"]) == 1
    assert (await client.task_run.retrieve(first.run_id)).status == "completed"
    assert (await completed(client, "And then?")).status == "completed"


async def test_a_run_still_going_expires_only_when_it_ends(
    client: AsyncParallel, control: httpx.AsyncClient
) -> None:
    run = await client.task_run.create(input="[sandbox:slow=30] [sandbox:expire] q",
                                       processor="lite")
    path = f"/_sandbox/runs/{run.run_id}"
    assert (await control.get(path)).json()["interaction_expired"] is False
    await control.post(f"{path}/complete")
    assert (await control.get(path)).json()["interaction_expired"] is True


async def test_the_control_call_expires_an_interaction_now(
    client: AsyncParallel, control: httpx.AsyncClient
) -> None:
    first = await completed(client, "Who won?")
    chained = await completed(client, "And then?", previous_interaction_id=first.interaction_id)
    assert chained.status == "completed"
    expired = await control.post(f"/_sandbox/interactions/{first.interaction_id}/expire")
    assert expired.status_code == 200
    assert expired.json() == {"interaction_id": first.interaction_id, "run_id": first.run_id,
                              "expired": True}
    with pytest.raises(parallel.UnprocessableEntityError):
        await client.task_run.create(input="Once more?", processor="lite",
                                     previous_interaction_id=first.interaction_id)
    # Only that interaction: the one chained to it before is still accepted.
    later = await completed(client, "Later?", previous_interaction_id=chained.interaction_id)
    assert later.status == "completed"
    unknown = await control.post("/_sandbox/interactions/intr_nobody/expire")
    assert unknown.status_code == 404


async def test_the_refusal_status_is_configurable_and_applies_to_task_groups(
    client: AsyncParallel, control: httpx.AsyncClient
) -> None:
    first = await completed(client, "Who won?")
    await control.post(f"/_sandbox/interactions/{first.interaction_id}/expire")
    assert (await control.patch("/_sandbox/config",
                                json={"expired_interaction_status": 200})).status_code == 422
    await control.patch("/_sandbox/config", json={"expired_interaction_status": 404})
    try:
        with pytest.raises(parallel.NotFoundError):
            await client.task_run.create(input="And then?", processor="lite",
                                         previous_interaction_id=first.interaction_id)
        group = await client.task_group.create()
        with pytest.raises(parallel.NotFoundError) as info:
            await client.task_group.add_runs(group.task_group_id, inputs=[
                {"input": "ok", "processor": "lite"},
                {"input": "chained", "processor": "lite",
                 "previous_interaction_id": first.interaction_id},
            ])
        [error] = info.value.body["error"]["detail"]["errors"]  # type: ignore[index]  # the SDK types an error's body as object
        assert error["loc"] == ["body", "inputs", 1, "previous_interaction_id"]
    finally:
        await control.patch("/_sandbox/config", json={"expired_interaction_status": 422})
    assert len((await control.get("/_sandbox/runs")).json()["data"]) == 1  # only the first
