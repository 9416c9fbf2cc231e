"""Verified API keys kept in memory, so that a request costs no key lookup in Postgres.

A revoked or changed key must be refused on the very next request, so an entry is trusted only
while nothing can have been missed: the `api_key_changed` trigger notifies channel `api_keys`
on commit of any change to a key, the process's LISTEN connection (service.notify.EventHub)
drops the entry when the notification arrives, and an entry is used only while that connection
is up and has stayed up since the entry was made. Without a listening connection every request
reads Postgres, as it would with no cache. Entries also expire after `ttl_s`, a bound for the
case no one can see: a connection that looks up but has silently stopped delivering.

So a change takes effect in a process when Postgres's notification reaches it: well under a
millisecond after the commit on an idle machine, and before any request sent after
`research-service keys revoke` has returned. Open event streams hear of it too: `watch(key)`
gives an asyncio.Event set when the key may have changed, and `is_live(key)` answers whether it
still may be used, with one lookup in Postgres however many streams of the key ask at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import asyncpg
import msgspec

from service.db.keys import CHANGES_CHANNEL, KeyAuth, authenticate_key, hash_key, split_key
from service.notify import EventHub

DEFAULT_TTL_S = 10.0
MAX_ENTRIES = 10_000


class _Entry(msgspec.Struct, frozen=True):
    key_hash: bytes
    auth: KeyAuth
    expires_at: float
    epoch: int


class KeyCache:
    def __init__(
        self, hub: EventHub | None, *, ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hub = hub
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        # Bumped by every invalidation, so that a lookup that raced one does not store its answer.
        self._generation = 0
        # key id -> events of the streams opened with it (see watch()).
        self._watchers: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        # (key hash, generation) -> the lookup in flight, shared by concurrent is_live() calls.
        self._lookups: dict[tuple[bytes, int], asyncio.Future[KeyAuth | None]] = {}
        if hub is not None:
            hub.on_channel(CHANGES_CHANNEL, self.invalidate)

    def __contains__(self, key_id: str) -> bool:
        return key_id in self._entries

    def invalidate(self, key_id: str) -> None:
        """Forget one key ('*': every key)."""
        self._generation += 1
        if key_id == "*":
            self._entries.clear()
        else:
            self._entries.pop(key_id, None)
        for watched, events in self._watchers.items():
            if key_id in ("*", watched):
                for event in events:
                    event.set()

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[asyncio.Event]:
        """An Event set whenever the key may have changed (ask is_live() then)."""
        event = asyncio.Event()
        key_id = split_key(key) or ""
        self._watchers[key_id].add(event)
        try:
            yield event
        finally:
            events = self._watchers.get(key_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._watchers[key_id]

    async def is_live(self, pool: asyncpg.Pool, key: str) -> bool:
        """Whether the key is still valid (not revoked), as authenticate() answers; concurrent
        calls for one key while the cache cannot answer share one lookup."""
        flight = (hash_key(key), self._generation)
        lookup = self._lookups.get(flight)
        if lookup is None:
            lookup = asyncio.ensure_future(self.authenticate(pool, key))
            self._lookups[flight] = lookup
            lookup.add_done_callback(lambda _f: self._lookups.pop(flight, None))
        return await asyncio.shield(lookup) is not None

    def _epoch(self) -> int | None:
        """The listening connection's epoch while it is up; None when entries cannot be trusted."""
        hub = self._hub
        return hub.epoch if hub is not None and hub.connected else None

    async def authenticate(self, pool: asyncpg.Pool, key: str) -> KeyAuth | None:
        """The live key this is, or None, as service.db.keys.authenticate_key answers."""
        key_id = split_key(key)
        if key_id is None:
            return None
        digest = hash_key(key)
        epoch, now = self._epoch(), self._clock()
        entry = self._entries.get(key_id)
        if (
            entry is not None and epoch is not None
            and entry.epoch == epoch and now < entry.expires_at
        ):
            return entry.auth if hmac.compare_digest(entry.key_hash, digest) else None
        generation = self._generation
        auth = await authenticate_key(pool, key)
        if auth is None:
            return None
        if epoch is not None and self._epoch() == epoch and self._generation == generation:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[key_id] = _Entry(digest, auth, now + self._ttl_s, epoch)
        return auth
