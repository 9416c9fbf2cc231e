"""The asyncpg pool, with jsonb decoded and encoded by msgspec."""

from __future__ import annotations

import asyncpg
import msgspec

_encoder = msgspec.json.Encoder()


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: _encoder.encode(value).decode(),
        decoder=msgspec.json.decode,
        format="text",
    )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Release without asyncpg's reset query (UNLISTEN, RESET ALL, advisory unlocks, CLOSE ALL):
    pool connections never carry session state here (LISTEN and advisory locks use connections
    of their own), and that query is one more round trip on every pool.fetch*/acquire. asyncpg
    still rolls back a transaction left open before calling this."""


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    """Open a pool whose connections speak jsonb as Python values."""
    return await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, command_timeout=30,
        reset=_keep_session,
    )


# What asyncpg raises when Postgres is down, restarting, or dropped our connection.
DB_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    TimeoutError,
)
