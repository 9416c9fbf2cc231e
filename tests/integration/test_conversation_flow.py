"""The research loop end to end: HTTP API, arq worker, Postgres, the sandbox over HTTP.

Every test here runs twice in each suite run: against the session's sandbox (task groups, unless
TEST_TASK_GROUPS=off) and against one whose group routes answer 404, as a Parallel without task
groups would, so that the worker's one-by-one fallback (PARALLEL_TASK_GROUPS=auto) runs the same
flows."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import httpx
import pytest

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests.helpers import create_conversation, post_turn, sandbox_runs, set_faults, wait_turn


@pytest.fixture(scope="module")
def groupless_server() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig(default_latency_s=0.3, queued_s=0.05,
                                     task_groups=False)) as server:
        yield server


@pytest.fixture(params=["session sandbox", "no task groups"])
def sandbox(request, sandbox_server: SandboxServer) -> Iterator[SandboxServer]:
    server = (sandbox_server if request.param == "session sandbox"
              else request.getfixturevalue("groupless_server"))
    yield server
    httpx.delete(f"{server.url}/_sandbox/faults")

QUESTIONS = [
    "Which country won the most Winter Olympics gold medals in 2026?",
    "How many medals did they win?",
    "How does that compare to the second place country?",
]


async def test_three_turn_session_chains_each_turn_to_the_one_before(api, worker, sandbox):
    conversation = await create_conversation(api, title="Winter Olympics 2026")
    posted = [await post_turn(api, conversation["id"], q) for q in QUESTIONS]
    assert [t["seq"] for t in posted] == [1, 2, 3]
    assert [t["status"] for t in posted] == ["queued"] * 3

    done = [await wait_turn(api, t) for t in posted]

    assert [t["status"] for t in done] == ["completed"] * 3
    first, second, third = done
    assert first["previous_interaction_id"] is None
    assert second["previous_interaction_id"] == first["interaction_id"]
    assert third["previous_interaction_id"] == second["interaction_id"]
    # What Parallel was actually sent, as the sandbox recorded it.
    runs = {t["id"]: sandbox_runs(sandbox.url, t["id"]) for t in done}
    assert all(len(r) == 1 for r in runs.values())
    # In a task group when the sandbox has them (the worker's default, auto), else one by one.
    in_groups = {r[0]["taskgroup_id"] is not None for r in runs.values()}
    assert in_groups == {sandbox.config.task_groups}
    assert runs[second["id"]][0]["previous_interaction_id"] == first["interaction_id"]
    assert runs[third["id"]][0]["previous_interaction_id"] == second["interaction_id"]
    assert first["interaction_id"] != first["run_id"]  # chained by interaction, not run id
    # The sandbox's answer names the questions it builds on: context really was passed.
    assert third["output"]["type"] == "text"
    assert QUESTIONS[0] in third["output"]["content"]
    assert QUESTIONS[1] in third["output"]["content"]
    assert third["basis"] and third["basis"][0]["citations"]
    assert third["completed_at"] >= third["started_at"] >= third["created_at"]


async def test_ten_questions_posted_at_once_run_one_at_a_time_in_order(api, worker, sandbox):
    conversation = await create_conversation(api)
    posted = await asyncio.gather(
        *(post_turn(api, conversation["id"], f"Question number {i}") for i in range(10))
    )
    done = sorted([await wait_turn(api, t, timeout_s=60) for t in posted], key=lambda t: t["seq"])

    assert [t["seq"] for t in done] == list(range(1, 11))
    assert all(t["status"] == "completed" for t in done)
    for before, after in itertools.pairwise(done):
        assert after["previous_interaction_id"] == before["interaction_id"]
        # One at a time: a turn starts only once the one before it has finished.
        assert after["started_at"] >= before["completed_at"]


async def test_conversations_run_concurrently(api, worker, sandbox):
    set_faults(sandbox.url)  # none
    conversations = [await create_conversation(api) for _ in range(5)]
    posted = [await post_turn(api, c["id"], "[sandbox:slow=1.5] a slow question")
              for c in conversations]
    done = [await wait_turn(api, t) for t in posted]
    assert all(t["status"] == "completed" for t in done)
    starts = sorted(t["started_at"] for t in done)
    ends = sorted(t["completed_at"] for t in done)
    # Had they run one after another, the last would start after the first ended.
    assert starts[-1] < ends[0]


async def test_a_failed_turn_records_the_error_and_the_next_chains_past_it(api, worker, sandbox):
    conversation = await create_conversation(api)
    first = await wait_turn(api, await post_turn(api, conversation["id"], "A good question"))
    failed = await wait_turn(api, await post_turn(api, conversation["id"], "[sandbox:fail] doomed"))
    third = await wait_turn(api, await post_turn(api, conversation["id"], "And then?"))

    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "run_failed"
    assert failed["error"]["message"]
    assert failed["output"] is None
    assert third["status"] == "completed"
    assert third["previous_interaction_id"] == first["interaction_id"]


async def test_a_branch_chains_to_its_parent_turns_interaction(api, worker, sandbox):
    conversation = await create_conversation(api)
    turns = [await wait_turn(api, await post_turn(api, conversation["id"], q)) for q in QUESTIONS]
    branch = await wait_turn(api, await post_turn(
        api, conversation["id"], "What about Summer 2024?", parent_turn_id=turns[0]["id"]))

    assert branch["status"] == "completed"
    assert branch["seq"] == 4
    assert branch["parent_turn_id"] == turns[0]["id"]
    assert branch["previous_interaction_id"] == turns[0]["interaction_id"]
    assert QUESTIONS[0] in branch["output"]["content"]
    assert QUESTIONS[2] not in branch["output"]["content"]


async def test_json_output_schema_gets_a_json_object(api, worker, sandbox):
    conversation = await create_conversation(api)
    schema = {"type": "object", "properties": {"country": {"type": "string"},
                                               "golds": {"type": "integer"}},
              "required": ["country", "golds"]}
    turn = await wait_turn(api, await post_turn(
        api, conversation["id"], "Who won?", output_schema={"type": "json", "json_schema": schema}))
    assert turn["status"] == "completed"
    assert turn["output"]["type"] == "json"
    assert isinstance(turn["output"]["content"]["country"], str)
    assert isinstance(turn["output"]["content"]["golds"], int)
    run = sandbox_runs(sandbox.url, turn["id"])[0]
    assert run["task_spec"]["output_schema"] == {"type": "json", "json_schema": schema}
