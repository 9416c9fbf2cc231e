"""The floor: a bare Litestar app doing the least the service's two hot routes must do.

POST inserts one turn row and enqueues its start job; GET selects one turn by primary key. Same
pool sizes, same serializer, same uvicorn settings as `research-service api`; no auth, no
conversation lock, no event, no logging (neither uvicorn's access log nor Litestar's).
`python -m bench.floor --port N` serves it with the settings in the environment
(BENCH_TENANT_ID names the tenant the rows belong to).
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import NotFoundException

from service import queue as jobs
from service.config import Settings
from service.db import turns as db
from service.db.pool import create_pool
from service.models import Turn

INSERT_SQL = f"""
INSERT INTO turn AS t (id, conversation_id, tenant_id, seq, input, processor, output_schema)
VALUES ($1, $2, $3, $4, $5, 'lite', '{{"type": "text"}}'::jsonb)
RETURNING {db.TURN_COLUMNS}
"""
SELECT_SQL = f"SELECT {db.TURN_COLUMNS} FROM turn t WHERE t.id = $1"


class FloorTurn(msgspec.Struct):
    input: str


def create_floor_app(settings: Settings, tenant_id: str) -> Litestar:
    seqs = itertools.count(1_000_000)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.pool = await create_pool(
            settings.database_url, min_size=settings.db_pool_min, max_size=settings.db_pool_max
        )
        app.state.queue = await jobs.create_queue(settings.redis_url)
        try:
            yield
        finally:
            await app.state.queue.aclose()
            await app.state.pool.close()

    @post("/v1/conversations/{conversation_id:str}/turns", status_code=202)
    async def create(
        request: Request[Any, Any, Any], conversation_id: str, data: FloorTurn
    ) -> Response[Turn]:
        turn_id = f"turn_{secrets.token_hex(12)}"
        row = await request.app.state.pool.fetchrow(
            INSERT_SQL, turn_id, conversation_id, tenant_id, next(seqs), data.input
        )
        await jobs.enqueue_start_turn(request.app.state.queue, settings.queue_name, turn_id)
        turn = db.to_turn(row)
        return Response(
            turn,
            status_code=202,
            headers={"Location": f"/v1/conversations/{conversation_id}/turns/{turn_id}"},
        )

    @get("/v1/conversations/{conversation_id:str}/turns/{turn_id:str}")
    async def read(request: Request[Any, Any, Any], conversation_id: str, turn_id: str) -> Turn:
        row = await request.app.state.pool.fetchrow(SELECT_SQL, turn_id)
        if row is None:
            raise NotFoundException()
        return db.to_turn(row)

    @get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # No logging at all (the service logs a line per request; the floor does the least).
    return Litestar([create, read, healthz], lifespan=[lifespan], openapi_config=None,
                    logging_config=None)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = create_floor_app(Settings.from_env(), os.environ["BENCH_TENANT_ID"])
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
        proxy_headers=True,
    )


if __name__ == "__main__":
    main()
