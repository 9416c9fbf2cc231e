"""Turns as the API sees them: create (idempotently), read, wait, list, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time

import asyncpg
import msgspec
import structlog
from arq.connections import ArqRedis

from service import metrics
from service import queue as jobs
from service.config import Settings
from service.db import conversations as conversation_db
from service.db import events as event_db
from service.db import turns as db
from service.domain.cursors import Seq, decode_cursor, encode_cursor
from service.domain.feeds import Feeds, terminal_event_of
from service.domain.usage import check_quotas, estimate_cost
from service.domain.validation import check_turn_request
from service.errors import Conflict, InvalidInput, NotFound
from service.models import TERMINAL_STATUSES, Turn
from service.schemas import TurnCreate, TurnPage

log = structlog.get_logger(__name__)

IDEMPOTENCY_KEY_MAX = 255


def request_hash(data: TurnCreate) -> bytes:
    return hashlib.sha256(msgspec.json.encode(data, order="sorted")).digest()


async def create_turn(
    pool: asyncpg.Pool,
    queue: ArqRedis | None,
    settings: Settings,
    tenant_id: str,
    conversation_id: str,
    data: TurnCreate,
    idempotency_key: str | None,
) -> Turn:
    """Append a queued turn and ask a worker to start it when its conversation is ready.

    The same Idempotency-Key with the same body returns the first answer; with another body,
    Conflict. Raises NotFound, InvalidInput, TooManyOpenTurns, PaymentRequired.
    """
    if idempotency_key is not None and not 0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX:
        raise InvalidInput(f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters.")
    digest = request_hash(data)
    async with pool.acquire() as conn, conn.transaction():
        conversation = await _lock_conversation(conn, tenant_id, conversation_id)
        replay = None
        if idempotency_key is not None:
            replay = await _replay(conn, conversation_id, idempotency_key, digest)
        if replay is None:
            turn, open_before = await _insert_queued_turn(
                conn, settings, tenant_id, conversation, data, idempotency_key, digest
            )
    if replay is not None:
        turn, start = replay
        if start:
            await enqueue_start(queue, settings, turn.id)
        return turn
    metrics.turn_transition(turn)
    if open_before == 0:  # the conversation's only open turn: nothing runs before it
        await enqueue_start(queue, settings, turn.id)
    return turn


async def _replay(
    conn: asyncpg.Connection, conversation_id: str, idempotency_key: str, digest: bytes
) -> tuple[Turn, bool] | None:
    """The first answer for this Idempotency-Key, and whether its turn must be enqueued: the
    first request may have died between its commit and its enqueue, and the turn should not
    wait for the reconciler (a start job still queued dedupes the enqueue). Raises Conflict."""
    previous = await db.get_idempotent_answer(conn, conversation_id, idempotency_key)
    if previous is None:
        return None
    if previous["request_hash"] != digest:
        raise Conflict("This Idempotency-Key was used with a different request body.")
    turn = msgspec.convert(previous["first_response"], Turn, strict=False)
    if previous["status"] != "queued":
        return turn, False
    head = await db.head_turn(conn, conversation_id)
    return turn, head is not None and head["id"] == previous["id"]


async def _insert_queued_turn(
    conn: asyncpg.Connection, settings: Settings, tenant_id: str, conversation: asyncpg.Record,
    data: TurnCreate, idempotency_key: str | None, digest: bytes,
) -> tuple[Turn, int]:
    """Insert the turn and its turn.queued event (the conversation is locked); returns it with
    the number of the conversation's turns open before it."""
    conversation_id = conversation["id"]
    processor = data.processor or conversation["processor"]
    check_turn_request(settings, data, processor)
    parent_id = data.parent_turn_id or conversation["last_turn_id"]
    if data.parent_turn_id is not None and (
        await db.turn_conversation(conn, tenant_id, data.parent_turn_id) != conversation_id
    ):
        raise InvalidInput(
            "parent_turn_id must name a turn of this conversation.",
            errors=[{"field": "parent_turn_id", "message": "no such turn in this conversation"}],
        )
    cost = estimate_cost(processor)
    # The conversation is locked, so no turn of it opens or closes before we commit.
    open_before = await check_quotas(conn, settings, tenant_id, conversation_id, cost)
    turn = await db.insert_turn(
        conn,
        id=f"turn_{secrets.token_hex(12)}",
        conversation_id=conversation_id,
        tenant_id=tenant_id,
        seq=conversation["turn_count"] + 1,
        parent_turn_id=parent_id,
        input=data.input,
        processor=processor,
        output_schema=msgspec.to_builtins(data.output_schema),
        metadata=data.metadata,
        idempotency_key=idempotency_key,
        request_hash=digest,
        estimated_cost_usd=cost,
    )
    await event_db.insert_event(conn, "turn.queued", turn)
    if idempotency_key is not None:
        await db.set_first_response(conn, turn.id, msgspec.to_builtins(turn))
    return turn, open_before


async def enqueue_start(queue: ArqRedis | None, settings: Settings, turn_id: str) -> bool:
    """Enqueue a start; if Redis is down the reconciler finds the turn later, so only log.
    True when a job was added (False: already queued, or Redis is down)."""
    if queue is None:
        return False
    try:
        return await jobs.enqueue_start_turn(queue, settings.queue_name, turn_id)
    except jobs.QUEUE_UNAVAILABLE as exc:
        log.warning("enqueue_failed", turn_id=turn_id, error=repr(exc))
        return False


async def _lock_conversation(conn: asyncpg.Connection, tenant_id: str, conversation_id: str) -> asyncpg.Record:
    conversation = await conversation_db.lock_conversation(conn, tenant_id, conversation_id)
    if conversation is None:
        raise NotFound(f"Conversation {conversation_id!r} not found.")
    return conversation


async def get_turn(pool: asyncpg.Pool, tenant_id: str, conversation_id: str, turn_id: str) -> Turn:
    turn = await db.get_turn(pool, tenant_id, conversation_id, turn_id)
    if turn is None:
        raise NotFound(f"Turn {turn_id!r} not found in conversation {conversation_id!r}.")
    return turn


async def wait_for_turn(
    pool: asyncpg.Pool, feeds: Feeds, tenant_id: str, conversation_id: str, turn_id: str,
    wait_s: float,
) -> Turn:
    """The turn as soon as it is terminal, or as it is when wait_s runs out.

    Waits on the conversation's shared feed (service.domain.feeds): the event that ends the
    turn carries it, so a long-poll reads the turn itself only when it starts and, if the turn
    is still open then, when wait_s runs out.
    """
    deadline = time.monotonic() + wait_s
    async with feeds.join(conversation_id) as feed:
        seen = feed.last
        turn = await get_turn(pool, tenant_id, conversation_id, turn_id)
        while turn.status not in TERMINAL_STATUSES and not feed.ended:
            tick = feed.tick
            events = feed.after(seen)
            if events is None:  # more events than the feed keeps came at once: read the turn
                seen = feed.last
                turn = await get_turn(pool, tenant_id, conversation_id, turn_id)
                continue
            ended = terminal_event_of(events, turn_id)
            if ended is not None:
                return ended.data
            seen = feed.last
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tick.wait(), remaining)
        if turn.status in TERMINAL_STATUSES:
            return turn
    return await get_turn(pool, tenant_id, conversation_id, turn_id)


async def list_turns(
    pool: asyncpg.Pool, tenant_id: str, conversation_id: str, limit: int, cursor: str | None
) -> TurnPage:
    after = decode_cursor(cursor, Seq)[0] if cursor else 0
    if await conversation_db.get_conversation(pool, tenant_id, conversation_id) is None:
        raise NotFound(f"Conversation {conversation_id!r} not found.")
    rows = await db.list_turns(pool, conversation_id, after, limit + 1)
    page, more = rows[:limit], len(rows) > limit
    return TurnPage(data=page, next_cursor=encode_cursor(page[-1].seq) if more else None)


async def cancel_turn(
    pool: asyncpg.Pool, queue: ArqRedis | None, settings: Settings, tenant_id: str,
    conversation_id: str, turn_id: str,
) -> Turn:
    """Cancel a queued or running turn (idempotent). Raises NotFound, or Conflict once it ended."""
    async with pool.acquire() as conn, conn.transaction():
        await _lock_conversation(conn, tenant_id, conversation_id)
        turn = await db.lock_turn(conn, turn_id)
        if turn is None or turn.conversation_id != conversation_id:
            raise NotFound(f"Turn {turn_id!r} not found in conversation {conversation_id!r}.")
        if turn.status == "cancelled":
            return turn
        if turn.status in ("completed", "failed"):
            raise Conflict(f"The turn already ended: it is {turn.status}.")
        cancelled = await db.finish_turn(
            conn, turn_id, "cancelled", from_statuses=("queued", "running"),
            upstream_may_continue=turn.status == "running",
        )
        assert cancelled is not None
        await event_db.insert_event(conn, "turn.cancelled", cancelled)
        head = await db.head_turn(conn, conversation_id)
    metrics.turn_transition(cancelled)
    if head is not None and head["status"] == "queued":
        await enqueue_start(queue, settings, head["id"])
    return cancelled


async def cancel_open_turns(pool: asyncpg.Pool, tenant_id: str, conversation_id: str) -> None:
    """Cancel every open turn of the conversation, newest first, without starting others."""
    done: list[Turn] = []
    async with pool.acquire() as conn, conn.transaction():
        await _lock_conversation(conn, tenant_id, conversation_id)
        for row in reversed(await db.open_turns(conn, conversation_id)):
            cancelled = await db.finish_turn(
                conn, row["id"], "cancelled", from_statuses=("queued", "running"),
                upstream_may_continue=row["status"] == "running",
            )
            if cancelled is not None:
                await event_db.insert_event(conn, "turn.cancelled", cancelled)
                done.append(cancelled)
    for cancelled in done:
        metrics.turn_transition(cancelled)
