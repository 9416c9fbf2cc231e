"""Crash safety with real processes: SIGKILLed workers, Redis losing everything, Parallel faults.

Every test here checks the same two promises: every turn ends, and each turn has one Parallel run
(counted by the turn id and attempt the worker puts in the run's metadata), save the documented
window: a create whose answer was lost (the worker died or the connection broke after sending it)
makes a second run, and the turn then lists that attempt in `doubtful_attempts`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator

import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis
from parallel import AsyncParallel

from service import metrics
from service.devstack import embedded_redis_unavailable_reason
from tests.helpers import (
    create_conversation,
    post_turn,
    running_worker,
    sandbox_runs,
    set_faults,
    wait_turn,
)
from tests.processes import WorkerProcess
from tests.servers import own_redis_server

pytestmark = pytest.mark.slow


def fast_recovery(settings, **changes):
    """Short leases and timeouts, so recovery after a kill takes seconds, not minutes."""
    return msgspec.structs.replace(
        settings, start_lease_s=8.0, check_lease_s=3.0, job_timeout_s=5, reconcile_interval_s=2,
        poll_initial_s=0.2, poll_max_s=1.0, shutdown_grace_s=5, **changes,
    )


async def post_workload(api, conversations: int, turns_each: int) -> list[list[dict]]:
    convs = [await create_conversation(api) for _ in range(conversations)]
    posted = []
    for c, conv in enumerate(convs):
        posted.append([
            await post_turn(api, conv["id"], f"[sandbox:slow={1 + (c + k) % 3}] conv {c} turn {k}")
            for k in range(turns_each)
        ])
    return posted


async def wait_all_terminal(database_url: str, expected: int, timeout: float) -> dict[str, dict]:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = await conn.fetch(
                "SELECT id, conversation_id, seq, status, run_id, interaction_id, "
                "previous_interaction_id, error, start_attempts, doubtful_attempts FROM turn")
            open_turns = [r for r in rows if r["status"] in ("queued", "running")]
            if len(rows) == expected and not open_turns:
                return {r["id"]: dict(r) for r in rows}
            assert time.monotonic() < deadline, f"{len(open_turns)} turns still open"
            await asyncio.sleep(0.25)
    finally:
        await conn.close()


def assert_chains_and_single_runs(turns: dict[str, dict], sandbox_url: str) -> None:
    assert Counter(t["status"] for t in turns.values()) == {"completed": len(turns)}
    runs: dict[str, list[dict]] = {turn_id: [] for turn_id in turns}
    for run in sandbox_runs(sandbox_url):
        turn_id = (run.get("metadata") or {}).get("rs_turn")
        if turn_id in runs:
            runs[turn_id].append(run)
    for turn_id, turn in turns.items():
        assert_runs_explained(turn, runs[turn_id])
    by_conversation: dict[str, list[dict]] = {}
    for turn in turns.values():
        by_conversation.setdefault(turn["conversation_id"], []).append(turn)
    for chain in by_conversation.values():
        chain.sort(key=lambda t: t["seq"])
        assert chain[0]["previous_interaction_id"] is None
        for before, after in zip(chain, chain[1:], strict=False):
            assert after["previous_interaction_id"] == before["interaction_id"]


def assert_runs_explained(turn: dict, runs: list[dict]) -> None:
    """The turn's recorded run is its last attempt's; any other run is an attempt in doubt's."""
    attempts = Counter(int(run["metadata"]["rs_attempt"]) for run in runs)
    assert all(count == 1 for count in attempts.values()), f"an attempt made two runs: {turn}"
    recorded = [run for run in runs if run["run_id"] == turn["run_id"]]
    assert len(recorded) == 1, f"the turn's run is not at Parallel: {turn}"
    assert int(recorded[0]["metadata"]["rs_attempt"]) == turn["start_attempts"]
    others = set(attempts) - {turn["start_attempts"]}
    assert others <= set(turn["doubtful_attempts"]), f"a second run not in doubt: {turn}, {runs}"


async def fetch_turn(database_url: str, turn_id: str) -> dict:
    conn = await asyncpg.connect(database_url)
    try:
        return dict(await conn.fetchrow(
            "SELECT id, status, run_id, start_attempts, doubtful_attempts FROM turn WHERE id = $1",
            turn_id))
    finally:
        await conn.close()


async def test_sigkilled_workers_lose_nothing_and_pay_once(api, settings, sandbox, database_url):
    settings = fast_recovery(settings)
    posted = await post_workload(api, conversations=20, turns_each=5)
    rng = random.Random(20261126)
    worker = WorkerProcess(settings).start()
    try:
        for _ in range(5):
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            worker.kill()
            worker = WorkerProcess(settings).start()
        turns = await wait_all_terminal(database_url, expected=100, timeout=240)
    finally:
        worker.kill()
    assert len(turns) == sum(len(p) for p in posted)
    assert_chains_and_single_runs(turns, sandbox.url)


@pytest.fixture
def own_redis() -> Iterator[str]:
    """A Redis server of the test's own, so wiping it touches no one else's data."""
    if reason := embedded_redis_unavailable_reason():
        pytest.skip(reason)
    with own_redis_server() as url:
        yield url


async def test_redis_losing_everything_mid_workload_loses_no_turn(
    api, settings, sandbox, database_url, own_redis
):
    settings = fast_recovery(settings, redis_url=own_redis)
    await post_workload(api, conversations=10, turns_each=3)
    with WorkerProcess(settings):
        await asyncio.sleep(2.0)
        client = aioredis.from_url(own_redis)
        await client.flushdb()
        await client.aclose()
        turns = await wait_all_terminal(database_url, expected=30, timeout=120)
    assert_chains_and_single_runs(turns, sandbox.url)


async def test_parallel_failing_a_fifth_of_calls_still_completes_every_turn_once(
    api, settings, sandbox, database_url
):
    settings = fast_recovery(settings)
    set_faults(sandbox.url, error_rate=0.2, error_kinds=["429", "500", "503", "drop"],
               retry_after_s=0.5, seed=5)
    await post_workload(api, conversations=10, turns_each=2)
    with WorkerProcess(settings):
        turns = await wait_all_terminal(database_url, expected=20, timeout=120)
    assert_chains_and_single_runs(turns, sandbox.url)


@pytest.mark.parametrize(
    ("status", "code"),
    [(401, "parallel_unauthorized"), (402, "parallel_payment_required"),
     (403, "parallel_forbidden"), (422, "parallel_invalid_request")],
)
async def test_parallel_refusing_a_run_fails_the_turn_with_a_clear_code(
    api, worker, sandbox, status, code
):
    conversation = await create_conversation(api)
    first = await wait_turn(api, await post_turn(api, conversation["id"], "Works"))
    set_faults(sandbox.url, create_status=status, create_status_count=1)
    refused = await wait_turn(api, await post_turn(api, conversation["id"], "Refused"))
    assert refused["status"] == "failed"
    assert refused["error"]["code"] == code
    assert str(status) in refused["error"]["message"]
    assert refused["run_id"] is None
    after = await wait_turn(api, await post_turn(api, conversation["id"], "Still usable?"))
    assert after["status"] == "completed"
    assert after["previous_interaction_id"] == first["interaction_id"]


async def test_a_run_active_past_its_deadline_fails_as_timeout(api, settings, sandbox, database_url):
    settings = fast_recovery(settings, run_deadline_scale=0.01)  # lite: 120 s → 1.2 s
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "[sandbox:slow=30] endless")
    with WorkerProcess(settings):
        done = await wait_turn(api, turn, timeout=30)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "timeout"
    assert done["upstream_may_continue"] is True


async def test_a_burst_beyond_the_creation_limit_waits_instead_of_failing(
    api, settings, sandbox
):
    while time.time() % 60 > 45:  # keep the test inside one rate-limit minute
        await asyncio.sleep(1)
    settings = fast_recovery(settings, creations_per_min=3)
    convs = [await create_conversation(api) for _ in range(5)]
    turns = [await post_turn(api, c["id"], "burst") for c in convs]
    with WorkerProcess(settings):
        await asyncio.sleep(4)
        statuses = [(await api.get(f"/v1/conversations/{t['conversation_id']}/turns/{t['id']}"))
                    .json()["status"] for t in turns]
    created = [t for t in turns if sandbox_runs(sandbox.url, t["id"])]
    assert len(created) == 3
    assert statuses.count("queued") == 2
    assert "failed" not in statuses


async def test_sigterm_lets_the_worker_stop_cleanly_and_a_new_one_resumes(
    api, settings, sandbox, database_url
):
    settings = fast_recovery(settings)
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "[sandbox:slow=3] resumable")
    worker = WorkerProcess(settings).start()
    await wait_turn(api, turn, statuses={"running"})
    assert worker.terminate(timeout=20) == 0
    running = (await api.get(f"/v1/conversations/{conversation['id']}/turns/{turn['id']}")).json()
    assert running["status"] == "running"
    with WorkerProcess(settings):
        done = await wait_turn(api, turn, timeout=30)
    assert done["status"] == "completed"
    assert done["run_id"] == running["run_id"]  # resumed, not restarted
    assert len(sandbox_runs(sandbox.url, turn["id"])) == 1


async def test_a_create_whose_answer_is_lost_is_retried_and_its_run_marked_in_doubt(
    api, settings, sandbox, database_url
):
    counted = metrics.CREATE_IN_DOUBT.labels("connection")._value.get()
    set_faults(sandbox.url, error_rate=1.0, error_kinds=["drop_after_create"])
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "the answer to this create is lost")
    async with running_worker(fast_recovery(settings)):
        for _ in range(200):
            if sandbox_runs(sandbox.url, turn["id"]):
                break
            await asyncio.sleep(0.05)
        set_faults(sandbox.url)  # Parallel answers again
        done = await wait_turn(api, turn, timeout=60)
    assert done["status"] == "completed"
    row = await fetch_turn(database_url, turn["id"])
    runs = sandbox_runs(sandbox.url, turn["id"])
    assert len(row["doubtful_attempts"]) >= 1
    assert len(runs) == len(row["doubtful_attempts"]) + 1
    assert_runs_explained(row, runs)
    assert done["run_id"] == row["run_id"]
    assert metrics.CREATE_IN_DOUBT.labels("connection")._value.get() - counted == len(
        row["doubtful_attempts"])


async def test_an_attempt_that_never_came_back_is_marked_in_doubt_by_the_next(
    api, settings, sandbox, database_url
):
    counted = metrics.CREATE_IN_DOUBT.labels("attempt_lost")._value.get()
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "the first worker dies mid-create")
    # What a worker killed after Parallel made its run leaves behind: the attempt begun in
    # Postgres (its lease long over), the run at Parallel, no run id stored.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE turn SET start_attempts = 1, start_attempt_at = now() - interval '1 hour' "
            "WHERE id = $1", turn["id"])
    finally:
        await conn.close()
    async with AsyncParallel(
        api_key=settings.parallel_api_key, base_url=settings.parallel_base_url
    ) as client:
        orphan = await client.task_run.create(
            input=turn["input"], processor=turn["processor"],
            metadata={"rs_turn": turn["id"], "rs_attempt": "1"})
    async with running_worker(fast_recovery(settings)):
        done = await wait_turn(api, turn, timeout=60)
    assert done["status"] == "completed"
    assert done["run_id"] != orphan.run_id
    row = await fetch_turn(database_url, turn["id"])
    assert row["start_attempts"] == 2
    assert row["doubtful_attempts"] == [1]
    assert_runs_explained(row, sandbox_runs(sandbox.url, turn["id"]))
    assert metrics.CREATE_IN_DOUBT.labels("attempt_lost")._value.get() - counted == 1
