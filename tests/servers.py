"""Where the tests' PostgreSQL and Redis come from: the environment, testcontainers, or embedded.

Order: TEST_DATABASE_URL / TEST_REDIS_URL when set (CI sets them); else testcontainers when a
Docker engine answers; else the embedded servers (service.devstack, from the devstack extra,
imported only when used). Never a mock. Also here: the migrated template that each test's
database is cloned from, and servers of a test's own for the tests that stop them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg

from service.db.migrate import migrate
from service.devstack import docker_available, free_port
from tests.helpers import with_database

if TYPE_CHECKING:
    from service.devstack import EmbeddedPostgres, EmbeddedRedis


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yield an admin DSN of a server the tests may create databases on."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield url
        return
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    from service.devstack import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="test-pg-") as folder:
        server = EmbeddedPostgres(Path(folder))
        try:
            yield server.start()
        finally:
            server.stop()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    if url := os.environ.get("TEST_REDIS_URL"):
        yield url
        return
    if docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as redis:
            host, port = redis.get_container_host_ip(), redis.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    with own_redis_server() as url:
        yield url


@contextlib.contextmanager
def own_redis_server() -> Iterator[str]:
    """A Redis server of the caller's own (embedded, on a free port), whatever TEST_REDIS_URL says:
    for tests that wipe or stop Redis without touching anyone else's data."""
    from service.devstack import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="test-redis-") as folder:
        server = EmbeddedRedis(Path(folder))
        try:
            yield server.start()
        finally:
            server.stop()


@contextlib.contextmanager
def own_redis() -> Iterator[EmbeddedRedis]:
    """An embedded Redis of the caller's own that the test may stop and start again."""
    from service.devstack import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="outage-redis-") as folder:
        server = EmbeddedRedis(Path(folder), port=free_port())
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextlib.asynccontextmanager
async def own_postgres(**server_settings: str) -> AsyncIterator[EmbeddedPostgres]:
    """An embedded, migrated PostgreSQL of the caller's own that the test may stop or slow."""
    from service.devstack import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="outage-pg-") as folder:
        server = EmbeddedPostgres(Path(folder), port=free_port(), settings=server_settings)
        url = server.start()
        try:
            await migrate(url)
            yield server
        finally:
            server.stop()


# One template per pytest process: migrated once, cloned for each test's database.
TEMPLATE_DB = f"research_template_{os.getpid()}"


async def create_template(admin_url: str) -> None:
    await drop_database(admin_url, TEMPLATE_DB)
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    finally:
        await conn.close()
    await migrate(with_database(admin_url, TEMPLATE_DB))


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def clone_template(admin_url: str, name: str) -> str:
    """Create database `name` from the migrated template; returns its URL."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    finally:
        await conn.close()
    return with_database(admin_url, name)
