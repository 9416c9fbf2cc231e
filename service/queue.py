"""Job names, the msgpack serializer pair, the queue protocol and typed enqueue helpers (the API
and the worker share them).

Jobs carry ids only; Postgres holds the state. Each job id is "<job>:<entity id>", so arq
refuses a duplicate while one is queued, and the worker treats every job as possibly run twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any, Protocol

import msgspec
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import (
    default_queue_name,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
)
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.exceptions import NoScriptError, RedisError

START_TURN = "start_turn"
CHECK_TURN = "check_turn"
RECONCILE = "reconcile"
SWEEP_EXPIRED = "sweep_expired"
REPAIR_QUOTAS = "repair_quotas"

# What redis-py and arq raise when Redis is down, refusing connections or too slow: a caller
# whose write already committed logs it and lets the reconciler repair the queue later.
QUEUE_UNAVAILABLE: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)



class Queue(Protocol):
    """What service.domain needs of the queue (an arq Redis pool is one): run a script (the
    enqueue below), and set a key with an expiry. The domain is typed against this, so it
    imports no arq."""

    # redis-py's types: a coroutine for an asyncio client.
    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    def set(
        self, name: str, value: bytes, *, ex: int | None = None, nx: bool = False
    ) -> Awaitable[object]: ...


_encoder = msgspec.msgpack.Encoder(enc_hook=repr)


def serialize(value: dict[str, Any]) -> bytes:
    return _encoder.encode(value)


def deserialize(data: bytes) -> dict[str, Any]:
    return msgspec.msgpack.decode(data, type=dict[str, Any])


async def create_queue(redis_url: str) -> ArqRedis:
    """An arq Redis pool using the project's serializer."""
    return await create_pool(
        RedisSettings.from_dsn(redis_url),
        job_serializer=serialize,
        job_deserializer=deserialize,
        retry=2,
    )


def wake_channel(queue_name: str) -> str:
    """The Redis channel an enqueue publishes on, so that idle workers wake at once instead of
    polling (worker.supervised)."""
    return f"{queue_name or default_queue_name}:wake"


# arq's enqueue (connections.ArqRedis.enqueue_job: the same keys, job encoding, score and
# expiry; a job is not added while it or its result exists) for any number of jobs of one
# score in one round trip instead of three each (WATCH, EXISTS, MULTI/EXEC), and a PUBLISH of
# the score on the queue's wake channel once they are in the queue. KEYS: each job's key and
# result key, then the queue; ARGV: score, expiry (ms), channel, then each job's id and body.
ENQUEUE_LUA = """
local n = (#KEYS - 1) / 2
local added = 0
for i = 1, n do
  if redis.call('exists', KEYS[2 * i - 1], KEYS[2 * i]) == 0 then
    redis.call('psetex', KEYS[2 * i - 1], ARGV[2], ARGV[3 + 2 * i])
    redis.call('zadd', KEYS[#KEYS], ARGV[1], ARGV[2 + 2 * i])
    added = added + 1
  end
end
if added > 0 then redis.call('publish', ARGV[3], ARGV[1]) end
return added
"""
ENQUEUE_SHA = hashlib.sha1(ENQUEUE_LUA.encode()).hexdigest()
# arq's default: a job not started within a day of its due time is dropped.
EXPIRES_EXTRA_MS = 86_400_000


async def enqueue_many(
    queue: Queue, queue_name: str, jobs: list[tuple[str, str, tuple[Any, ...]]],
    defer_ms: int = 0,
) -> int:
    """Enqueue each (job id, function, args) due in `defer_ms` (negative: scored in the past,
    ahead of the jobs due now) and wake the queue's workers; returns how many were added (a
    job already queued or running, or whose result is kept, is not)."""
    if not jobs:
        return 0
    enqueued_at = timestamp_ms()
    score = enqueued_at + defer_ms
    keys: list[str] = []
    args: list[Any] = [score, defer_ms + EXPIRES_EXTRA_MS, wake_channel(queue_name)]
    for job_id, function, job_args in jobs:
        keys += [job_key_prefix + job_id, result_key_prefix + job_id]
        args += [job_id, serialize_job(function, job_args, {}, None, enqueued_at,
                                       serializer=serialize)]
    keys.append(queue_name)
    try:
        added = await queue.evalsha(ENQUEUE_SHA, len(keys), *keys, *args)
    except NoScriptError:  # the first call on this Redis (or after SCRIPT FLUSH): load it
        added = await queue.eval(ENQUEUE_LUA, len(keys), *keys, *args)
    return int(added)


async def enqueue_start_turn(queue: Queue, queue_name: str, turn_id: str) -> bool:
    """Ask a worker to start the turn if its conversation is ready for it; False when that job
    is already queued or running."""
    return await enqueue_starts(queue, queue_name, [turn_id]) == 1


async def enqueue_starts(queue: Queue, queue_name: str, turn_ids: list[str]) -> int:
    """enqueue_start_turn for many turns in one round trip; returns how many jobs were added."""
    return await enqueue_many(
        queue, queue_name, [(f"{START_TURN}:{t}", START_TURN, (t,)) for t in turn_ids]
    )


async def limit_job_claim(queue: ArqRedis, job_id: str, seconds: float) -> None:
    """Let arq's claim on a running job (its in-progress key) lapse after `seconds` instead of
    the worker-wide longest job timeout + 10 s: if the worker dies, another one takes the job
    again (it stays queued until it ends) that much sooner."""
    await queue.pexpire(in_progress_key_prefix + job_id, int(seconds * 1000))


# arq runs due jobs in score order (the time they are due). A webhook's check is scored this
# far in the past, so it runs before every start waiting in the queue: behind a burst of
# 10,000 starts it would otherwise wait minutes (docs/benchmarks.md, "Runs in flight").
CHECK_PRIORITY = timedelta(hours=1)


async def enqueue_check_turn(
    queue: Queue, queue_name: str, run_id: str, status: str | None = None
) -> None:
    """Ask a worker to check the run's turn now (Parallel told us the run changed, and to what
    status: a hint the check may use, never the truth it records)."""
    job = (f"{CHECK_TURN}:{run_id}", CHECK_TURN, (run_id, status))
    await enqueue_many(queue, queue_name, [job],
                       defer_ms=-int(CHECK_PRIORITY.total_seconds() * 1000))
