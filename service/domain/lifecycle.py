"""The turn lifecycle: every change of a turn's state, each one transition in one transaction.

Every transition locks in one order (the conversation row first, then the turn: no deadlocks),
runs its guarded UPDATE (a turn that has ended changes no more, so whichever end commits first
wins: a cancel wins over a late result), and writes its event in the same transaction (a
terminal event also writes its webhook delivery there: service.db.events). The worker's
transitions (a start attempt, its run stored, the run's end) are one statement each: plpgsql
functions of migration 0014 that do the same and commit on their own. What must happen once a
transition has committed (start the conversation's next turn, count the transition, log) it
returns as FollowUps, which service.domain.followups.after_commit runs.

    queued --begin_attempt/record_run--> running --complete | fail | time_out--> ended
    queued --fail_attempt | abandon_attempt | begin_attempt (too many in doubt)--> failed
    (the start attempt's transitions are in service.domain.attempts)
    queued | running --cancel | cancel_open_turns | queue_turn (if_busy interrupt)--> cancelled
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import msgspec
import structlog

from service.config import Settings
from service.db import conversations as conversation_db
from service.db import events as event_db
from service.db import new_turns
from service.db import turns as turn_db
from service.db.pool import DB_UNAVAILABLE
from service.domain import usage
from service.domain.followups import NOTHING, Ended, FollowUps, LogLine, transaction
from service.domain.validation import check_processor
from service.errors import Conflict, ConversationBusy, InvalidInput, NotFound
from service.models import Turn
from service.schemas import IfBusy

log = structlog.get_logger(__name__)


def _start_head(head: tuple[str, str] | None) -> FollowUps:
    """Start the conversation's oldest open turn, (id, status), once this commits, if it waits
    for a worker."""
    if head is None or head[1] != "queued":
        return NOTHING
    return FollowUps(start=(head[0],))


async def _lock_conversation(
    conn: asyncpg.Connection, tenant_id: str, conversation_id: str
) -> asyncpg.Record:
    conversation = await conversation_db.lock_conversation(conn, tenant_id, conversation_id)
    if conversation is None:
        raise NotFound(f"Conversation {conversation_id!r} not found.")
    return conversation


# queue ----------------------------------------------------------------------------------------

class Asked(msgspec.Struct, frozen=True, kw_only=True):
    """A new turn as its request asks for it, checked but for what its conversation gives: its
    seq, its parent when `parent_turn_id` is None (the conversation's last turn) and its
    processor when `processor` is None (the conversation's)."""

    input: Any
    output_schema: Any
    metadata: Any
    processor: str | None = None
    parent_turn_id: str | None = None


async def queue_turn(
    pool: asyncpg.Pool, settings: Settings, tenant_id: str, conversation_id: str,
    idempotency_key: str | None, digest: bytes, asked: Asked, *, if_busy: IfBusy = "enqueue",
) -> tuple[Turn, FollowUps]:
    """Append a queued turn with its turn.queued event, or replay the first answer for this
    Idempotency-Key; either way its start is a follow-up when it is the conversation's head (a
    first request may have died between its commit and its enqueue; a queued job dedupes).

    When the conversation has an open (queued or running) turn, `if_busy` says what happens
    first: "enqueue" nothing (the new turn waits behind it), "reject" raises ConversationBusy,
    "interrupt" cancels every open turn in this transaction, as `cancel` does. A replay comes
    before either: it answers the first answer whatever the conversation is doing now.

    The open-turn limits and the budget hold exactly: the conversation's open turns are counted
    under its lock; the tenant's open turns and spend are counted by the commit itself (a
    trigger, migration 0011), which fails when the turn does not fit, so no lock on the tenant
    is held across the transaction (docs/design.md §2, "Quotas"). With "enqueue", the turn is
    first tried in one statement without the lock (_queue_at_once), and this transaction runs
    only when that wrote nothing.
    Raises NotFound, Conflict (the key with another body), ConversationBusy, TooManyOpenTurns,
    PaymentRequired, and InvalidInput when the conversation's processor is not allowed or the
    parent is not its turn (after an interrupt's cancels, which then roll back with the
    rest)."""
    if if_busy == "enqueue":
        at_once = await _queue_at_once(pool, settings, tenant_id, conversation_id,
                                       idempotency_key, digest, asked)
        if at_once is not None:
            return at_once
    interrupted: list[Turn] = []
    try:
        async with transaction(pool) as conn:
            conversation = await _lock_conversation(conn, tenant_id, conversation_id)
            if idempotency_key is not None:
                replayed = await _replay(conn, conversation_id, idempotency_key, digest)
                if replayed is not None:
                    return replayed
            if if_busy == "reject":
                await _refuse_if_busy(conn, conversation_id)
            elif if_busy == "interrupt":
                interrupted = await _cancel_open(conn, conversation_id)
            turn, open_before = await new_turns.insert_turn(
                conn, id=f"turn_{secrets.token_hex(12)}", conversation_id=conversation_id,
                tenant_id=tenant_id, idempotency_key=idempotency_key, request_hash=digest,
                tenant_open_limit=settings.max_open_turns_per_tenant,
                **await _draft(conn, settings, tenant_id, conversation, asked),
            )
            usage.check_open_in_conversation(settings, open_before)
            await event_db.insert_event(conn, "turn.queued", turn,
                                        first_response=idempotency_key is not None)
    except asyncpg.PostgresError as exc:
        refused = usage.quota_refusal(exc)
        if refused is None:
            raise
        raise refused from None
    # No turn of the conversation was open (an interrupt's cancels count as ended): its head.
    start = (turn.id,) if open_before == 0 else ()
    queued = FollowUps(start=start, counted=(*interrupted, turn))
    if not interrupted:
        return turn, queued
    line = LogLine("turns_interrupted", {"turn_id": turn.id,
                                         "cancelled": [t.id for t in interrupted]})
    return turn, queued + FollowUps(logs=(line,))


async def _draft(
    conn: asyncpg.Connection, settings: Settings, tenant_id: str, conversation: asyncpg.Record,
    asked: Asked,
) -> dict[str, Any]:
    """What insert_turn writes besides the ids: the request's values, and what the locked
    conversation gives (checked: its processor allowed, the parent one of its turns)."""
    conversation_id = conversation["id"]
    processor = asked.processor or conversation["processor"]
    check_processor(settings, processor)
    if asked.parent_turn_id is not None and (
        await turn_db.turn_conversation(conn, tenant_id, asked.parent_turn_id) != conversation_id
    ):
        raise InvalidInput(
            "parent_turn_id must name a turn of this conversation.",
            errors=[{"field": "parent_turn_id", "message": "no such turn in this conversation"}],
        )
    return {
        "seq": conversation["turn_count"] + 1,
        "parent_turn_id": asked.parent_turn_id or conversation["last_turn_id"],
        "input": asked.input,
        "processor": processor,
        "output_schema": asked.output_schema,
        "metadata": asked.metadata,
        "estimated_cost_usd": usage.estimate_cost(processor),
    }


async def _queue_at_once(
    pool: asyncpg.Pool, settings: Settings, tenant_id: str, conversation_id: str,
    idempotency_key: str | None, digest: bytes, asked: Asked,
) -> tuple[Turn, FollowUps] | None:
    """queue_turn's common case in one round trip instead of five: the turn and its event
    written in one statement that commits on its own, with what the conversation gives read in
    the same statement, and only in the common case (service.db.new_turns.queue_turn_at_once).
    None when it wrote nothing (no such conversation, a turn created meanwhile, the
    conversation at its open-turn limit, an Idempotency-Key already used, a parent or a
    processor to refuse): queue_turn's transaction then decides, under the lock."""
    turn_id = f"turn_{secrets.token_hex(12)}"
    async with pool.acquire() as proxy:
        conn = cast(asyncpg.Connection, proxy)
        session = conn.get_server_pid()
        try:
            written = await new_turns.queue_turn_at_once(
                conn, id=turn_id, conversation_id=conversation_id, tenant_id=tenant_id,
                processor=asked.processor, parent_turn_id=asked.parent_turn_id,
                input=asked.input, output_schema=asked.output_schema, metadata=asked.metadata,
                idempotency_key=idempotency_key, request_hash=digest,
                tenant_open_limit=settings.max_open_turns_per_tenant,
                conversation_open_limit=settings.max_open_turns_per_conversation,
                event_data=_queued_turn(turn_id, conversation_id, asked),
                first_response=idempotency_key is not None,
                prices=usage.prices(tuple(settings.processors)),
            )
        except asyncpg.UniqueViolationError:
            return None  # the key (or the seq) was taken meanwhile: decided under the lock
        except asyncpg.PostgresError as exc:  # Postgres answered: nothing was written
            refused = usage.quota_refusal(exc)
            if refused is None:
                raise
            raise refused from None
        except DB_UNAVAILABLE:
            # No answer (our deadline passed, the connection went): the statement commits on
            # its own, so it may have. Answer what Postgres holds, never an error for a
            # committed turn.
            written = await _committed_meanwhile(pool, session, tenant_id, conversation_id,
                                                 turn_id)
            if written is None:
                raise
    if written is None:
        return None
    turn, open_before = written
    start = (turn.id,) if open_before == 0 else ()
    if open_before:
        # The statement counted open turns as of its start: one that ended before it took the
        # conversation's row did not see this turn, so it may be the head already.
        head = await turn_db.head_turn(pool, conversation_id)
        if head is not None and head["id"] == turn.id:
            start = (turn.id,)
    return turn, FollowUps(start=start, counted=(turn,))


async def _committed_meanwhile(
    pool: asyncpg.Pool, session: int, tenant_id: str, conversation_id: str, turn_id: str
) -> tuple[Turn, int] | None:
    """After the one statement's answer was lost: end the session that sent it, so that it
    cannot commit later, then read the turn by its id. (turn, 1) when it was committed (1: its
    head is read again), None when it was not."""
    async with pool.acquire() as proxy:
        other = cast(asyncpg.Connection, proxy)
        await other.execute("SELECT pg_terminate_backend($1, $2)", session, 5000)
        turn = await turn_db.get_turn(other, tenant_id, conversation_id, turn_id)
    log.warning("turn_create_answer_lost", turn_id=turn_id, committed=turn is not None)
    return None if turn is None else (turn, 1)


def _queued_turn(turn_id: str, conversation_id: str, asked: Asked) -> dict[str, Any]:
    """The new turn as its turn.queued event carries it, but for what the conversation gives
    (seq, parent_turn_id, processor) and created_at (the database's)."""
    event = msgspec.to_builtins(Turn(
        id=turn_id, conversation_id=conversation_id, seq=0, parent_turn_id=None,
        input=asked.input, processor="", output_schema=asked.output_schema,
        metadata=asked.metadata, status="queued", run_id=None, interaction_id=None,
        previous_interaction_id=None, output=None, basis=None, error=None,
        upstream_may_continue=False, context=None, created_at=_EPOCH, started_at=None,
        completed_at=None,
    ))
    for given in ("seq", "parent_turn_id", "processor", "created_at"):
        del event[given]
    return dict(event)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def _refuse_if_busy(conn: asyncpg.Connection, conversation_id: str) -> None:
    head = await turn_db.head_turn(conn, conversation_id)
    if head is not None:
        raise ConversationBusy(
            f"Conversation {conversation_id!r} already has a turn {head['status']} "
            f"({head['id']}); post again once it ends, or with if_busy \"interrupt\" to "
            "cancel it."
        )


async def _replay(
    conn: asyncpg.Connection, conversation_id: str, idempotency_key: str, digest: bytes
) -> tuple[Turn, FollowUps] | None:
    previous = await turn_db.get_idempotent_answer(conn, conversation_id, idempotency_key)
    if previous is None:
        return None
    if previous["request_hash"] != digest:
        raise Conflict("This Idempotency-Key was used with a different request body.")
    turn = msgspec.convert(previous["first_response"], Turn, strict=False)
    if previous["status"] != "queued":
        return turn, NOTHING
    head = await turn_db.head_turn(conn, conversation_id)
    start = (turn.id,) if head is not None and head["id"] == previous["id"] else ()
    return turn, FollowUps(start=start)


async def complete(pool: asyncpg.Pool, turn_id: str, output: Any, basis: Any) -> Ended:
    """The run completed: record its output and basis, unless the turn already ended."""
    return await _finish(pool, turn_id, "completed", output=output, basis=basis)


async def fail(pool: asyncpg.Pool, turn_id: str, error: dict[str, str]) -> Ended:
    """The run failed (or Parallel refused to say how it is): fail the running turn."""
    return await _finish(pool, turn_id, "failed", error=error)


async def time_out(pool: asyncpg.Pool, turn_id: str, error: dict[str, str]) -> Ended:
    """The run outlived its processor's deadline: fail the turn; its run may go on upstream."""
    return await _finish(pool, turn_id, "failed", error=error, upstream_may_continue=True)


async def _finish(pool: asyncpg.Pool, turn_id: str, status: str, **fields: Any) -> Ended:
    finished = await turn_db.finish_turn(pool, turn_id, status, from_statuses=("running",),
                                         **fields)
    if finished is None:
        return None, NOTHING
    return finished.turn, terminal(turn_id, status, finished.turn, finished.head)


async def ended(
    conn: asyncpg.Connection, turn_id: str, status: str, turn: Turn | None
) -> FollowUps:
    """The terminal event of a turn that just ended (in its transaction), and its follow-ups."""
    if turn is None:
        return terminal(turn_id, status, None, None)
    head = await event_db.insert_event(conn, f"turn.{turn.status}", turn)
    return terminal(turn_id, status, turn, head)


def terminal(
    turn_id: str, status: str, turn: Turn | None, head: tuple[str, str] | None
) -> FollowUps:
    """The follow-ups of a turn that ended (`status`; None: it had ended already), its
    conversation's head `head` once it committed."""
    if turn is None:
        return FollowUps(logs=(LogLine("late_result_ignored", {"turn_id": turn_id,
                                                               "status": status}),))
    ended = FollowUps(counted=(turn,), logs=(LogLine("turn_finished", {"turn_id": turn_id,
                                                                       "status": turn.status}),))
    return ended + _start_head(head)


# cancel -------------------------------------------------------------------------------------


async def cancel(
    pool: asyncpg.Pool, tenant_id: str, conversation_id: str, turn_id: str
) -> tuple[Turn, FollowUps]:
    """Cancel a queued or running turn (idempotent); the next turn starts once it commits.
    Raises NotFound, or Conflict once the turn has completed or failed."""
    async with transaction(pool) as conn:
        await _lock_conversation(conn, tenant_id, conversation_id)
        turn = await turn_db.lock_turn(conn, turn_id)
        if turn is None or turn.conversation_id != conversation_id:
            raise NotFound(f"Turn {turn_id!r} not found in conversation {conversation_id!r}.")
        if turn.status == "cancelled":
            return turn, NOTHING
        if turn.status in ("completed", "failed"):
            raise Conflict(f"The turn already ended: it is {turn.status}.")
        finished = await _cancel_locked(conn, turn_id, turn.status)
        assert finished is not None and finished.turn is not None  # locked and open
        return finished.turn, FollowUps(counted=(finished.turn,)) + _start_head(finished.head)


async def cancel_open_turns(
    pool: asyncpg.Pool, tenant_id: str, conversation_id: str
) -> tuple[list[Turn], FollowUps]:
    """Cancel every open turn of the conversation, newest first, starting none (it is being
    deleted). Raises NotFound."""
    async with transaction(pool) as conn:
        await _lock_conversation(conn, tenant_id, conversation_id)
        done = await _cancel_open(conn, conversation_id)
    return done, FollowUps(counted=tuple(done))


async def _cancel_open(conn: asyncpg.Connection, conversation_id: str) -> list[Turn]:
    """Cancel every open turn of the locked conversation, newest first."""
    done: list[Turn] = []
    for row in reversed(await turn_db.open_turns(conn, conversation_id)):
        cancelled = await _cancel_locked(conn, row["id"], row["status"])
        if cancelled is not None and cancelled.turn is not None:
            done.append(cancelled.turn)
    return done


async def _cancel_locked(
    conn: asyncpg.Connection, turn_id: str, status: str
) -> turn_db.Finished | None:
    """Cancel an open turn of the locked conversation, with its turn.cancelled event (and its
    webhook delivery when the conversation has a webhook); a running one's run may still
    finish upstream, which the turn says. Its turn is None when it had already ended."""
    return await turn_db.finish_turn(
        conn, turn_id, "cancelled", from_statuses=("queued", "running"),
        upstream_may_continue=status == "running",
    )
