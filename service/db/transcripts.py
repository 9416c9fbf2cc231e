"""SQL for what a conversation's completed turns hold: their citations, and a turn's lineage.

Callers check the conversation is the tenant's first (service.db.conversations.get_conversation);
every query here also names the tenant, so a turn id of another tenant finds nothing.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from service.db.pool import Conn

# Each citation of each completed turn, in first-seen order: by the turn's seq, then its place
# in the basis (field by field, citation by citation). The jsonpath is lax, so a basis of an
# unexpected shape yields nothing rather than an error; a citation needs a string `url`.
CITATIONS_SQL = """
SELECT t.id AS turn_id, c.citation->>'url' AS url, c.citation->>'title' AS title,
    c.citation->'excerpts' AS excerpts
FROM turn t
CROSS JOIN LATERAL jsonb_path_query(
    t.basis, 'lax $[*].citations[*] ? (@.url.type() == "string")'
) WITH ORDINALITY AS c(citation, n)
WHERE t.conversation_id = $1 AND t.tenant_id = $2 AND t.status = 'completed'
ORDER BY t.seq, c.n
"""


async def list_citations(conn: Conn, tenant_id: str, conversation_id: str) -> list[asyncpg.Record]:
    """(turn_id, url, title, excerpts) of every citation of the conversation's completed turns,
    in first-seen order. Run it inside a transaction: it turns JIT off for that transaction."""
    # Postgres guesses 1,000 rows per jsonb_path_query call, so past a few hundred turns the
    # plan looks costly enough to JIT-compile: 0.7 s of compiling for a 0.1 s query of 10,000
    # turns (docs/design.md, "Sources and transcripts").
    await conn.execute("SET LOCAL jit = off")
    return await conn.fetch(CITATIONS_SQL, conversation_id, tenant_id)


TURN_STATUS_SQL = """
SELECT status FROM turn WHERE id = $1 AND conversation_id = $2 AND tenant_id = $3
"""


async def turn_status(conn: Conn, tenant_id: str, conversation_id: str, turn_id: str) -> str | None:
    """The turn's status, or None when the conversation has no such turn."""
    status: str | None = await conn.fetchval(TURN_STATUS_SQL, turn_id, conversation_id, tenant_id)
    return status


# Turns run in seq order, so the highest seq completed is also the last to complete.
NEWEST_COMPLETED_SQL = """
SELECT id FROM turn
WHERE conversation_id = $1 AND tenant_id = $2 AND status = 'completed'
ORDER BY seq DESC
LIMIT 1
"""


async def newest_completed(conn: Conn, tenant_id: str, conversation_id: str) -> str | None:
    turn_id: str | None = await conn.fetchval(NEWEST_COMPLETED_SQL, conversation_id, tenant_id)
    return turn_id


# Up the parent chain by id alone (a parent always has a lower seq: no cycles), then the
# completed turns of it with what a transcript shows, oldest first.
LINEAGE_SQL = """
WITH RECURSIVE lineage AS (
    SELECT id, parent_turn_id FROM turn WHERE id = $1 AND conversation_id = $2 AND tenant_id = $3
    UNION ALL
    SELECT t.id, t.parent_turn_id FROM turn t JOIN lineage l ON t.id = l.parent_turn_id
)
SELECT t.id, t.seq, t.input, t.output, t.basis
FROM turn t JOIN lineage USING (id)
WHERE t.status = 'completed'
ORDER BY t.seq
"""


async def lineage(
    conn: Conn, tenant_id: str, conversation_id: str, turn_id: str
) -> list[dict[str, Any]]:
    """The completed turns among `turn_id` and its ancestors, oldest first."""
    rows = await conn.fetch(LINEAGE_SQL, turn_id, conversation_id, tenant_id)
    return [dict(row) for row in rows]
