"""Each transition of service.domain.lifecycle, called directly against real Postgres: the row it
leaves, the event it writes, the webhook delivery (outbox row) beside a terminal event, and the
follow-ups it hands back; then after_commit, with Redis up and down.

A deferred trigger (installed per test) refuses to commit a terminal event whose delivery row is
not in the same transaction, so every terminal transition here also proves it writes the outbox
row in its own transaction.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from service.domain import attempts, followups, lifecycle, usage
from service.domain.followups import NOTHING, FollowUps
from service.errors import Conflict, InvalidInput, NotFound
from service.models import Turn
from service.queue import create_queue
from service.resources import Resources
from tests.helpers import create_conversation
from tests.stoppable import redis_process

OUTBOX_GUARD_SQL = """
CREATE FUNCTION outbox_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM webhook_delivery d WHERE d.conversation_id = NEW.conversation_id
                   AND d.event_sequence = NEW.sequence) THEN
        RAISE EXCEPTION 'terminal event % committed without its webhook delivery', NEW.type;
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER outbox_guard AFTER INSERT ON event
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.type IN ('turn.completed', 'turn.failed', 'turn.cancelled'))
    EXECUTE FUNCTION outbox_guard();
"""

CREATE_IN_DOUBT = {"code": "create_in_doubt"}


@pytest.fixture
async def conversation(api, resources: Resources) -> dict[str, Any]:
    await resources.pool.execute(OUTBOX_GUARD_SQL)
    created = await create_conversation(api, webhook_url="http://127.0.0.1:1025/hook")
    created["tenant_id"] = await resources.pool.fetchval(
        "SELECT tenant_id FROM conversation WHERE id = $1", created["id"])
    return created


def asked(question: str, **fields: Any) -> lifecycle.Asked:
    return lifecycle.Asked(input=question, output_schema={"type": "text"}, metadata={},
                           **{"processor": "lite", **fields})


async def queued(resources: Resources, conversation: dict[str, Any], question: str = "Why?",
                 key: str | None = None, **fields: Any) -> tuple[Any, FollowUps]:
    return await lifecycle.queue_turn(resources.pool, resources.settings,
                                      conversation["tenant_id"], conversation["id"], key,
                                      b"digest", asked(question, **fields))


async def running(resources: Resources, turn_id: str) -> None:
    begun, _ = await attempts.begin_attempt(resources.pool, resources.settings, turn_id)
    assert isinstance(begun, attempts.Begun)
    outcome, _ = await attempts.record_run(resources.pool, begun.turn, begun.number,
                                            f"trun_{turn_id}", f"int_{turn_id}", 60.0)
    assert outcome == "started"


async def row(resources: Resources, turn_id: str) -> dict[str, Any]:
    return dict(await resources.pool.fetchrow(
        "SELECT status, run_id, error, upstream_may_continue, start_attempts, "
        "start_attempt_at IS NOT NULL AS held, doubtful_attempts FROM turn WHERE id = $1",
        turn_id))


async def events(resources: Resources, conversation: dict[str, Any]) -> list[tuple[str, str]]:
    rows = await resources.pool.fetch(
        "SELECT type, turn_id FROM event WHERE conversation_id = $1 ORDER BY sequence",
        conversation["id"])
    return [(r["type"], r["turn_id"]) for r in rows]


async def deliveries(resources: Resources, conversation: dict[str, Any]) -> list[str]:
    rows = await resources.pool.fetch(
        "SELECT event_type FROM webhook_delivery WHERE conversation_id = $1 "
        "ORDER BY event_sequence", conversation["id"])
    return [r["event_type"] for r in rows]


def events_logged(follow_ups: FollowUps) -> list[str]:
    return [line.event for line in follow_ups.logs]


async def expire_lease(resources: Resources, turn_id: str) -> None:
    await resources.pool.execute(
        "UPDATE turn SET start_attempt_at = start_attempt_at - interval '1 hour' WHERE id = $1",
        turn_id)


# queue ----------------------------------------------------------------------------------------


async def test_queue_turn_writes_the_turn_and_its_event_and_starts_only_the_head(
    resources, conversation
):
    first, first_follow = await queued(resources, conversation, "First")
    second, second_follow = await queued(resources, conversation, "Second")
    assert (first.status, first.seq, second.seq, second.parent_turn_id) == (
        "queued", 1, 2, first.id)
    assert first_follow == FollowUps(start=(first.id,), counted=(first,))
    assert second_follow == FollowUps(counted=(second,))  # waits behind the first
    assert await events(resources, conversation) == [
        ("turn.queued", first.id), ("turn.queued", second.id)]
    assert await deliveries(resources, conversation) == []


async def test_queue_turn_replays_a_key_and_starts_the_replayed_head_again(
    resources, conversation
):
    turn, _ = await queued(resources, conversation, key="k1")
    again, follow = await queued(resources, conversation, key="k1")
    assert again.id == turn.id
    assert follow == FollowUps(start=(turn.id,))  # its first enqueue may have been lost
    with pytest.raises(Conflict):
        await lifecycle.queue_turn(resources.pool, resources.settings, conversation["tenant_id"],
                                   conversation["id"], "k1", b"another body", asked("Why?"))
    assert await events(resources, conversation) == [("turn.queued", turn.id)]


async def test_queue_turn_writes_nothing_for_what_the_conversation_refuses(
    api, resources, conversation
):
    """What only the conversation can tell: the one statement writes nothing, and the
    transaction under the lock refuses."""
    other = await create_conversation(api)
    foreign, _ = await lifecycle.queue_turn(resources.pool, resources.settings,
                                            conversation["tenant_id"], other["id"], None, b"d",
                                            asked("Elsewhere"))
    with pytest.raises(InvalidInput, match="parent_turn_id"):
        await queued(resources, conversation, parent_turn_id=foreign.id)
    # Its processor is no longer one the service allows (asked for none: the conversation's).
    narrowed = msgspec.structs.replace(resources.settings, processors=["core"])
    with pytest.raises(InvalidInput, match="processor"):
        await lifecycle.queue_turn(resources.pool, narrowed, conversation["tenant_id"],
                                   conversation["id"], None, b"d", asked("Why?", processor=None))
    with pytest.raises(NotFound):
        await lifecycle.queue_turn(resources.pool, resources.settings, "ten_other",
                                   conversation["id"], None, b"d", asked("Not yours"))
    assert await events(resources, conversation) == []
    assert await resources.pool.fetchval(
        "SELECT turn_count FROM conversation WHERE id = $1", conversation["id"]) == 0


async def test_queue_turn_takes_what_the_request_leaves_out_from_the_conversation(
    resources, conversation
):
    first, _ = await queued(resources, conversation, "First")
    second, _ = await queued(resources, conversation, "Second")
    # The conversation's processor, and a parent other than its last turn.
    branch, _ = await queued(resources, conversation, "Branch", processor=None,
                             parent_turn_id=first.id)
    assert (branch.seq, branch.parent_turn_id, branch.processor) == (
        3, first.id, conversation["processor"])
    assert second.parent_turn_id == first.id
    cost = await resources.pool.fetchval(
        "SELECT estimated_cost_usd FROM turn WHERE id = $1", branch.id)
    assert cost == usage.estimate_cost(conversation["processor"])
    event = await resources.pool.fetchval(
        "SELECT data FROM event WHERE turn_id = $1", branch.id)
    assert msgspec.convert(event, Turn) == branch  # the event carries the turn as written


# start ----------------------------------------------------------------------------------------


async def test_begin_attempt_takes_the_lease_of_the_head_only(resources, conversation):
    first, _ = await queued(resources, conversation, "First")
    second, _ = await queued(resources, conversation, "Second")
    settings = resources.settings
    assert await attempts.begin_attempt(resources.pool, settings, second.id) == (
        "waiting", NOTHING)
    begun, follow = await attempts.begin_attempt(resources.pool, settings, first.id)
    assert isinstance(begun, attempts.Begun) and follow == NOTHING
    assert (begun.number, begun.previous_lost, begun.previous_interaction_id) == (1, False, None)
    assert (await row(resources, first.id))["held"]
    with pytest.raises(attempts.LeaseHeld):
        await attempts.begin_attempt(resources.pool, settings, first.id)
    await expire_lease(resources, first.id)
    begun, follow = await attempts.begin_attempt(resources.pool, settings, first.id)
    assert isinstance(begun, attempts.Begun)
    assert (begun.number, begun.previous_lost) == (2, True)
    assert follow.in_doubt == ("attempt_lost",) and events_logged(follow) == ["create_in_doubt"]
    assert (await row(resources, first.id))["doubtful_attempts"] == [1]
    assert await events(resources, conversation) == [
        ("turn.queued", first.id), ("turn.queued", second.id)]  # an attempt is no event


async def test_begin_attempt_fails_a_turn_with_too_many_creates_in_doubt(
    resources, conversation
):
    first, _ = await queued(resources, conversation, "First")
    second, _ = await queued(resources, conversation, "Second")
    settings = msgspec.structs.replace(resources.settings, max_doubtful_attempts=1)
    assert isinstance((await attempts.begin_attempt(resources.pool, settings, first.id))[0],
                      attempts.Begun)
    await expire_lease(resources, first.id)  # the attempt never came back
    outcome, follow = await attempts.begin_attempt(resources.pool, settings, first.id)
    assert outcome == "create_in_doubt"
    after = await row(resources, first.id)
    assert (after["status"], after["error"]["code"], after["held"]) == (
        "failed", "create_in_doubt", False)
    assert follow.start == (second.id,) and follow.in_doubt == ("attempt_lost",)
    assert [t.status for t in follow.counted] == ["failed"]
    assert (await events(resources, conversation))[-1] == ("turn.failed", first.id)
    assert await deliveries(resources, conversation) == ["turn.failed"]


async def test_record_run_makes_the_turn_running_and_a_stale_attempts_run_an_extra_run(
    resources, conversation
):
    turn, _ = await queued(resources, conversation)
    settings = resources.settings
    stale, _ = await attempts.begin_attempt(resources.pool, settings, turn.id)
    await expire_lease(resources, turn.id)
    owner, _ = await attempts.begin_attempt(resources.pool, settings, turn.id)
    assert isinstance(stale, attempts.Begun) and isinstance(owner, attempts.Begun)

    outcome, follow = await attempts.record_run(resources.pool, stale.turn, stale.number,
                                                 "trun_stale", "int_stale", 60.0)
    assert outcome == "extra-run" and follow.extra_runs == ("stale_attempt",)
    assert (await row(resources, turn.id))["status"] == "queued"

    outcome, follow = await attempts.record_run(resources.pool, owner.turn, owner.number,
                                                 "trun_owner", "int_owner", 60.0)
    assert outcome == "started"
    assert [(t.status, t.run_id) for t in follow.counted] == [("running", "trun_owner")]
    assert follow.start == () and events_logged(follow) == ["run_started"]
    assert (await row(resources, turn.id))["run_id"] == "trun_owner"
    assert (await events(resources, conversation))[-1] == ("turn.running", turn.id)
    assert await deliveries(resources, conversation) == []


async def test_abandon_attempt_frees_the_lease_and_fails_the_turn_at_the_doubt_limit(
    resources, conversation
):
    turn, _ = await queued(resources, conversation)
    settings = msgspec.structs.replace(resources.settings, max_doubtful_attempts=2)
    begun, _ = await attempts.begin_attempt(resources.pool, settings, turn.id)
    assert isinstance(begun, attempts.Begun)
    assert await attempts.abandon_attempt(resources.pool, settings, turn.id, 1,
                                           in_doubt=True) == ("abandoned", NOTHING)
    assert not (await row(resources, turn.id))["held"]
    assert await attempts.abandon_attempt(resources.pool, settings, turn.id, 1,
                                           in_doubt=True) == ("stale", NOTHING)
    begun, _ = await attempts.begin_attempt(resources.pool, settings, turn.id)
    assert isinstance(begun, attempts.Begun) and begun.number == 2
    outcome, follow = await attempts.abandon_attempt(resources.pool, settings, turn.id, 2,
                                                      in_doubt=True)
    assert outcome == "create_in_doubt"
    after = await row(resources, turn.id)
    assert (after["status"], after["error"]["code"], after["doubtful_attempts"]) == (
        "failed", "create_in_doubt", [1, 2])
    assert [t.status for t in follow.counted] == ["failed"]
    assert await deliveries(resources, conversation) == ["turn.failed"]


async def test_fail_attempt_fails_the_queued_turn_for_its_owner_only(resources, conversation):
    first, _ = await queued(resources, conversation, "First")
    second, _ = await queued(resources, conversation, "Second")
    begun, _ = await attempts.begin_attempt(resources.pool, resources.settings, first.id)
    assert isinstance(begun, attempts.Begun)
    error = {"code": "parallel_unauthorized", "message": "no"}
    stale, follow = await attempts.fail_attempt(resources.pool, first.id, begun.number + 1, error)
    assert stale is None and events_logged(follow) == ["late_result_ignored"]
    failed, follow = await attempts.fail_attempt(resources.pool, first.id, begun.number, error)
    assert failed is not None and failed.status == "failed"
    assert msgspec.to_builtins(failed.error) == error
    assert follow.start == (second.id,) and follow.counted == (failed,)
    assert (await events(resources, conversation))[-1] == ("turn.failed", first.id)
    assert await deliveries(resources, conversation) == ["turn.failed"]


# a run's end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("transition", ["complete", "fail", "time_out"])
async def test_a_runs_end_is_recorded_once_with_its_event_and_delivery(
    resources, conversation, transition
):
    first, _ = await queued(resources, conversation, "First")
    second, _ = await queued(resources, conversation, "Second")
    await running(resources, first.id)
    error = {"code": "run_failed", "message": "it failed"}
    ends = {
        "complete": lambda: lifecycle.complete(resources.pool, first.id,
                                               {"type": "text", "content": "42"}, []),
        "fail": lambda: lifecycle.fail(resources.pool, first.id, error),
        "time_out": lambda: lifecycle.time_out(resources.pool, first.id, error),
    }
    ended, follow = await ends[transition]()
    status = "completed" if transition == "complete" else "failed"
    assert ended is not None and ended.status == status
    assert follow.start == (second.id,) and follow.counted == (ended,)
    assert events_logged(follow) == ["turn_finished"]
    after = await row(resources, first.id)
    assert after["status"] == status
    assert after["upstream_may_continue"] is (transition == "time_out")
    assert (await events(resources, conversation))[-1] == (f"turn.{status}", first.id)
    assert await deliveries(resources, conversation) == [f"turn.{status}"]

    again, follow = await ends[transition]()  # a late second answer changes nothing
    assert again is None and follow.start == () and follow.counted == ()
    assert await deliveries(resources, conversation) == [f"turn.{status}"]


# cancel ---------------------------------------------------------------------------------------


async def test_cancel_wins_over_a_late_result_and_starts_the_next_turn(resources, conversation):
    first, _ = await queued(resources, conversation, "First")
    second, _ = await queued(resources, conversation, "Second")
    await running(resources, first.id)
    args = (resources.pool, conversation["tenant_id"], conversation["id"], first.id)
    cancelled, follow = await lifecycle.cancel(*args)
    assert (cancelled.status, cancelled.upstream_may_continue) == ("cancelled", True)
    assert follow.start == (second.id,) and follow.counted == (cancelled,)
    assert await lifecycle.cancel(*args) == (cancelled, NOTHING)  # idempotent

    late, follow = await lifecycle.complete(resources.pool, first.id,
                                            {"type": "text", "content": "late"}, [])
    assert late is None and events_logged(follow) == ["late_result_ignored"]
    assert (await row(resources, first.id))["status"] == "cancelled"
    assert await deliveries(resources, conversation) == ["turn.cancelled"]

    await running(resources, second.id)
    await lifecycle.complete(resources.pool, second.id, {"type": "text", "content": "42"}, [])
    with pytest.raises(Conflict):
        await lifecycle.cancel(resources.pool, conversation["tenant_id"], conversation["id"],
                               second.id)
    with pytest.raises(NotFound):
        await lifecycle.cancel(resources.pool, "ten_other", conversation["id"], second.id)


async def test_cancel_open_turns_cancels_newest_first_and_starts_none(resources, conversation):
    first, _ = await queued(resources, conversation, "First")
    second, _ = await queued(resources, conversation, "Second")
    await running(resources, first.id)
    done, follow = await lifecycle.cancel_open_turns(
        resources.pool, conversation["tenant_id"], conversation["id"])
    assert [(t.id, t.upstream_may_continue) for t in done] == [(second.id, False),
                                                               (first.id, True)]
    assert follow == FollowUps(counted=tuple(done))
    assert (await events(resources, conversation))[-2:] == [
        ("turn.cancelled", second.id), ("turn.cancelled", first.id)]
    assert await deliveries(resources, conversation) == ["turn.cancelled", "turn.cancelled"]


# after commit ---------------------------------------------------------------------------------


async def test_after_commit_enqueues_starts_and_survives_redis_being_down(
    resources, conversation
):
    turn, follow = await queued(resources, conversation)
    settings = resources.settings
    assert await followups.after_commit(follow) == 0  # no queue: left to the reconciler
    assert await followups.after_commit(follow, resources.queue, settings) == 1
    assert await resources.queue.zscore(settings.queue_name, f"start_turn:{turn.id}") is not None
    assert await followups.after_commit(follow, resources.queue, settings) == 0  # deduped

    with redis_process() as server:
        queue = await create_queue(server.url)
        try:
            server.stop()
            assert await followups.after_commit(follow, queue, settings) == 0  # logged, no raise
        finally:
            await queue.aclose()
