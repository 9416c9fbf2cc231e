"""Migrations apply from empty, twice is a no-op, and two processes at once don't collide; the SQL
functions they leave are ones the planner inlines."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import asyncpg

from service.db.migrate import (
    CREATE_TABLE_SQL,
    RECORD_MIGRATION_SQL,
    load_migrations,
    migrate,
)
from tests.helpers import with_database


@contextlib.asynccontextmanager
async def empty_database(pg_admin_url: str, name: str) -> AsyncIterator[str]:
    """A new empty database's URL, dropped afterwards."""
    admin = await asyncpg.connect(pg_admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield with_database(pg_admin_url, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_migrate_from_empty_is_idempotent_and_safe_concurrently(pg_admin_url):
    async with empty_database(pg_admin_url, "research_migrate_test") as url:
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


async def test_turns_that_had_a_run_get_their_context_from_previous_interaction_id(pg_admin_url):
    async with empty_database(pg_admin_url, "research_migrate_context_test") as url:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(CREATE_TABLE_SQL)
            for version, file, sql in load_migrations():
                if version < 9:  # the schema as it was before the turn's context
                    await conn.execute(sql)
                    await conn.execute(RECORD_MIGRATION_SQL, version, file)
            await conn.execute("INSERT INTO tenant (id, name) VALUES ('t', 't')")
            await conn.execute("INSERT INTO conversation (id, tenant_id, processor)"
                               " VALUES ('c', 't', 'lite')")
            turns = [  # id, status, run_id, previous_interaction_id
                ("first", "completed", "trun_1", None), ("second", "completed", "trun_2", "i1"),
                ("refused", "failed", None, "i2"), ("waiting", "queued", None, "i2"),
            ]
            for seq, (turn, status, run, previous) in enumerate(turns, 1):
                await conn.execute(
                    "INSERT INTO turn (id, conversation_id, tenant_id, seq, input, processor,"
                    " output_schema, status, run_id, previous_interaction_id)"
                    " VALUES ($1, 'c', 't', $2, '\"q\"', 'lite', '{}', $3, $4, $5)",
                    turn, seq, status, run, previous)
            assert "0009_turn_context.sql" in await migrate(url)  # and any later ones
            contexts = dict(await conn.fetch("SELECT id, context FROM turn"))
        finally:
            await conn.close()
        assert contexts == {"first": "none", "second": "chained", "refused": None,
                            "waiting": None}


async def test_sql_functions_are_single_expressions_the_planner_inlines(database_url):
    """A LANGUAGE sql function that is one SELECT of an expression is inlined where it is
    called; any other (a FROM, a lock, a data-modifying statement, a set result) is parsed and
    planned again on every call, so the transitions' helpers that are statements are plpgsql,
    whose plans a session keeps (migration 0016)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT p.proname, p.prosrc, p.proretset FROM pg_proc p"
            " JOIN pg_language l ON l.oid = p.prolang"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'public' AND l.lanname = 'sql'")
    finally:
        await conn.close()
    assert {"quota_is_open", "turn_data", "api_time"} <= {r["proname"] for r in rows}
    statement = re.compile(r"\b(FROM|UPDATE|INSERT|DELETE|WITH|FOR)\b", re.IGNORECASE)
    not_inlined = sorted(
        r["proname"] for r in rows
        if r["proretset"] or ";" in r["prosrc"].strip().rstrip(";")
        or not r["prosrc"].strip().upper().startswith("SELECT")
        or statement.search(re.sub(r"'[^']*'", "''", r["prosrc"]))
    )
    assert not_inlined == []
