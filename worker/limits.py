"""A global cap on Parallel run creations per minute, shared by every worker through Redis.

A burst of turns then waits in the queue instead of meeting Parallel's 429s.
"""

from __future__ import annotations

import time

from arq.connections import ArqRedis
from redis.exceptions import RedisError

from service.errors import UpstreamUnavailable

# KEYS[1]: the minute's counter. One script call rather than a MULTI/INCR/EXPIRE/EXEC pipeline
# (1.9 % of the worker's samples in e2e profiles, mostly redis-py's pipeline object), with the
# same atomicity.
COUNT_LUA = """
local count = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 120)
return count
"""


class CreationLimiter:
    def __init__(self, redis: ArqRedis, per_minute: int, prefix: str) -> None:
        self._redis = redis
        self._per_minute = per_minute
        self._prefix = prefix
        self._count = redis.register_script(COUNT_LUA)

    async def acquire(self) -> None:
        """Take one creation slot in the current minute, or raise UpstreamUnavailable with the
        seconds until the next minute as retry_after."""
        if self._per_minute <= 0:
            return
        now = time.time()
        window = int(now // 60)
        key = f"{self._prefix}:creations:{window}"
        try:
            count = int(await self._count(keys=[key]))
        except (RedisError, OSError) as exc:
            # Fail closed: without the shared count, no create (the attempt is given back, not
            # left holding its lease, and retried once Redis answers).
            raise UpstreamUnavailable(f"Redis is away: {exc!r}", retry_after=1.0) from exc
        if count > self._per_minute:
            raise UpstreamUnavailable(
                "Run creation limit reached for this minute.", retry_after=60 - now % 60 + 0.05
            )
