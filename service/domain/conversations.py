"""Conversations: create, find, read, change, rotate the webhook secret, delete, expire."""

from __future__ import annotations

import base64
import math
import secrets
import time
from datetime import datetime

import asyncpg
import msgspec
import structlog

from service import metrics
from service.config import Settings
from service.db import conversations as db
from service.db import usage as usage_db
from service.domain import followups, lifecycle
from service.domain.cursors import decode_cursor, page_of
from service.domain.validation import check_processor
from service.domain.webhook_urls import check_webhook_url
from service.errors import InvalidInput, NotFound, TooManyRequests
from service.models import Conversation
from service.schemas import ConversationCreate, ConversationPage, ConversationUpdate

log = structlog.get_logger(__name__)

SECRET_OVERLAP_S = 24 * 3600
# Replaced secrets that still sign (within SECRET_OVERLAP_S) at most: a delivery then carries
# up to 11 signatures (about 530 bytes of webhook-signature).
MAX_PREVIOUS_SECRETS = 10


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def create_conversation(
    pool: asyncpg.Pool, settings: Settings, tenant_id: str, data: ConversationCreate
) -> tuple[Conversation, str | None]:
    """Create a conversation; returns it and its webhook secret when it has a webhook URL."""
    processor = data.processor or settings.default_processor
    check_processor(settings, processor)
    if data.webhook_url:
        await check_webhook_url(data.webhook_url, settings.webhook_allow_private)
    secret = new_webhook_secret() if data.webhook_url else None
    conversation = await db.insert_conversation(
        pool,
        id=new_id("conv"),
        tenant_id=tenant_id,
        title=data.title,
        processor=processor,
        metadata=data.metadata,
        webhook_url=data.webhook_url,
        webhook_secret=secret,
        ttl_seconds=data.ttl_seconds,
    )
    return conversation, secret


async def get_conversation(
    pool: asyncpg.Pool | asyncpg.Connection, tenant_id: str, conversation_id: str
) -> Conversation:
    """Raises NotFound for unknown ids and for other tenants' ids alike."""
    conversation = await db.get_conversation(pool, tenant_id, conversation_id)
    if conversation is None:
        raise NotFound(f"Conversation {conversation_id!r} not found.")
    return conversation


async def list_conversations(
    pool: asyncpg.Pool, tenant_id: str, limit: int, cursor: str | None,
    status: str | None = None, metadata: dict[str, str] | None = None,
) -> ConversationPage:
    """A page of the tenant's conversations, newest first, with the filters ANDed: `status`
    and every `metadata` pair."""
    before = decode_cursor(cursor, datetime, str) if cursor else None
    rows = await db.list_conversations(pool, tenant_id, before, limit + 1, status, metadata)
    page, next_cursor = page_of(rows, limit, lambda c: (c.created_at, c.id))
    return ConversationPage(data=page, next_cursor=next_cursor)


async def update_conversation(
    pool: asyncpg.Pool, settings: Settings, tenant_id: str, conversation_id: str,
    data: ConversationUpdate,
) -> tuple[Conversation, str | None]:
    """Apply a PATCH; a webhook URL set where there was none gets a new secret, returned once."""
    changes = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not msgspec.UNSET}
    if changes.get("processor") is not None:
        check_processor(settings, changes["processor"])
    if "processor" in changes and changes["processor"] is None:
        raise InvalidInput("processor cannot be null.")
    if changes.get("webhook_url"):
        await check_webhook_url(changes["webhook_url"], settings.webhook_allow_private)
    async with followups.transaction(pool) as conn:
        current = await db.lock_conversation(conn, tenant_id, conversation_id)
        if current is None:
            raise NotFound(f"Conversation {conversation_id!r} not found.")
        secret = None
        if changes.get("webhook_url") and not current["webhook_secret"]:
            secret = changes["webhook_secret"] = new_webhook_secret()
        conversation = await db.update_conversation(conn, tenant_id, conversation_id, changes)
    assert conversation is not None
    return conversation, secret


async def rotate_webhook_secret(pool: asyncpg.Pool, tenant_id: str, conversation_id: str) -> str:
    """Give the conversation a new secret; every secret it replaced within the last 24 hours
    keeps signing beside it. Raises NotFound, InvalidInput (no webhook_url) and TooManyRequests
    past MAX_PREVIOUS_SECRETS rotations within 24 hours."""
    secret = new_webhook_secret()
    async with followups.transaction(pool) as conn:
        current = await db.lock_conversation(conn, tenant_id, conversation_id)
        if current is None:
            raise NotFound(f"Conversation {conversation_id!r} not found.")
        if current["webhook_url"] is None:
            raise InvalidInput("The conversation has no webhook_url: set one first.")
        live, oldest_expires_in_s = await db.live_previous_secrets(conn, conversation_id)
        if live >= MAX_PREVIOUS_SECRETS:
            raise TooManyRequests(
                f"The webhook secret was rotated {live} times within 24 hours, and each of "
                "those secrets still signs; rotate again once the oldest expires.",
                retry_after=max(1, math.ceil(oldest_expires_in_s)),
            )
        rotated = await db.rotate_webhook_secret(conn, tenant_id, conversation_id, secret,
                                                 SECRET_OVERLAP_S)
    assert rotated
    return secret


async def delete_conversation(
    pool: asyncpg.Pool, tenant_id: str, conversation_id: str
) -> None:
    """Cancel the conversation's open turns, then delete it with everything it holds.

    Its spend is kept (deleted_usage): deleting a conversation gives no budget back.
    """
    _, follow_ups = await lifecycle.cancel_open_turns(pool, tenant_id, conversation_id)
    await followups.after_commit(follow_ups)
    async with followups.transaction(pool) as conn:
        if await db.lock_conversation(conn, tenant_id, conversation_id) is None:
            raise NotFound(f"Conversation {conversation_id!r} not found.")
        await _delete_locked(conn, tenant_id, conversation_id)


async def _delete_locked(conn: asyncpg.Connection, tenant_id: str, conversation_id: str) -> None:
    """Delete a conversation this transaction has locked: its spend is archived, the rest goes
    with it (ON DELETE CASCADE), and its open event streams end once this commits."""
    await usage_db.archive_usage(conn, tenant_id, conversation_id)
    await db.delete_conversation(conn, tenant_id, conversation_id)


async def sweep_expired(pool: asyncpg.Pool, budget_s: float) -> int:
    """Delete expired conversations as DELETE does (they have no open turn to cancel), one
    transaction each, until none is left or `budget_s` has passed; returns how many.

    Safe on many workers at once (each claim skips rows another holds), and a worker that dies
    mid-sweep leaves every conversation whole or gone (the transaction rolls back). One that
    cannot be deleted now (a lock or statement timeout) is left to the next sweep.
    Raises service.db.pool.DB_UNAVAILABLE errors."""
    deadline = time.monotonic() + budget_s
    deleted, failed = 0, list[str]()
    while time.monotonic() < deadline:
        claimed = None
        try:
            async with followups.transaction(pool) as conn:
                claimed = await db.claim_expired_conversation(conn, failed)
                if claimed is None:
                    break
                await _delete_locked(conn, claimed["tenant_id"], claimed["id"])
        except (asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError) as exc:
            if claimed is None:
                raise
            log.warning("expired_conversation_not_deleted", conversation_id=claimed["id"],
                        error=repr(exc))
            failed.append(claimed["id"])
            continue
        deleted += 1
        metrics.conversation_expired()
    if deleted:
        log.info("expired_conversations_deleted", count=deleted)
    return deleted
