"""Turns as the API sees them: create (idempotently), read, wait, list, cancel.

Every change of a turn is a transition of service.domain.lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time

import asyncpg
import msgspec

from service.config import Settings
from service.db import conversations as conversation_db
from service.db import turns as db
from service.domain import followups, lifecycle
from service.domain.cursors import Seq, decode_cursor, page_of
from service.domain.feeds import Feeds, terminal_event_of
from service.domain.validation import check_turn_request
from service.errors import InvalidInput, NotFound
from service.models import TERMINAL_STATUSES, Turn
from service.queue import Queue
from service.schemas import TurnCreate, TurnPage

IDEMPOTENCY_KEY_MAX = 255


def request_hash(data: TurnCreate) -> bytes:
    """The body's digest for Idempotency-Key: its fields, sorted. `if_busy: "enqueue"` (the
    default) counts as absent, so a body that names it matches one that does not, and keys
    stored before the field existed keep matching."""
    body = msgspec.to_builtins(data)
    if body["if_busy"] == "enqueue":
        del body["if_busy"]
    return hashlib.sha256(msgspec.json.encode(body, order="sorted")).digest()


async def create_turn(
    pool: asyncpg.Pool,
    queue: Queue | None,
    settings: Settings,
    tenant_id: str,
    conversation_id: str,
    data: TurnCreate,
    idempotency_key: str | None,
) -> Turn:
    """Append a queued turn and ask a worker to start it when its conversation is ready.

    The same Idempotency-Key with the same body returns the first answer; with another body,
    Conflict. `data.if_busy` says what to do when the conversation has an open turn
    (lifecycle.queue_turn). Raises NotFound, InvalidInput, ConversationBusy, TooManyOpenTurns,
    PaymentRequired.
    """
    if idempotency_key is not None and not 0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX:
        raise InvalidInput(f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters.")

    try:
        check_turn_request(settings, data)
    except InvalidInput:
        # As for any request about a conversation, a missing one is told first.
        if await conversation_db.get_conversation(pool, tenant_id, conversation_id) is None:
            raise NotFound(f"Conversation {conversation_id!r} not found.") from None
        raise
    asked = lifecycle.Asked(
        input=data.input, output_schema=msgspec.to_builtins(data.output_schema),
        metadata=data.metadata, processor=data.processor, parent_turn_id=data.parent_turn_id,
    )
    turn, follow_ups = await lifecycle.queue_turn(
        pool, settings, tenant_id, conversation_id, idempotency_key, request_hash(data), asked,
        if_busy=data.if_busy,
    )
    await followups.after_commit(follow_ups, queue, settings)
    return turn


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
    page, next_cursor = page_of(rows, limit, lambda t: (t.seq,))
    return TurnPage(data=page, next_cursor=next_cursor)


async def cancel_turn(
    pool: asyncpg.Pool, queue: Queue | None, settings: Settings, tenant_id: str,
    conversation_id: str, turn_id: str,
) -> Turn:
    """Cancel a queued or running turn (idempotent). Raises NotFound, or Conflict once it ended."""
    cancelled, follow_ups = await lifecycle.cancel(pool, tenant_id, conversation_id, turn_id)
    await followups.after_commit(follow_ups, queue, settings)
    return cancelled
