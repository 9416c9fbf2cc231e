"""Apply service/db/migrations/NNNN_name.sql in order, once each, under an advisory lock."""

from __future__ import annotations

import re
from importlib import resources

import asyncpg

MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any constant works; two processes migrating at once queue on it instead of racing.
LOCK_KEY = 7_411_202_611

CREATE_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS schema_migration (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""

RECORD_MIGRATION_SQL = "INSERT INTO schema_migration (version, name) VALUES ($1, $2)"


def load_migrations() -> list[tuple[int, str, str]]:
    """Return (version, file name, sql) for every migration file, sorted by version."""
    folder = resources.files("service.db") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


async def migrate(dsn: str) -> list[str]:
    """Apply pending migrations; return the names applied. Safe to run concurrently."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        try:
            await conn.execute(CREATE_TABLE_SQL)
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migration")}
            applied = []
            for version, name, sql in load_migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(RECORD_MIGRATION_SQL, version, name)
                applied.append(name)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await conn.close()
