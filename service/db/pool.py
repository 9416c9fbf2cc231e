"""The asyncpg pool, with jsonb decoded and encoded by msgspec, and a deadline on every wait.

Every connection carries server-side deadlines for its role (`DbDeadlines`): `statement_timeout`,
`lock_timeout`, `idle_in_transaction_session_timeout` and TCP keepalives, sent in the startup
packet, so a slow Postgres, a lock held by a frozen peer or a client that froze inside a
transaction costs its own request and ends on the server's clock. Every `acquire` (and so every
`pool.fetch*`/`execute`, which acquire) waits for a connection at most `acquire_timeout_s`.
"""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

# What the SQL functions run on: a connection of their own, or one held from the pool (which
# asyncpg hands out as a proxy forwarding to the connection).
Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy

_encoder = msgspec.json.Encoder()


class DbDeadlines(msgspec.Struct, frozen=True, kw_only=True):
    """How long each kind of wait on Postgres may last for one role (API or worker)."""

    acquire_timeout_s: float = 2.0
    statement_timeout_s: float = 5.0
    lock_timeout_s: float = 2.0
    idle_in_transaction_timeout_s: float = 15.0
    # Server-side TCP keepalives: the first probe after this idle time, then 3 more 10 s apart.
    tcp_keepalives_idle_s: int = 30
    application_name: str = "research-service"

    def server_settings(self) -> dict[str, str]:
        """The session settings Postgres applies to each connection from its first statement."""
        return {
            "statement_timeout": _ms(self.statement_timeout_s),
            "lock_timeout": _ms(self.lock_timeout_s),
            "idle_in_transaction_session_timeout": _ms(self.idle_in_transaction_timeout_s),
            "tcp_keepalives_idle": str(self.tcp_keepalives_idle_s),
            "tcp_keepalives_interval": "10",
            "tcp_keepalives_count": "3",
            "application_name": self.application_name,
        }

    @property
    def command_timeout_s(self) -> float:
        # The client's own deadline per statement, for a server that does not answer at all (a
        # partition, a frozen host): the server's statement_timeout plus a margin.
        return self.statement_timeout_s + 1.0


def _ms(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))  # 0 would mean "no limit"


class DeadlinePool(asyncpg.Pool):
    """An asyncpg Pool whose acquire() has a default timeout, so no caller waits unbounded."""

    # create_pool sets it before the pool opens.
    acquire_timeout_s: float = DbDeadlines().acquire_timeout_s

    def acquire(self, *, timeout: float | None = None) -> asyncpg.pool.PoolAcquireContext:
        return super().acquire(timeout=self.acquire_timeout_s if timeout is None else timeout)


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


async def create_pool(
    dsn: str, *, min_size: int = 2, max_size: int = 10, deadlines: DbDeadlines | None = None
) -> asyncpg.Pool:
    """Open a pool whose connections speak jsonb as Python values, `deadlines` on every wait."""
    deadlines = deadlines or DbDeadlines()
    pool = DeadlinePool(
        dsn, min_size=min_size, max_size=max_size, max_queries=50_000,
        max_inactive_connection_lifetime=300.0, init=_init_connection, reset=_keep_session,
        loop=None, connection_class=asyncpg.Connection, record_class=asyncpg.Record,
        command_timeout=deadlines.command_timeout_s,
        # Opening a connection (at start-up, or a replacement) is bounded too.
        timeout=max(deadlines.acquire_timeout_s, 5.0),
        server_settings=deadlines.server_settings(),
    )
    pool.acquire_timeout_s = deadlines.acquire_timeout_s
    return await pool


# What asyncpg raises when Postgres is down, restarting, out of connections, too slow for a
# deadline, or dropped our connection: "database unavailable", a 503 in the API and a retry in
# the worker.
DB_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    # `too many clients` (53300), and the other "server out of resources" answers.
    asyncpg.TooManyConnectionsError,
    asyncpg.InsufficientResourcesError,
    # statement_timeout (57014) and lock_timeout (55P03) ended a wait.
    asyncpg.QueryCanceledError,
    asyncpg.LockNotAvailableError,
    # The server ended our session: we sat idle inside a transaction too long (a frozen process).
    asyncpg.IdleInTransactionSessionTimeoutError,
    TimeoutError,
)
