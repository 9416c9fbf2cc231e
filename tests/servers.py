"""Where the tests' PostgreSQL and Redis come from: the environment, testcontainers, or embedded.

Order: TEST_DATABASE_URL / TEST_REDIS_URL when set (CI sets them); else testcontainers when a
Docker engine answers; else the embedded servers (service.devstack, from the devstack extra,
imported only when used). Never a mock.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from service.devstack import docker_available


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
