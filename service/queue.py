"""Job names, the msgpack serializer pair, the queue protocol and typed enqueue helpers (the API
and the worker share them).

Jobs carry ids only; Postgres holds the state. Each job id is "<job>:<entity id>", so arq
refuses a duplicate while one is queued, and the worker treats every job as possibly run twice.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import timedelta
from typing import Any, Protocol

import msgspec
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix
from redis.exceptions import RedisError

START_TURN = "start_turn"
CHECK_TURN = "check_turn"
RECONCILE = "reconcile"
SWEEP_EXPIRED = "sweep_expired"
REPAIR_QUOTAS = "repair_quotas"

# What redis-py and arq raise when Redis is down, refusing connections or too slow: a caller
# whose write already committed logs it and lets the reconciler repair the queue later.
QUEUE_UNAVAILABLE: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)



class Queue(Protocol):
    """What service.domain needs of the queue (an arq Redis pool is one): enqueue a job, and
    set a key with an expiry. The domain is typed against this, so it imports no arq."""

    async def enqueue_job(self, function: str, *args: Any, **kwargs: Any) -> object | None: ...

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


async def enqueue_start_turn(queue: Queue, queue_name: str, turn_id: str) -> bool:
    """Ask a worker to start the turn if its conversation is ready for it; False when that job
    is already queued or running."""
    job = await queue.enqueue_job(
        START_TURN, turn_id, _job_id=f"{START_TURN}:{turn_id}", _queue_name=queue_name
    )
    return job is not None


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
    await queue.enqueue_job(
        CHECK_TURN, run_id, status, _job_id=f"{CHECK_TURN}:{run_id}", _queue_name=queue_name,
        _defer_by=-CHECK_PRIORITY,
    )
