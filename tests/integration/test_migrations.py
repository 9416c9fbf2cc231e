"""Migrations apply from empty, twice is a no-op, and two processes at once don't collide."""

from __future__ import annotations

import asyncio

import asyncpg

from service.db.migrate import load_migrations, migrate
from tests.helpers import with_database


async def test_migrate_from_empty_is_idempotent_and_safe_concurrently(pg_admin_url):
    name = "research_migrate_test"
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = with_database(pg_admin_url, name)
        results = await asyncio.gather(migrate(url), migrate(url))
        names = [n for _, n, _ in load_migrations()]
        assert sorted(results, key=len) == [[], names]
        assert await migrate(url) == []
        conn = await asyncpg.connect(url)
        try:
            tables = {r["tablename"] for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        finally:
            await conn.close()
        assert {"tenant", "api_key", "conversation", "turn", "event", "schema_migration"} <= tables
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
