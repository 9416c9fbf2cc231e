"""The e2e benchmark's third arm: a minimal API and worker doing a turn's work with no guarantees.

The same work as the service (POST a turn, a worker creates its Parallel run chained to the
previous turn's interaction and waits for the result, a `?wait=` long-poll answers when it is
stored), the way a first version would do it: POST is one INSERT and one arq enqueue, the job
is one SDK create and one blocking `result()` call, then one UPDATE that NOTIFYs; GET is one
SELECT, and with `wait` a LISTEN wake-up and a second SELECT. No keys, quotas, rate limits,
leases, fencing, retries, events, webhooks, metrics or logs; stock arq polling every 10 ms (as
the service's worker did before it slept); the SDK on its aiohttp transport, as the service's
worker calls it. Beside the SDK loop (no service at all) and the service, it shows what the
service's guarantees cost.

    python -m bench.minimal api --port N    # both with the Settings in the environment
    python -m bench.minimal worker
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import asyncpg
import msgspec
from arq.connections import RedisSettings, create_pool
from arq.worker import Worker, func
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import NotFoundException

from bench.procs import Proc
from service.config import Settings
from service.devstack.processes import settings_env

CHANNEL = "minimal_turns"
TERMINAL = ("completed", "failed")

INSERT_SQL = """
INSERT INTO turn (id, conversation_id, tenant_id, seq, input, processor, output_schema)
SELECT $1, c.id, c.tenant_id,
       coalesce((SELECT max(seq) FROM turn WHERE conversation_id = c.id), 0) + 1,
       to_jsonb($2::text), 'lite', '{"type": "text"}'::jsonb
FROM conversation c WHERE c.id = $3
RETURNING id, conversation_id, status
"""
SELECT_SQL = "SELECT id, conversation_id, status, output FROM turn WHERE id = $1"
JOB_SQL = """
SELECT t.input #>> '{}' AS input,
       (SELECT p.interaction_id FROM turn p
        WHERE p.conversation_id = t.conversation_id AND p.seq = t.seq - 1) AS previous
FROM turn t WHERE t.id = $1
"""
DONE_SQL = f"""
WITH done AS (
    UPDATE turn SET status = $2, run_id = $3, interaction_id = $4, output = $5::jsonb,
                    completed_at = now()
    WHERE id = $1 RETURNING id
)
SELECT pg_notify('{CHANNEL}', id) FROM done
"""


def queue(settings: Settings) -> str:
    """A queue of its own: the service's worker, idle beside it, must not take these jobs."""
    return f"{settings.queue_name}:minimal"


class NewTurn(msgspec.Struct):
    input: str


def create_app(settings: Settings) -> Litestar:
    waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    def notified(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        for event in waiters.get(str(payload), ()):
            event.set()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.pool = await asyncpg.create_pool(
            settings.database_url, min_size=settings.db_pool_min, max_size=settings.db_pool_max
        )
        app.state.queue = await create_pool(RedisSettings.from_dsn(settings.redis_url))
        listener = await asyncpg.connect(settings.database_url)
        await listener.add_listener(CHANNEL, notified)
        try:
            yield
        finally:
            await listener.close()
            await app.state.queue.aclose()
            await app.state.pool.close()

    @post("/v1/conversations/{conversation_id:str}/turns", status_code=202)
    async def create(
        request: Request[Any, Any, Any], conversation_id: str, data: NewTurn
    ) -> dict[str, Any]:
        turn_id = f"turn_{secrets.token_hex(12)}"
        row = await request.app.state.pool.fetchrow(
            INSERT_SQL, turn_id, data.input, conversation_id
        )
        if row is None:
            raise NotFoundException()
        await request.app.state.queue.enqueue_job("run_turn", turn_id, _queue_name=queue(settings))
        return dict(row)

    @get("/v1/conversations/{conversation_id:str}/turns/{turn_id:str}")
    async def read(
        request: Request[Any, Any, Any], conversation_id: str, turn_id: str, wait: float = 0
    ) -> Response[dict[str, Any]]:
        pool = request.app.state.pool
        event = asyncio.Event()
        waiters[turn_id].add(event)  # before reading, so no commit goes unseen
        try:
            row = await pool.fetchrow(SELECT_SQL, turn_id)
            if row is not None and row["status"] not in TERMINAL and wait > 0:
                with suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), wait)
                row = await pool.fetchrow(SELECT_SQL, turn_id)
        finally:
            waiters[turn_id].discard(event)
            if not waiters[turn_id]:
                del waiters[turn_id]
        if row is None:
            raise NotFoundException()
        return Response(
            {**dict(row), "output": msgspec.json.decode(row["output"]) if row["output"] else None}
        )

    @get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return Litestar([create, read, healthz], lifespan=[lifespan], openapi_config=None,
                    logging_config=None)


async def run_turn(ctx: dict[str, Any], turn_id: str) -> None:
    pool: asyncpg.Pool = ctx["pool"]
    row = await pool.fetchrow(JOB_SQL, turn_id)
    assert row is not None, turn_id
    client = ctx["parallel"]
    try:
        run = await client.task_run.create(
            input=row["input"], processor="lite", previous_interaction_id=row["previous"]
        )
        result = await client.task_run.result(run.run_id, api_timeout=600)
        content = result.output.content
        output = msgspec.json.encode({"content": content if isinstance(content, str)
                                      else msgspec.json.encode(content).decode()}).decode()
        await pool.execute(DONE_SQL, turn_id, "completed", run.run_id, run.interaction_id, output)
    except Exception as exc:
        await pool.execute(DONE_SQL, turn_id, "failed", None, None,
                           msgspec.json.encode({"error": repr(exc)}).decode())


async def _startup(ctx: dict[str, Any]) -> None:
    from parallel import AsyncParallel, DefaultAioHttpClient

    settings: Settings = ctx["settings"]
    ctx["pool"] = await asyncpg.create_pool(
        settings.database_url, min_size=settings.db_pool_min, max_size=settings.db_pool_max
    )
    # The service's transport, so the difference is the guarantees, not httpx against aiohttp.
    ctx["parallel"] = AsyncParallel(
        api_key=settings.parallel_api_key, base_url=settings.parallel_base_url,
        http_client=DefaultAioHttpClient(),
    )


async def _shutdown(ctx: dict[str, Any]) -> None:
    await ctx["parallel"].close()
    await ctx["pool"].close()


def worker(settings: Settings) -> Worker:
    return Worker(
        functions=[func(run_turn, name="run_turn")],
        on_startup=_startup,
        on_shutdown=_shutdown,
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        queue_name=queue(settings),
        ctx={"settings": settings},
        poll_delay=0.01,
        max_jobs=1000,  # each job holds its slot while result() waits
        keep_result=0,
        job_timeout=600,
    )


def procs(settings: Settings, port: int) -> tuple[Proc, Proc]:
    """The minimal API on `port` and its worker, not started."""
    import sys

    argv = [sys.executable, "-m", "bench.minimal"]
    return (Proc("minimal-api", [*argv, "api", "--port", str(port)], settings_env(settings)),
            Proc("minimal-worker", [*argv, "worker"], settings_env(settings)))


def main() -> None:
    import logging

    import uvicorn
    import uvloop

    parser = argparse.ArgumentParser(prog="python -m bench.minimal")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("api").add_argument("--port", type=int, required=True)
    sub.add_parser("worker")
    args = parser.parse_args()
    settings = Settings.from_env()
    if args.what == "api":
        uvicorn.run(create_app(settings), host="127.0.0.1", port=args.port, log_config=None,
                    access_log=False, loop="uvloop", http="httptools")
    else:
        logging.basicConfig(level=logging.WARNING)  # arq's "Starting worker" is printed below
        asyncio.set_event_loop(uvloop.new_event_loop())
        print("Starting worker", flush=True)
        worker(settings).run()


if __name__ == "__main__":
    main()
