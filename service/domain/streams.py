"""A conversation's events for clients: pages of the log, or a live stream (docs/design.md, Events).

A stream sends `retry:` once, every stored event after the client's position (with `id:` its
sequence, so Last-Event-ID resumes it), `turn.progress` while a turn runs (no `id:`: neither
stored nor resumable), and a heartbeat comment after each idle `sse_heartbeat_s`. It ends when
its API key is revoked, its conversation deleted, Postgres cannot be read, or after
`max_stream_s`; the client then resumes from its last id and misses nothing. Each open stream
holds one of its tenant's slots (service.domain.slots) and reads through the conversation's
shared feed (service.domain.feeds).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator

import asyncpg
import msgspec

from service.config import Settings
from service.db import conversations as conversation_db
from service.db import events as event_db
from service.db.pool import DB_UNAVAILABLE
from service.domain.feeds import Feeds
from service.domain.keycache import KeyCache
from service.domain.progress import ProgressRelay, Watch
from service.domain.slots import Slot, Slots
from service.errors import NotFound
from service.models import Event
from service.schemas import EventPage

# What a client waits before reconnecting after the stream ends (the SSE `retry:` field).
RETRY_MS = 2000
PAGE = 100


class Frame(msgspec.Struct, frozen=True, kw_only=True):
    """One block of the stream: a message (`data`, `event`, an `id` for stored events), a
    comment, or the reconnection delay. The HTTP layer writes it in SSE's syntax."""

    data: str | None = None
    event: str | None = None
    id: str | None = None
    comment: str | None = None
    retry_ms: int | None = None


HEARTBEAT = Frame(comment="heartbeat")


def event_frame(event: Event) -> Frame:
    return Frame(data=msgspec.json.encode(event).decode(), event=event.type, id=str(event.sequence))


async def list_events(
    pool: asyncpg.Pool, tenant_id: str, conversation_id: str, after: int, limit: int
) -> EventPage:
    """A page of the conversation's events after `after`. Raises NotFound."""
    await _check_conversation(pool, tenant_id, conversation_id)
    events = await event_db.list_events(pool, conversation_id, after, limit)
    more = len(events) == limit
    return EventPage(data=events, next_cursor=str(events[-1].sequence) if more else None)


async def _check_conversation(pool: asyncpg.Pool, tenant_id: str, conversation_id: str) -> None:
    if await conversation_db.get_conversation(pool, tenant_id, conversation_id) is None:
        raise NotFound(f"Conversation {conversation_id!r} not found.")


class Streams:
    """Opens streams and long-polls for one API process (on Resources)."""

    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, keys: KeyCache, feeds: Feeds, slots: Slots,
        relay: ProgressRelay | None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._keys = keys
        self.feeds = feeds
        self.slots = slots
        self._relay = relay

    async def open(
        self, tenant_id: str, key: str, conversation_id: str, after: int
    ) -> AsyncIterator[Frame]:
        """The conversation's stream from after `after`, for a request made with `key`.

        Raises NotFound, or TooManyStreams when the tenant holds its limit of streams.
        """
        await _check_conversation(self._pool, tenant_id, conversation_id)
        slot = await self._take(tenant_id)
        frames = self._frames(key, conversation_id, after, slot)
        # A stream dropped before its first frame never runs its `finally`.
        weakref.finalize(frames, slot.release)
        return frames

    @contextlib.asynccontextmanager
    async def long_poll(self, tenant_id: str) -> AsyncIterator[Feeds]:
        """A slot for a `?wait=` long-poll while the block runs. Raises TooManyStreams."""
        slot = await self._take(tenant_id)
        try:
            yield self.feeds
        finally:
            slot.release()

    async def _take(self, tenant_id: str) -> Slot:
        return await self.slots.take(tenant_id, self._settings.max_open_streams_per_tenant)

    async def _frames(
        self, key: str, conversation_id: str, after: int, slot: Slot
    ) -> AsyncIterator[Frame]:
        watch: Watch | None = None
        heartbeat_s = self._settings.sse_heartbeat_s
        key_checked_at = time.monotonic()  # authenticated as the request came in
        deadline = key_checked_at + self._settings.max_stream_s
        try:
            yield Frame(retry_ms=RETRY_MS)
            with self._keys.watch(key) as key_changed:
                async with self.feeds.join(conversation_id) as feed:
                    last = after
                    while True:
                        tick = feed.tick  # before looking, so no change goes unseen
                        events = feed.after(last)
                        behind = events is None
                        if events is None:  # older than the feed keeps: catch up alone
                            events = await event_db.list_events(
                                self._pool, conversation_id, last, PAGE
                            )
                            if not events:
                                return  # deleted meanwhile
                        for event in events:
                            last = event.sequence
                            yield event_frame(event)
                        if behind:
                            continue
                        if feed.ended:
                            return
                        watch = self._follow_running(watch, conversation_id, feed.running)
                        for progress in watch.drain() if watch is not None else ():
                            yield Frame(data=msgspec.json.encode(progress).decode(),
                                        event=progress.type)
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return
                        sources = [tick, key_changed, *([watch.ready] if watch else [])]
                        woke = await _wait_any(sources, min(heartbeat_s, remaining))
                        # On a change of the key, and every heartbeat in case a change was
                        # missed (the answer is cached: no query unless the key changed).
                        now = time.monotonic()
                        if key_changed.is_set() or now - key_checked_at >= heartbeat_s:
                            key_changed.clear()
                            key_checked_at = now
                            if not await self._keys.is_live(self._pool, key):
                                return
                        if not woke and now < deadline:
                            yield HEARTBEAT
        except DB_UNAVAILABLE:
            return  # the client reconnects with Last-Event-ID
        finally:
            if watch is not None and self._relay is not None:
                self._relay.unwatch(watch)
            slot.release()

    def _follow_running(
        self, watch: Watch | None, conversation_id: str, running: tuple[str, str] | None
    ) -> Watch | None:
        """Watch the progress of the conversation's running turn, if any (and only of that one)."""
        relay = self._relay
        if relay is None:
            return None
        if watch is not None and running is not None and watch.run_id == running[1]:
            return watch
        if watch is not None:
            relay.unwatch(watch)
        return relay.watch(conversation_id, *running) if running is not None else None


async def _wait_any(events: list[asyncio.Event], within_s: float) -> bool:
    """Wait until one of the events is set; False when `within_s` seconds passed first."""
    if any(e.is_set() for e in events):
        return True
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)
