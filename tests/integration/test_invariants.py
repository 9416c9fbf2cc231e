"""Core invariants, each reached through the code path that really races, deterministically.

Each test here was checked by breaking the invariant it guards by hand (see the test's
docstring for the mutation) and seeing it fail. The interleavings are made, not waited for:
a check is given a Parallel client whose call runs the competing step (a cancel, a webhook)
after the real answer is in hand and before the check goes on; the outbox is checked by a
deferred trigger that looks at the terminal transaction as it commits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
import pytest

from service import queue as jobs_queue
from service.clients.parallel import ParallelClient
from service.db import turns as turn_db
from service.devstack import free_port
from service.domain import runs, starts
from tests.helpers import (
    create_conversation,
    post_turn,
    running_worker,
    sandbox_runs,
    wait_turn,
    wait_until,
)
from tests.receivers import Receiver, serve
from worker import jobs
from worker.follower import Follower

TERMINAL_EVENTS = ("turn.completed", "turn.failed", "turn.cancelled")


class ThenParallel:
    """The real Parallel client, except that after the real answer to `method` is in hand (and
    before the caller sees it) `then()` runs once: the competing step of a race, made to happen
    exactly there."""

    def __init__(self, parallel: ParallelClient, method: str, then: Callable[[], Awaitable[None]]):
        self._parallel = parallel
        self._method = method
        self._then: Callable[[], Awaitable[None]] | None = then
        self.fired = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._parallel, name)
        if name != self._method:
            return real

        async def call(*args: Any, **kwargs: Any) -> Any:
            answer = await real(*args, **kwargs)
            if self._then is not None:
                then, self._then = self._then, None
                await then()
                self.fired += 1
            return answer

        return call


class Waker:
    """What the webhook job wakes when it makes a check due (the follower, elsewhere)."""

    woken = 0

    def wake(self) -> None:
        self.woken += 1


@pytest.fixture
async def receiver():
    receiver = Receiver()
    async with serve(receiver) as url:
        receiver.url = f"{url}/hooks/research"
        yield receiver


async def start(resources, turn: dict[str, Any]) -> str:
    """Run the turn's start as its start job does (the worker's own job function is not used so
    the test needs no queue consumer and sees what the start decided)."""
    return await starts.start_turn(resources.pool, resources.parallel, resources.queue,
                                   resources.settings, turn["id"])


def turn_path(turn: dict[str, Any]) -> str:
    return f"/v1/conversations/{turn['conversation_id']}/turns/{turn['id']}"


async def get_turn(api, turn: dict[str, Any]) -> dict[str, Any]:
    response = await api.get(turn_path(turn))
    assert response.status_code == 200, response.text
    return response.json()


async def event_types(api, conversation_id: str) -> list[str]:
    response = await api.get(f"/v1/conversations/{conversation_id}/events")
    return [e["type"] for e in response.json()["data"]]


async def delivery_types(api, conversation_id: str) -> list[str]:
    response = await api.get(f"/v1/conversations/{conversation_id}/webhook-deliveries")
    assert response.status_code == 200, response.text
    return sorted(d["event_type"] for d in response.json()["data"])


# 1. Cancel wins over a late result ---------------------------------------------------------


@pytest.mark.parametrize("claimed_by", ["follower", "webhook"])
async def test_a_cancel_committed_while_a_claimed_check_holds_the_result_wins(
    api, resources, sandbox, claimed_by
):
    """The check has claimed the turn and holds Parallel's result when the cancel commits: its
    finish must record nothing, write no event and queue no webhook.

    Mutation: finish_turn's (migration 0014) `AND u.status = ANY(in_from)` removed."""
    conversation = await create_conversation(api, webhook_url=f"http://127.0.0.1:{free_port()}/hook")
    turn = await post_turn(api, conversation["id"], "Done before the cancel lands")
    assert await start(resources, turn) == "started"
    run_id = (await get_turn(api, turn))["run_id"]
    await wait_until(lambda: sandbox_runs(sandbox.url, turn["id"])[0]["status"] == "completed",
                     what="the run to complete upstream")
    lease = resources.settings.check_lease_s
    if claimed_by == "follower":
        [claimed] = await wait_until(lambda: turn_db.claim_due(resources.pool, 10, lease),
                                     what="the turn's check to fall due")
        reported = None
    else:  # the webhook job's claim, after Parallel said the run completed
        claimed = await turn_db.claim_run(resources.pool, run_id, lease)
        reported = "completed"
    assert claimed["id"] == turn["id"]

    async def cancel() -> None:
        response = await api.post(f"{turn_path(turn)}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"

    parallel = ThenParallel(resources.parallel, "result", cancel)
    await runs.check_turn(resources.pool, parallel, resources.queue, resources.settings, claimed,
                          reported_status=reported)

    assert parallel.fired == 1, "the cancel did not commit while the result was in hand"
    final = await get_turn(api, turn)
    assert final["status"] == "cancelled"
    assert final["output"] is None and final["basis"] is None
    assert final["upstream_may_continue"] is True
    assert await event_types(api, conversation["id"]) == [
        "turn.queued", "turn.running", "turn.cancelled"]
    assert await delivery_types(api, conversation["id"]) == ["turn.cancelled"]


# 2. A turn starts only at the head of its conversation -------------------------------------


async def test_a_later_turns_start_waits_while_an_earlier_turn_is_open(api, resources, sandbox):
    """Its start job may run first (a retry, the reconciler, a job enqueued directly): the
    second turn must not start while the first is queued or running.

    Mutation: start_turn's `if head is None or head["id"] != turn_id:` made `if head is None:`."""
    conversation = await create_conversation(api)
    first = await post_turn(api, conversation["id"], "First question")
    second = await post_turn(api, conversation["id"], "Follow-up")

    assert await start(resources, second) == "waiting"  # the first is still queued
    assert await start(resources, first) == "started"
    assert await start(resources, second) == "waiting"  # the first is running
    assert sandbox_runs(sandbox.url, second["id"]) == []
    assert (await get_turn(api, second))["status"] == "queued"

    # Once the first is over, the second is the head and starts.
    assert (await api.post(f"{turn_path(first)}/cancel")).status_code == 200
    assert await start(resources, second) == "started"
    assert len(sandbox_runs(sandbox.url, second["id"])) == 1


async def test_a_start_job_enqueued_early_still_runs_the_turns_in_order(
    api, resources, settings, sandbox
):
    """The same through the worker: the second turn's start job is in the queue beside the
    first's; the second runs after the first, in its context.

    Same mutation as above."""
    conversation = await create_conversation(api)
    first = await post_turn(api, conversation["id"], "[sandbox:slow=1] First question")
    second = await post_turn(api, conversation["id"], "Follow-up")
    assert await jobs_queue.enqueue_start_turn(resources.queue, settings.queue_name, second["id"])
    async with running_worker(settings):
        done_second = await wait_turn(api, second)
    done_first = await get_turn(api, first)
    assert done_first["status"] == done_second["status"] == "completed"
    assert done_second["started_at"] >= done_first["completed_at"]
    assert done_second["previous_interaction_id"] == done_first["interaction_id"]
    [run] = sandbox_runs(sandbox.url, second["id"])
    assert run["previous_interaction_id"] == done_first["interaction_id"]


# 3. The outbox row commits with its terminal status ----------------------------------------

# At the commit of every transaction that writes a terminal event, record whether that
# transaction also holds the event's webhook delivery. A deferred constraint trigger runs at
# commit inside the transaction, so it sees exactly what commits together, with no timing.
OUTBOX_PROBE_SQL = """
CREATE TABLE outbox_probe (
    conversation_id text, sequence bigint, type text, delivery_in_tx boolean
);
CREATE FUNCTION outbox_probe() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox_probe SELECT NEW.conversation_id, NEW.sequence, NEW.type, EXISTS (
        SELECT 1 FROM webhook_delivery d
        WHERE d.conversation_id = NEW.conversation_id AND d.event_sequence = NEW.sequence
    );
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER outbox_probe AFTER INSERT ON event
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.type IN ('turn.completed', 'turn.failed', 'turn.cancelled'))
    EXECUTE FUNCTION outbox_probe();
"""


async def test_each_terminal_status_commits_together_with_its_webhook_delivery(
    api, settings, database_url, receiver
):
    """Completed (the follower's finish), failed (a failed run), cancelled (the API): each
    transaction that records the status also holds the delivery row when it commits.

    Mutation: append_event (migration 0014) no longer queues the delivery; runs.finish queues
    it in its own transaction right after the commit (every webhook is still sent)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(OUTBOX_PROBE_SQL)
    finally:
        await conn.close()
    conversation = await create_conversation(api, webhook_url=receiver.url)
    async with running_worker(settings):
        completed = await wait_turn(api, await post_turn(api, conversation["id"], "Quick one"))
        failed = await wait_turn(api, await post_turn(api, conversation["id"], "[sandbox:fail] no"))
        slow = await post_turn(api, conversation["id"], "[sandbox:slow=30] long research")
        await wait_turn(api, slow, statuses={"running"})
        assert (await api.post(f"{turn_path(slow)}/cancel")).status_code == 200
        requests = await receiver.wait_for(3)
    assert (completed["status"], failed["status"]) == ("completed", "failed")
    assert sorted(msgspec.json.decode(r.body)["type"] for r in requests) == sorted(TERMINAL_EVENTS)

    conn = await asyncpg.connect(database_url)
    try:
        probed = await conn.fetch("SELECT type, delivery_in_tx FROM outbox_probe ORDER BY sequence")
    finally:
        await conn.close()
    assert [(r["type"], r["delivery_in_tx"]) for r in probed] == [
        ("turn.completed", True), ("turn.failed", True), ("turn.cancelled", True)]


# 5. The follower does not push back a check a webhook made due -----------------------------


@pytest.mark.parametrize("checked_by", ["follower", "webhook job"])
async def test_a_webhook_during_a_check_is_not_undone_by_its_reschedule(
    api, resources, sandbox, checked_by
):
    """A webhook makes the run's check due while a check of it is in flight (the run still
    running when asked): the check's reschedule must leave it due, not push it a delay ahead.

    Mutation: `AND t.next_check_at > now()` removed from RESCHEDULE_MANY_SQL (the follower's
    tick), or `AND next_check_at > now()` from RESCHEDULE_SQL (a single check: the webhook job).
    """
    conversation = await create_conversation(api)
    turn = await post_turn(api, conversation["id"], "[sandbox:slow=60] long research")
    assert await start(resources, turn) == "started"
    run_id = (await get_turn(api, turn))["run_id"]
    # Checks after this one come a minute later, so a pushed-back check is plain to see.
    slow_polls = msgspec.structs.replace(resources.settings, poll_initial_s=60.0, poll_max_s=60.0)
    lease = slow_polls.check_lease_s

    async def webhook_says_running() -> None:
        ctx = {"resources": resources, "follower": Waker()}
        assert await jobs.check_turn(ctx, run_id, "running") == turn["id"]
        assert ctx["follower"].woken == 1

    parallel = ThenParallel(resources.parallel, "retrieve", webhook_says_running)
    checking = dataclasses.replace(resources, parallel=parallel, settings=slow_polls)
    if checked_by == "follower":
        follower = Follower(checking)

        async def checked() -> bool:
            await follower.tick()
            return parallel.fired == 1

        assert await wait_until(checked, what="the follower to check the turn")
    else:  # Parallel reported the run failed, but asked, it is still running
        assert await jobs.check_turn({"resources": checking}, run_id, "failed") == turn["id"]
    assert parallel.fired == 1, "the webhook did not arrive during the check"

    assert (await get_turn(api, turn))["status"] == "running"
    due = await turn_db.claim_due(resources.pool, 10, lease)
    assert [row["id"] for row in due] == [turn["id"]], "the webhook's check was pushed back"
