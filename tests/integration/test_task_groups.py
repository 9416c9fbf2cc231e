"""Group mode (PARALLEL_TASK_GROUPS): runs added to the service's task groups, several per POST,
followed over the groups' event streams; a lost attempt's run adopted from its group's listing;
the fallback to one-by-one runs where the group routes answer 404. The tests that need the
session sandbox's group routes are skipped with TEST_TASK_GROUPS=off."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterator

import asyncpg
import httpx
import msgspec
import pytest
from parallel import AsyncParallel

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from service import metrics
from service.app import create_app
from service.resources import Resources
from tests.helpers import (
    TASK_GROUPS,
    create_conversation,
    post_turn,
    running_worker,
    sandbox_record,
    sandbox_runs,
    set_faults,
    wait_turn,
    wait_until,
)
from tests.receivers import serve

SANDBOX_SECRET = "sandbox_webhook_secret"  # SandboxConfig.webhook_secret's default


needs_groups = pytest.mark.skipif(not TASK_GROUPS, reason="TEST_TASK_GROUPS=off")


@pytest.fixture(scope="module")
def groupless_sandbox() -> Iterator[SandboxServer]:
    """A sandbox whose group routes answer 404, as a deployment without task groups."""
    with SandboxServer(SandboxConfig(default_latency_s=0.3, queued_s=0.05,
                                     task_groups=False)) as server:
        yield server


def group_calls(calls: list[dict], after: int = 0) -> list[dict]:
    return [c for c in calls[after:] if "/tasks/groups" in c["path"]]


async def calls_since(sandbox_url: str, before: int) -> list[dict]:
    calls = await sandbox_record(sandbox_url, "calls")
    fresh = calls["total"] - before
    return list(calls["data"])[-fresh:] if fresh > 0 else []


@needs_groups
async def test_due_turns_are_added_to_one_group_several_per_post(api, settings, sandbox):
    before = (await sandbox_record(sandbox.url, "calls"))["total"]
    conversations = [await create_conversation(api) for _ in range(12)]
    # Posted before the worker starts: their start jobs are all due at once.
    turns = [await post_turn(api, c["id"], f"question {n}") for n, c in enumerate(conversations)]
    async with running_worker(settings):
        done = [await wait_turn(api, t) for t in turns]
    assert {d["status"] for d in done} == {"completed"}
    runs = [r for t in turns for r in sandbox_runs(sandbox.url, t["id"])]
    assert len(runs) == len(turns)  # one run per turn
    assert len({r["taskgroup_id"] for r in runs}) == 1 and runs[0]["taskgroup_id"]
    calls = await calls_since(sandbox.url, before)
    adds = [c for c in calls if c["method"] == "POST" and c["path"].endswith("/runs")
            and "/groups/" in c["path"]]
    assert sum(len(c["run_ids"]) for c in adds) == len(turns)
    assert len(adds) < len(turns), "no POST carried more than one run"
    creates = [c for c in calls if c["method"] == "POST" and c["path"] == "/v1/tasks/runs"]
    assert creates == []


@needs_groups
async def test_a_run_that_ends_is_seen_on_the_group_stream_without_polling(
    api, settings, sandbox, database_url
):
    """10 s runs without PUBLIC_BASE_URL: the turn completes within a second of the sandbox
    finishing its run, and the service asks for the run's status at most once per turn."""
    settings = msgspec.structs.replace(settings, poll_initial_s=1.0, poll_max_s=30.0)
    before = (await sandbox_record(sandbox.url, "calls"))["total"]
    conversations = [await create_conversation(api) for _ in range(20)]
    async with running_worker(settings):
        turns = [await post_turn(api, c["id"], f"[sandbox:slow=10] q{n}")
                 for n, c in enumerate(conversations)]
        done = [await wait_turn(api, t, timeout_s=60) for t in turns]
    assert {d["status"] for d in done} == {"completed"}
    conn = await asyncpg.connect(database_url)
    try:
        completed = {r["id"]: r["completed_at"].timestamp() for r in await conn.fetch(
            "SELECT id, completed_at FROM turn WHERE id = ANY($1::text[])",
            [t["id"] for t in turns])}
    finally:
        await conn.close()
    lags = []
    for turn in turns:
        (run,) = sandbox_runs(sandbox.url, turn["id"])
        lags.append(completed[turn["id"]] - run["completed_at_unix"])
    p95 = statistics.quantiles(lags, n=20)[-1]
    calls = await calls_since(sandbox.url, before)
    statuses = [c for c in calls if c["method"] == "GET" and c["path"].startswith("/v1/tasks/runs/")
                and c["path"].count("/") == 4]
    print(f"lag p50 {statistics.median(lags):.3f} s, p95 {p95:.3f} s; "
          f"{len(statuses)} status calls for {len(turns)} turns")
    assert p95 <= 1.0
    assert len(statuses) <= len(turns)


@needs_groups
async def test_an_attempt_whose_run_exists_in_its_group_adopts_it(
    api, settings, sandbox, database_url
):
    """What a worker killed after adding a turn's run leaves: the attempt begun (its lease long
    over), its group recorded, the run at Parallel, no run id stored. The next attempt finds the
    run in the group's listing and follows it: one run for the turn."""
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "the first worker dies after its add")
    async with AsyncParallel(api_key=settings.parallel_api_key,
                             base_url=settings.parallel_base_url) as client:
        group = await client.task_group.create()
        added = await client.task_group.add_runs(group.task_group_id, inputs=[{
            "input": turn["input"], "processor": turn["processor"],
            "metadata": {"rs_turn": turn["id"], "rs_attempt": "1"}}])
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO task_group (id) VALUES ($1)", group.task_group_id)
        await conn.execute(
            "UPDATE turn SET start_attempts = 1, start_attempt_at = now() - interval '1 hour', "
            "attempt_groups = jsonb_build_object('1', $2::text) WHERE id = $1",
            turn["id"], group.task_group_id)
    finally:
        await conn.close()
    async with running_worker(settings):
        done = await wait_turn(api, turn, timeout_s=30)
    assert done["status"] == "completed"
    assert done["run_id"] == added.run_ids[0]
    assert len(sandbox_runs(sandbox.url, turn["id"])) == 1


@needs_groups
async def test_a_lost_add_answer_is_resolved_from_the_group_listing(api, settings, sandbox):
    """Every answer is dropped after the sandbox acted, until the turn's run exists: the
    attempt (or the next) finds it in its group rather than paying for another."""
    counted = metrics.CREATE_IN_DOUBT.labels("connection")._value.get()
    conversation = await create_conversation(api)
    async with running_worker(settings):
        first = await wait_turn(api, await post_turn(api, conversation["id"], "makes the group"))
        set_faults(sandbox.url, error_rate=1.0, error_kinds=["drop_after_create"])
        turn = await post_turn(api, conversation["id"], "the answer to this add is lost")
        await wait_until(lambda: sandbox_runs(sandbox.url, turn["id"]), 15, what="the run")
        set_faults(sandbox.url)
        done = await wait_turn(api, turn, timeout_s=60)
    assert done["status"] == "completed"
    (run,) = sandbox_runs(sandbox.url, turn["id"])
    assert done["run_id"] == run["run_id"]
    assert run["taskgroup_id"] == sandbox_runs(sandbox.url, first["id"])[0]["taskgroup_id"]
    # The listing is dropped too while the fault lasts: an attempt that could not look may end
    # in doubt (counted), and the next one adopts the run instead of making another.
    assert metrics.CREATE_IN_DOUBT.labels("connection")._value.get() - counted <= 1


async def test_group_routes_answering_404_fall_back_to_one_by_one_runs_and_say_so_once(
    api, settings, groupless_sandbox, capsys
):
    settings = msgspec.structs.replace(settings, parallel_base_url=groupless_sandbox.url)
    switched = metrics.TASK_GROUPS_FALLBACK.labels("unsupported")._value.get()
    conversations = [await create_conversation(api) for _ in range(3)]
    async with running_worker(settings):
        for conversation in conversations:  # one after the other: each start a fresh decision
            done = await wait_turn(api, await post_turn(api, conversation["id"], "no groups"))
            assert done["status"] == "completed"
            assert done["error"] is None
    runs = [r for r in sandbox_runs(groupless_sandbox.url)
            if (r["metadata"] or {}).get("rs_turn")]
    assert len(runs) == 3 and all(r["taskgroup_id"] is None for r in runs)
    assert metrics.TASK_GROUPS_FALLBACK.labels("unsupported")._value.get() - switched == 1
    assert capsys.readouterr().out.count("task_groups_unavailable_one_by_one") == 1


@needs_groups
async def test_group_streams_answering_404_leave_no_run_to_the_slow_safety_net(
    api, settings, sandbox
):
    # A stand-in (or a Parallel) whose groups take runs but have no event streams: the runs
    # already in a group are polled as one-by-one runs are, not after GROUP_POLL_INITIAL_S
    # (30 minutes) or the group's sweep (5), and the worker's next runs are created one by one.
    switched = metrics.TASK_GROUPS_FALLBACK.labels("unsupported")._value.get()
    set_faults(sandbox.url, group_events_status=404)
    conversation = await create_conversation(api)
    async with running_worker(settings):
        first = await wait_turn(api, await post_turn(api, conversation["id"], "in a group"),
                                timeout_s=20)
        then = await wait_turn(api, await post_turn(api, conversation["id"], "one by one"),
                               timeout_s=20)
    assert settings.group_poll_initial_s >= 1800 and settings.group_sweep_interval_s >= 300
    assert first["status"] == then["status"] == "completed"
    (grouped,) = sandbox_runs(sandbox.url, first["id"])
    (alone,) = sandbox_runs(sandbox.url, then["id"])
    assert grouped["taskgroup_id"] and alone["taskgroup_id"] is None
    assert metrics.TASK_GROUPS_FALLBACK.labels("unsupported")._value.get() - switched == 1


async def test_with_groups_on_a_deployment_without_them_is_an_error_not_a_fallback(
    api, settings, groupless_sandbox
):
    settings = msgspec.structs.replace(settings, parallel_base_url=groupless_sandbox.url,
                                       parallel_task_groups="on")
    before = len(sandbox_runs(groupless_sandbox.url))
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "groups required")
    async with running_worker(settings):
        await asyncio.sleep(3)  # a fallback would have made the run within a second
        current = (await api.get(f"/v1/conversations/{conversation['id']}/turns/{turn['id']}"))
    assert current.json()["status"] == "queued"
    assert len(sandbox_runs(groupless_sandbox.url)) == before


async def test_with_groups_off_no_group_route_is_called(api, settings, sandbox):
    settings = msgspec.structs.replace(settings, parallel_task_groups="off")
    before = (await sandbox_record(sandbox.url, "calls"))["total"]
    conversation = await create_conversation(api)
    async with running_worker(settings):
        done = await wait_turn(api, await post_turn(api, conversation["id"], "one by one"))
    assert done["status"] == "completed"
    assert group_calls(await calls_since(sandbox.url, before)) == []
    (run,) = sandbox_runs(sandbox.url, done["id"])
    assert run["taskgroup_id"] is None


@needs_groups
async def test_push_mode_beside_group_mode_both_report_the_run(settings, api_key, sandbox):
    """With PUBLIC_BASE_URL set too, runs are added to a group and carry Parallel's webhook:
    the webhook is delivered and answered, and the turn completes once, with one run."""
    api_settings = msgspec.structs.replace(settings, parallel_webhook_secret=SANDBOX_SECRET)
    resources = await Resources.open(api_settings, listen=True)
    try:
        async with serve(create_app(api_settings, resources=resources)) as url:
            worker_settings = msgspec.structs.replace(api_settings, public_base_url=url)
            async with running_worker(worker_settings), httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
            ) as push:
                conversation = await create_conversation(push)
                done = await wait_turn(push, await post_turn(push, conversation["id"], "both"))
                await wait_until(lambda: [h for h in httpx.get(
                    f"{sandbox.url}/_sandbox/webhooks").json()["data"]
                    if h["run_id"] == done["run_id"] and h["status_code"] == 204], 10,
                    what="Parallel's webhook, answered")
    finally:
        await resources.close()
    assert done["status"] == "completed"
    (run,) = sandbox_runs(sandbox.url, done["id"])
    assert run["taskgroup_id"] and run["webhook"]["url"] == f"{url}/v1/hooks/parallel"


@needs_groups
async def test_a_run_whose_event_is_lost_is_found_by_the_group_sweep(api, settings, sandbox):
    # The stream never reports the run ended; no per-run poll comes for 30 minutes; the
    # group's listing, read every GROUP_SWEEP_INTERVAL_S, finds it.
    settings = msgspec.structs.replace(settings, group_sweep_interval_s=2.0,
                                       group_stream_timeout_s=1.0)
    assert settings.group_poll_initial_s >= 1800
    set_faults(sandbox.url, group_events_lose_runs=True)
    conversation = await create_conversation(api)
    async with running_worker(settings):
        turn = await wait_turn(api, await post_turn(api, conversation["id"], "lost event"),
                               timeout_s=20)
    assert turn["status"] == "completed"
    (run,) = sandbox_runs(sandbox.url, turn["id"])
    assert run["taskgroup_id"]
    calls = [c for c in (await sandbox_record(sandbox.url, "calls"))["data"]
             if c["path"] == f"/v1/tasks/runs/{run['run_id']}"]
    assert calls == [], "the run was polled, not found by the sweep"
