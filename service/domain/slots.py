"""Open SSE streams plus `?wait=` long-polls per tenant, counted in Redis across API processes.

Each open stream or long-poll holds a slot: a member of the tenant's sorted set in Redis
(`streams:{tenant}`), scored with the time its lease ends, by Redis's own clock. Taking a slot
first drops the tenant's expired members, then refuses when as many as the limit remain. A
process renews the leases of the slots it holds every LEASE_S / 3 (one call per tenant) and
gives a slot back when its stream or long-poll ends; a process that dies holds its slots until
their leases run out, LEASE_S at most, so a crash never leaks a slot for good.

A slot given back stays the process's for SPARE_S (a spare): the tenant's next stream or
long-poll in this process takes it without asking Redis, as a client's next `?wait=` usually
comes within milliseconds of the last one's answer. Taking and giving back were a script and a
ZREM per long-poll, a tenth of the API's CPU per turn (docs/benchmarks.md). A spare nobody takes
leaves Redis SPARE_S after its stream ended; until then another process counts it as open, so a
tenant at its limit can be refused there for up to SPARE_S after closing a stream here.

While Redis cannot answer, each process counts its own slots against the same limit (so a
tenant may then hold up to the limit per process): a cap on streams is not worth an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import defaultdict

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.errors import TooManyStreams

log = structlog.get_logger(__name__)

LEASE_S = 30.0
# How long a slot given back stays this process's for the tenant's next stream (see above).
SPARE_S = 1.0
RETRY_AFTER_S = 5
REDIS_ERRORS = (RedisError, OSError, TimeoutError)

# KEYS[1]: the tenant's set; ARGV: limit, member, lease in ms. 1 when taken, 0 when full.
TAKE_SLOT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
    return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS[1]: the tenant's set; ARGV: lease in ms, then the members to keep. XX: a member released
# (or expired) meanwhile stays out.
RENEW_SLOTS_LUA = """
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
    redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
"""


def slot_key(tenant_id: str) -> str:
    return f"streams:{{{tenant_id}}}"


class Slot:
    """One open stream or long-poll; release() it when that ends (idempotent)."""

    def __init__(self, slots: Slots, tenant_id: str, member: str) -> None:
        self._slots = slots
        self.tenant_id = tenant_id
        self.member = member
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._slots.forget(self)


class Slots:
    """The process's slots (on Resources); a background task renews their leases."""

    def __init__(
        self, redis: Redis, *, lease_s: float = LEASE_S, spare_s: float = SPARE_S
    ) -> None:
        self._redis = redis
        self._take_slot = redis.register_script(TAKE_SLOT_LUA)
        self._renew_slots = redis.register_script(RENEW_SLOTS_LUA)
        self._lease_ms = int(lease_s * 1000)
        self._renew_every_s = lease_s / 3
        self._process = secrets.token_hex(6)
        self._count = 0
        self._held: defaultdict[str, set[str]] = defaultdict(set)
        # Slots given back, still in Redis: tenant -> member -> the timer that removes it.
        self._spare: defaultdict[str, dict[str, asyncio.TimerHandle]] = defaultdict(dict)
        self._spare_s = spare_s
        self._background: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None

    def held(self, tenant_id: str) -> int:
        """Slots this process holds for the tenant."""
        return len(self._held.get(tenant_id, ()))

    async def take(self, tenant_id: str, limit: int) -> Slot:
        """A slot of the tenant's, or TooManyStreams when `limit` are open across processes."""
        if (spare := self._spare.get(tenant_id)) and self.held(tenant_id) < limit:
            member, timer = spare.popitem()
            timer.cancel()
            if not spare:
                del self._spare[tenant_id]
            self._held[tenant_id].add(member)
            self._start_renewing()
            return Slot(self, tenant_id, member)
        self._count += 1
        member = f"{self._process}:{self._count}"
        try:
            taken = await self._take_slot(
                keys=[slot_key(tenant_id)], args=[limit, member, self._lease_ms]
            )
        except REDIS_ERRORS as exc:
            log.warning("stream_slots_unavailable", tenant_id=tenant_id, error=repr(exc))
            taken = self.held(tenant_id) < limit
        if not taken:
            raise TooManyStreams(
                f"This tenant has {limit} event streams and long-polls open, its limit; close "
                "one or retry later.", retry_after=RETRY_AFTER_S,
            )
        self._held[tenant_id].add(member)
        self._start_renewing()
        return Slot(self, tenant_id, member)

    def forget(self, slot: Slot) -> None:
        members = self._held.get(slot.tenant_id)
        if members is not None:
            members.discard(slot.member)
            if not members:
                del self._held[slot.tenant_id]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # released by the garbage collector outside the loop: the lease ends
            return
        self._spare[slot.tenant_id][slot.member] = loop.call_later(
            self._spare_s, self._give_back, slot.tenant_id, slot.member
        )

    def spare(self, tenant_id: str) -> int:
        """Slots given back that this process still holds for the tenant's next stream."""
        return len(self._spare.get(tenant_id, ()))

    def _give_back(self, tenant_id: str, member: str) -> None:
        spare = self._spare.get(tenant_id)
        if spare is None or spare.pop(member, None) is None:
            return
        if not spare:
            del self._spare[tenant_id]
        task = asyncio.get_running_loop().create_task(self._remove(tenant_id, member))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _remove(self, tenant_id: str, member: str) -> None:
        try:
            await self._redis.zrem(slot_key(tenant_id), member)
        except REDIS_ERRORS as exc:  # its lease runs out instead
            log.info("stream_slot_release_failed", tenant_id=tenant_id, error=repr(exc))

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while self._held or self._spare:
            await asyncio.sleep(self._renew_every_s)
            await self.renew()

    async def renew(self) -> None:
        """Extend the lease of every slot this process holds, spares included."""
        for tenant_id in {*self._held, *self._spare}:
            members = [*self._held.get(tenant_id, ()), *self._spare.get(tenant_id, ())]
            if not members:
                continue
            try:
                await self._renew_slots(
                    keys=[slot_key(tenant_id)], args=[self._lease_ms, *members]
                )
            except REDIS_ERRORS as exc:
                log.warning("stream_slots_renew_failed", tenant_id=tenant_id, error=repr(exc))

    async def close(self) -> None:
        for tenant_id, spare in list(self._spare.items()):
            for member, timer in list(spare.items()):
                timer.cancel()
                self._give_back(tenant_id, member)
        tasks = [*self._background, *([self._renewer] if self._renewer else [])]
        if self._renewer is not None:
            self._renewer.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
