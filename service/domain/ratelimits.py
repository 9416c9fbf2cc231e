"""Requests per minute per API key, counted in Redis so every API process shares one count.

A sliding window, approximated from two fixed one-minute counters (the current minute's and the
previous one's, weighted by how much of it still overlaps the last 60 s): it never lets through
the 2N burst a plain fixed window allows across a minute boundary.

A process does not ask Redis for every request: `RateLimiter` takes a lease of up to
`lease_size(limit)` requests at once (1 below 200 a minute, at most 1% of the limit and 100),
counted in Redis when taken and spent in memory within the same minute. The count in Redis is
therefore never below what was let through, so a key never gets more than its limit; it can be
refused up to a lease per other API process early, or lose an unspent lease at a minute's end
(both at most 1% of its limit per process). Small limits stay exact: one round trip a request.

Each check also says what the key has left (`Quota`, for the RateLimit header fields): the room
Redis reported when this process last asked, plus what is left of its own lease. It is exact
with one API process and small limits; with several it can overstate what is left by what the
others took since (up to a lease each, or more for a key busy on every process), and it does not
count the room that frees up as the previous minute's count fades.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import NamedTuple

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service import metrics
from service.errors import RateLimited

log = structlog.get_logger(__name__)

WINDOW_S = 60

# Grants up to ARGV[4] requests, only as many as the window has room for, so a client that keeps
# retrying while refused does not push its own limit further away. Returns {granted, current,
# previous}: granted is 0 when refused.
SLIDING_WINDOW_LUA = """
local limit = tonumber(ARGV[1])
local elapsed = tonumber(ARGV[2])
local want = tonumber(ARGV[4])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
local room = math.floor(limit - previous * (1 - elapsed) - current)
if room < 1 then
    return {0, current, previous}
end
local granted = math.min(want, room)
redis.call('INCRBY', KEYS[1], granted)
redis.call('EXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return {granted, current + granted, previous}
"""
LEASE_MAX = 100
# Leases stay under this share of the limit (and are 1 request below 2 / LEASE_SHARE).
LEASE_SHARE = 0.01
MAX_KEYS = 10_000
# Redis gets this long to count a request; after a failure the limiter lets requests through
# uncounted (fail open) for FAIL_OPEN_S before it asks Redis again, so an outage adds no latency.
REDIS_TIMEOUT_S = 0.5
FAIL_OPEN_S = 1.0


class LimiterUnavailable(Exception):
    """Redis did not answer the count."""


class Quota(NamedTuple):
    """What a key may still send: `remaining` requests now, `reset_s` until its minute's counter
    closes (or, when refused, until a request would be let through: Retry-After)."""

    limit: int
    remaining: int
    reset_s: int


class Grant(NamedTuple):
    granted: int
    # Room left in Redis after this grant; None when Redis could not be asked.
    room: int | None


def seconds_to_minute_end(now: float) -> int:
    return max(1, math.ceil(WINDOW_S - now % WINDOW_S))


def room_left(limit: int, current: int, previous: int, elapsed: float) -> int:
    """Requests the sliding window still has room for (as SLIDING_WINDOW_LUA counts it)."""
    return max(0, math.floor(limit - previous * (1 - elapsed) - current))


def lease_size(limit: int) -> int:
    return max(1, min(LEASE_MAX, int(limit * LEASE_SHARE)))


def retry_after_s(limit: int, current: int, previous: int, elapsed: float) -> int:
    """Whole seconds until a request would be allowed again (elapsed: fraction of this minute)."""
    if current + 1 > limit:
        # Wait for the next minute, then until this minute's count has faded enough.
        wait = (1 - elapsed) + (1 - (limit - 1) / current)
    else:
        wait = (1 - (limit - current - 1) / previous) - elapsed
    return max(1, math.ceil(wait * WINDOW_S))


async def check_rate(
    redis: Redis, key_id: str, limit: int, now: float | None = None, *, want: int = 1
) -> Grant:
    """Count up to `want` requests of the key (0 limit: unlimited); return how many were granted
    (at least 1) and the room left. Raises RateLimited when the key has no room left in the
    last 60 s.

    Raises LimiterUnavailable when Redis does not answer within REDIS_TIMEOUT_S.
    """
    if limit <= 0:
        return Grant(want, None)
    now = time.time() if now is None else now
    window, offset = divmod(now, WINDOW_S)
    elapsed = offset / WINDOW_S
    # The {hash tag} keeps both counters of a key on one Redis Cluster slot.
    keys = [f"ratelimit:{{{key_id}}}:{int(window)}", f"ratelimit:{{{key_id}}}:{int(window) - 1}"]
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            args = [str(limit), repr(elapsed), str(WINDOW_S), str(want)]
            reply = redis.eval(SLIDING_WINDOW_LUA, 2, *keys, *args)
            granted, current, previous = await reply  # type: ignore[misc]  # Awaitable[str] | str
    except (RedisError, OSError, TimeoutError) as exc:
        raise LimiterUnavailable(repr(exc)) from exc
    if not granted:
        raise RateLimited(
            f"This API key is limited to {limit} requests per minute.",
            retry_after=retry_after_s(limit, int(current), int(previous), elapsed),
        )
    return Grant(int(granted), room_left(limit, int(current), int(previous), elapsed))


class RateLimiter:
    """One process's view of the shared counts: leases requests from Redis (see the module doc)."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        # key id -> (minute, limit, requests of the lease left, room Redis last reported)
        self._leases: dict[str, tuple[int, int, int, int]] = {}
        # While Redis is away (monotonic time until which requests pass uncounted).
        self._open_until = 0.0

    def _spend(self, key_id: str, minute: int, limit: int) -> int | None:
        """Spend one request of the key's lease; return what the key has left, or None."""
        lease = self._leases.get(key_id)
        if lease is None or lease[0] != minute or lease[1] != limit or lease[2] <= 0:
            return None
        self._leases[key_id] = (minute, limit, lease[2] - 1, lease[3])
        return lease[2] - 1 + lease[3]

    async def check(self, key_id: str, limit: int, now: float | None = None) -> Quota | None:
        """Let one request of the key through and say what it has left (None: unlimited, or
        unknown while Redis is away), or raise RateLimited."""
        if limit <= 0:
            return None
        now = time.time() if now is None else now
        minute = int(now // WINDOW_S)
        reset_s = seconds_to_minute_end(now)
        if (remaining := self._spend(key_id, minute, limit)) is not None:
            return Quota(limit, remaining, reset_s)
        if time.monotonic() < self._open_until:
            metrics.rate_limit_fail_open()
            return None
        try:
            granted, room = await check_rate(
                self._redis, key_id, limit, now, want=lease_size(limit)
            )
        except LimiterUnavailable as exc:
            # Fail open: a rate limit is not worth an outage (README, "Guarantees").
            self._open_until = time.monotonic() + FAIL_OPEN_S
            log.warning("rate_limit_fail_open", key_id=key_id, error=str(exc), for_s=FAIL_OPEN_S)
            metrics.rate_limit_fail_open()
            return None
        if room is None:
            return None
        left = 0
        if granted > 1:
            if len(self._leases) >= MAX_KEYS:
                self._leases.clear()
            # Requests taken meanwhile by concurrent requests of the same key add up.
            lease = self._leases.get(key_id)
            left = lease[2] if lease is not None and lease[:2] == (minute, limit) else 0
            left += granted - 1
            self._leases[key_id] = (minute, limit, left, room)
        return Quota(limit, left + room, reset_s)
