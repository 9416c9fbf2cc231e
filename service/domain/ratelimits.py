"""Requests per minute per API key, counted in Redis so every API process shares one count.

A sliding window, approximated from two fixed one-minute counters (the current minute's and the
previous one's, weighted by how much of it still overlaps the last 60 s): it never lets through
the 2N burst a plain fixed window allows across a minute boundary, at one round trip a request.
"""

from __future__ import annotations

import math
import time

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from service.errors import RateLimited

log = structlog.get_logger(__name__)

WINDOW_S = 60

# Counts the request only when it is allowed, so a client that keeps retrying while refused
# does not push its own limit further away. Returns {allowed, current, previous}.
SLIDING_WINDOW_LUA = """
local limit = tonumber(ARGV[1])
local elapsed = tonumber(ARGV[2])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
if previous * (1 - elapsed) + current + 1 > limit then
    return {0, current, previous}
end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return {1, current + 1, previous}
"""


def retry_after_s(limit: int, current: int, previous: int, elapsed: float) -> int:
    """Whole seconds until a request would be allowed again (elapsed: fraction of this minute)."""
    if current + 1 > limit:
        # Wait for the next minute, then until this minute's count has faded enough.
        wait = (1 - elapsed) + (1 - (limit - 1) / current)
    else:
        wait = (1 - (limit - current - 1) / previous) - elapsed
    return max(1, math.ceil(wait * WINDOW_S))


async def check_rate(redis: Redis, key_id: str, limit: int, now: float | None = None) -> None:
    """Count one request of the key; raises RateLimited past `limit` a minute (0: unlimited).

    If Redis cannot answer, the request is let through: a rate limit is not worth an outage.
    """
    if limit <= 0:
        return
    now = time.time() if now is None else now
    window, offset = divmod(now, WINDOW_S)
    elapsed = offset / WINDOW_S
    # The {hash tag} keeps both counters of a key on one Redis Cluster slot.
    keys = [f"ratelimit:{{{key_id}}}:{int(window)}", f"ratelimit:{{{key_id}}}:{int(window) - 1}"]
    try:
        allowed, current, previous = await redis.eval(  # type: ignore[misc]
            SLIDING_WINDOW_LUA, 2, *keys, limit, repr(elapsed), WINDOW_S
        )
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("rate_limit_unavailable", key_id=key_id, error=repr(exc))
        return
    if not allowed:
        raise RateLimited(
            f"This API key is limited to {limit} requests per minute.",
            retry_after=retry_after_s(limit, int(current), int(previous), elapsed),
        )
