"""Start attempts are fenced: a stale attempt (its lease ran out and a newer one began) changes
nothing of the newer attempt's state, and the run it made is kept as an extra run, with its id.

Each write of an attempt is driven here by hand against real Postgres, in the order a frozen
worker would make it, so every fence is checked deterministically.
"""

from __future__ import annotations

import asyncpg
import pytest

from service.db import attempts
from service.resources import Resources
from tests.helpers import create_conversation, post_turn

LEASE_S = 30.0


async def attempt_row(pool: asyncpg.Pool, turn_id: str) -> dict:
    return dict(await pool.fetchrow(
        "SELECT status, run_id, interaction_id, error, start_attempts, start_attempt_at, "
        "doubtful_attempts FROM turn WHERE id = $1", turn_id))


async def begin(pool: asyncpg.Pool, turn_id: str, after: int) -> int | None:
    async with pool.acquire() as conn, conn.transaction():
        return await attempts.begin_start(conn, turn_id, None, after, LEASE_S)


async def expire_lease(pool: asyncpg.Pool, turn_id: str) -> None:
    """What time does to a lease whose attempt froze: it runs out."""
    await pool.execute(
        "UPDATE turn SET start_attempt_at = start_attempt_at - interval '1 hour' WHERE id = $1",
        turn_id)


@pytest.fixture
async def taken_over(api, resources: Resources) -> str:
    """A queued turn whose attempt 1 froze, its lease ran out, and attempt 2 began (live)."""
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "Who holds the lease?")
    assert await begin(resources.pool, turn["id"], after=0) == 1
    await expire_lease(resources.pool, turn["id"])
    assert await begin(resources.pool, turn["id"], after=1) == 2
    return turn["id"]


async def test_a_stale_attempts_run_is_kept_as_an_extra_run_and_the_turn_is_untouched(
    resources: Resources, taken_over: str
):
    pool = resources.pool
    before = await attempt_row(pool, taken_over)
    assert before["doubtful_attempts"] == [1]  # attempt 2 found attempt 1 lost
    async with pool.acquire() as conn:
        stale = await attempts.record_run(conn, taken_over, 1, "trun_stale", "trun_stale", 1.0)
    assert stale.turn is None and stale.extra
    assert await attempt_row(pool, taken_over) == before  # attempt 2 still owns a queued turn
    extra = await attempts.extra_runs(pool, taken_over)
    assert [(r["attempt"], r["run_id"], r["interaction_id"]) for r in extra] == [
        (1, "trun_stale", "trun_stale")]

    async with pool.acquire() as conn:
        owner = await attempts.record_run(conn, taken_over, 2, "trun_owner", "trun_owner", 1.0)
    assert owner.turn is not None and owner.turn.status == "running"
    assert owner.turn.run_id == "trun_owner"
    assert len(await attempts.extra_runs(pool, taken_over)) == 1


async def test_a_stale_attempts_late_answer_after_the_newer_recorded_is_an_extra_run(
    resources: Resources, taken_over: str
):
    pool = resources.pool
    async with pool.acquire() as conn:
        await attempts.record_run(conn, taken_over, 2, "trun_owner", "trun_owner", 1.0)
        stale = await attempts.record_run(conn, taken_over, 1, "trun_late", "trun_late", 1.0)
    assert stale.turn is None and stale.extra
    row = await attempt_row(pool, taken_over)
    assert row["run_id"] == "trun_owner" and row["status"] == "running"
    assert [r["run_id"] for r in await attempts.extra_runs(pool, taken_over)] == ["trun_late"]


async def test_a_stale_abandon_keeps_the_newer_attempts_lease(
    resources: Resources, taken_over: str
):
    pool = resources.pool
    before = await attempt_row(pool, taken_over)
    assert await attempts.abandon_start(pool, taken_over, 1, in_doubt=True) is None
    assert await attempts.abandon_start(pool, taken_over, 1, in_doubt=False) is None
    after = await attempt_row(pool, taken_over)
    assert after == before
    assert after["start_attempt_at"] is not None  # nobody may begin attempt 3 yet
    assert await begin(pool, taken_over, after=2) is None

    assert await attempts.abandon_start(pool, taken_over, 2, in_doubt=True) == 2
    row = await attempt_row(pool, taken_over)
    assert row["start_attempt_at"] is None and row["doubtful_attempts"] == [1, 2]


async def test_a_stale_attempt_cannot_fail_the_turn(resources: Resources, taken_over: str):
    pool = resources.pool
    error = {"code": "parallel_invalid_request", "message": "refused"}
    async with pool.acquire() as conn:
        assert await attempts.fail_start(conn, taken_over, 1, error) is None
    assert (await attempt_row(pool, taken_over))["status"] == "queued"
    async with pool.acquire() as conn:
        failed = await attempts.fail_start(conn, taken_over, 2, error)
    assert failed is not None and failed.status == "failed"


async def test_no_attempt_begins_while_another_holds_a_live_lease(
    resources: Resources, taken_over: str
):
    pool = resources.pool
    assert await begin(pool, taken_over, after=2) is None  # attempt 2's lease is live
    assert await begin(pool, taken_over, after=1) is None  # and attempt 1 is no longer newest
    await expire_lease(pool, taken_over)
    assert await begin(pool, taken_over, after=1) is None  # a stale retry begins nothing
    assert await begin(pool, taken_over, after=2) == 3
    assert (await attempt_row(pool, taken_over))["doubtful_attempts"] == [1, 2]


async def test_a_lost_attempt_given_up_for_cannot_record_its_run_later(
    resources: Resources, taken_over: str
):
    # What the next start job does when attempt 2 never came back and the turn has had too
    # many creates in doubt: it ends attempt 2 in doubt (and fails the turn).
    pool = resources.pool
    assert await attempts.abandon_start(pool, taken_over, 2, in_doubt=True) == 2
    async with pool.acquire() as conn:
        late = await attempts.record_run(conn, taken_over, 2, "trun_after", "trun_after", 1.0)
    assert late.turn is None and late.extra
    assert (await attempt_row(pool, taken_over))["run_id"] is None
