"""Finding conversations: GET /v1/conversations?status=&metadata.<key>=<value>, filters ANDed,
newest first, paged, one tenant's only, and served by indexes (EXPLAIN on loaded tables)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from service.db.conversations import list_conversations_query
from tests.helpers import assert_problem, counts, create_conversation, new_key, post_turn


async def listed(api, **params: Any) -> list[str]:
    """Every conversation id the filters list, page after page (two per page)."""
    ids: list[str] = []
    cursor = None
    for _ in range(50):
        query = {**params, "limit": 2, **({"cursor": cursor} if cursor else {})}
        response = await api.get("/v1/conversations", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["data"]) <= 2
        ids += [c["id"] for c in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids
    raise AssertionError("more than 50 pages")


async def test_metadata_pairs_are_anded_newest_first(api):
    a = await create_conversation(api, metadata={"customer": "c1", "region": "eu"})
    b = await create_conversation(api, metadata={"customer": "c1", "region": "us", "x": "y"})
    c = await create_conversation(api, metadata={"customer": "c2", "region": "eu"})
    await create_conversation(api)
    assert await listed(api, **{"metadata.customer": "c1"}) == [b["id"], a["id"]]
    assert await listed(api, **{"metadata.region": "eu"}) == [c["id"], a["id"]]
    assert await listed(api, **{"metadata.customer": "c1", "metadata.region": "eu"}) == [a["id"]]
    assert await listed(api, **{"metadata.customer": "c2", "metadata.region": "us"}) == []
    assert await listed(api, **{"metadata.customer": "c3"}) == []
    # A value is matched whole, as a string: no prefix or case folding.
    assert await listed(api, **{"metadata.customer": "c"}) == []
    assert await listed(api, **{"metadata.customer": "C1"}) == []
    page = (await api.get("/v1/conversations", params={"metadata.x": "y"})).json()
    assert page == {"data": [(await api.get(f"/v1/conversations/{b['id']}")).json()],
                    "next_cursor": None}


async def test_keys_and_values_are_read_as_sent(api):
    odd = await create_conversation(api, metadata={"a.b c": "x&y=z", "é": ""})
    await create_conversation(api, metadata={"a": "x"})
    assert await listed(api, **{"metadata.a.b c": "x&y=z"}) == [odd["id"]]
    assert await listed(api, **{"metadata.é": ""}) == [odd["id"]]
    assert await listed(api, **{"metadata.a": ""}) == []


async def test_status_filters_and_combines_with_metadata(api):
    idle_1 = await create_conversation(api, metadata={"team": "risk"})
    active_1 = await create_conversation(api, metadata={"team": "risk"})
    idle_2 = await create_conversation(api, metadata={"team": "ops"})
    active_2 = await create_conversation(api, metadata={"team": "ops"})
    for conversation in (active_1, active_2):  # no worker: the turns stay queued
        await post_turn(api, conversation["id"], "still open")
    assert await listed(api, status="active") == [active_2["id"], active_1["id"]]
    assert await listed(api, status="idle") == [idle_2["id"], idle_1["id"]]
    assert await listed(api, status="active", **{"metadata.team": "risk"}) == [active_1["id"]]
    assert await listed(api, status="idle", **{"metadata.team": "ops"}) == [idle_2["id"]]
    for item in (await api.get("/v1/conversations", params={"status": "active"})).json()["data"]:
        assert item["status"] == "active"
    # A cancelled turn is not open: the conversation is idle again.
    turn = (await api.get(f"/v1/conversations/{active_1['id']}/turns")).json()["data"][0]
    cancel = await api.post(f"/v1/conversations/{active_1['id']}/turns/{turn['id']}/cancel")
    assert cancel.status_code == 200
    assert await listed(api, status="active") == [active_2["id"]]
    assert await listed(api, status="idle", **{"metadata.team": "risk"}) == [
        active_1["id"], idle_1["id"]]


async def test_filtered_pages_follow_the_cursor_to_the_end(api):
    wanted = []
    for n in range(9):
        conversation = await create_conversation(
            api, metadata={"case": "k9", "n": str(n)} if n % 3 else {"case": "other"})
        if n % 3:
            wanted.append(conversation["id"])
        if n in (1, 5, 7):
            await post_turn(api, conversation["id"], "open")
    assert await listed(api, **{"metadata.case": "k9"}) == wanted[::-1]
    # The statuses page too; a filtered page is never padded with others.
    active = await listed(api, status="active", **{"metadata.case": "k9"})
    idle = await listed(api, status="idle", **{"metadata.case": "k9"})
    assert sorted(active + idle) == sorted(wanted) and len(active) == 3


async def test_another_tenants_conversations_never_appear(api, client, resources):
    ours = await create_conversation(api, metadata={"customer": "shared"})
    await post_turn(api, ours["id"], "open")
    theirs_key = await new_key(resources, "globex")
    headers = {"Authorization": f"Bearer {theirs_key}"}
    theirs = (await client.post("/v1/conversations", headers=headers,
                                json={"metadata": {"customer": "shared"}})).json()
    for params in ({"metadata.customer": "shared"}, {"status": "active"}, {"status": "idle"},
                   {"status": "idle", "metadata.customer": "shared"}, {}):
        mine = (await api.get("/v1/conversations", params=params)).json()["data"]
        other = (await client.get("/v1/conversations", params=params, headers=headers)).json()
        assert theirs["id"] not in {c["id"] for c in mine}, params
        assert ours["id"] not in {c["id"] for c in other["data"]}, params
    assert await listed(api, **{"metadata.customer": "shared"}) == [ours["id"]]


@pytest.mark.parametrize(("query", "status"), [
    ("status=busy", 422),
    ("status=", 422),
    ("status=ACTIVE", 422),
    ("metadata.=x", 422),
    ("metadata.a-key-longer-than-16=x", 422),
    ("metadata.k=" + "v" * 513, 422),
    ("metadata.k=1&metadata.k=2", 422),
    ("metadata.k=1&metadata.k=1", 422),
    ("&".join(f"metadata.k{n}=v" for n in range(17)), 422),
    ("metadata.k=%00", 400),
    ("metadata.k%00=v", 400),
    ("metadata.k=%FF", 400),
    ("metadata.k=v&limit=0", 422),
])
async def test_bad_filters_are_refused_and_write_nothing(api, database_url, query, status):
    await create_conversation(api, metadata={"k": "v"})
    before = await counts(database_url)
    body = assert_problem(await api.get(f"/v1/conversations?{query}"), status)
    if status == 422:
        assert body["errors"] and all(e.get("source") == "query" for e in body["errors"])
    assert await counts(database_url) == before


async def test_filters_at_their_limits_are_accepted(api):
    key, value = "k" * 16, "v" * 512
    full = {f"k{n}": "v" for n in range(15)} | {key: value}
    conversation = await create_conversation(api, metadata=full)
    params = {f"metadata.{k}": v for k, v in full.items()}
    assert await listed(api, **params) == [conversation["id"]]


# --- the plans -------------------------------------------------------------------------------

LOADED = 20_000  # conversations per tenant: enough for the planner's choice to mean something

LOAD_SQL = """
INSERT INTO conversation (id, tenant_id, processor, metadata, created_at)
SELECT 'cl_' || t.n || '_' || g, t.id, 'lite',
       jsonb_build_object('user', 'u' || g, 'plan', 'p' || (g % 10)),
       now() - make_interval(secs => g)
FROM generate_series(1, $2::int) g, (SELECT id, row_number() OVER () AS n FROM tenant
                                   WHERE id = ANY($1::text[])) t
"""
# A completed turn in each, and a second one open in a few per tenant (the per-tenant limit
# keeps open turns few in production).
TURNS_SQL = """
INSERT INTO turn (id, conversation_id, tenant_id, seq, input, processor, output_schema, status)
SELECT 'tl_' || c.id || '_' || k, c.id, c.tenant_id, k, '"q"', 'lite', '{"type": "text"}',
       CASE k WHEN 1 THEN 'completed' ELSE 'queued' END
FROM conversation c, generate_series(1, 2) k
WHERE c.id LIKE 'cl\\_%' AND (k = 1 OR split_part(c.id, '_', 3)::int % 997 = 0)
"""


def scans(plan: dict[str, Any]) -> list[str]:
    """Every scan of the plan, as `<node type> on <table>[ using <index>]`."""
    found = []
    if "Relation Name" in plan or "Index Name" in plan:  # a Bitmap Index Scan names no table
        index = f" using {plan['Index Name']}" if "Index Name" in plan else ""
        found.append(f"{plan['Node Type']} on {plan.get('Relation Name', '')}{index}")
    for child in plan.get("Plans", []):
        found += scans(child)
    return found


def literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    text = json.dumps(value) if isinstance(value, dict) else str(value)
    return "'" + text.replace("'", "''") + "'"


async def explain(conn: asyncpg.Connection, sql: str, args: list[Any]) -> dict[str, list[str]]:
    """The scans of the statement's plans as the API's prepared statement may get them: the
    custom plan for the values, and the generic plan (after five executions Postgres compares
    its estimated cost with the custom plans' and keeps the cheaper)."""
    custom = await (await conn.prepare(sql)).explain(*args)
    await conn.execute(f"PREPARE listed AS {sql}")
    try:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        generic = json.loads(await conn.fetchval(
            f"EXPLAIN (FORMAT JSON) EXECUTE listed({', '.join(map(literal, args))})"))
    finally:
        await conn.execute("DEALLOCATE listed; RESET plan_cache_mode")
    return {"custom": scans(custom[0]["Plan"]), "generic": scans(generic[0]["Plan"])}


@pytest.fixture
async def loaded(api, resources, database_url) -> asyncpg.Connection:
    """Two tenants with LOADED conversations each, a few of them active, analyzed."""
    await new_key(resources, "globex")
    conn = await asyncpg.connect(database_url)
    # As the service's pool does (service.db.pool): jsonb arguments are Python values.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")
    tenants = [r["id"] for r in await conn.fetch("SELECT id FROM tenant ORDER BY name")]
    await conn.execute(LOAD_SQL, tenants, LOADED)
    await conn.execute(TURNS_SQL)
    await conn.execute("ANALYZE conversation; ANALYZE turn")
    yield conn
    await conn.close()


async def test_every_filter_is_served_by_an_index(loaded, api):
    tenant = await loaded.fetchval("SELECT id FROM tenant WHERE name = 'acme'")
    user = {"user": "u12345"}
    two = {"user": "u12345", "plan": "p5"}
    # The index each filter is read by (both serve `active` with metadata: which one the
    # planner starts from depends on the sampled statistics).
    expected = {
        (None, None): {"conversation_tenant_created_idx"},
        (None, json.dumps(user)): {"conversation_metadata_idx"},
        (None, json.dumps(two)): {"conversation_metadata_idx"},
        ("active", None): {"turn_tenant_open_idx"},
        ("idle", None): {"turn_open_idx"},
        ("active", json.dumps(user)): {"turn_tenant_open_idx", "conversation_metadata_idx"},
        ("idle", json.dumps(user)): {"conversation_metadata_idx"},
    }
    for (status, metadata), indexes in expected.items():
        sql, args = list_conversations_query(
            tenant, None, 21, status, json.loads(metadata) if metadata else None)
        found = await explain(loaded, sql, args)
        # The plan for these values reads the filter's index; neither plan reads a whole table
        # (a generic plan knows no values: it may walk the tenant's index, and Postgres only
        # keeps it when its estimate is no worse than the custom plans').
        assert any(s.rsplit(" using ", 1)[-1] in indexes for s in found["custom"]
                   if " using " in s), (status, metadata, found["custom"])
        assert not [s for s in found["custom"] + found["generic"] if s.startswith("Seq Scan")
                    ], (status, metadata, found)
    # The API answers the same filters (and one user's conversation is found among 40,000).
    page = (await api.get("/v1/conversations", params={"metadata.user": "u12345"})).json()
    assert [c["id"] for c in page["data"]] == ["cl_1_12345"]

    # Without the GIN index the metadata filter has nothing but a walk of the tenant's rows.
    await loaded.execute("DROP INDEX conversation_metadata_idx")
    await loaded.execute("ANALYZE conversation")
    sql, args = list_conversations_query(tenant, None, 21, None, user)
    assert not any("conversation_metadata_idx" in s
                   for s in (await explain(loaded, sql, args))["custom"])


async def test_new_conversations_metadata_is_searchable_without_a_pending_list(api, database_url):
    # GIN's pending list (fastupdate) would keep new entries outside the index until a vacuum,
    # and every search would scan them one by one: after 100,000 creations, 6.9 ms against
    # 0.04 ms per search (migration 0013).
    for n in range(300):
        await create_conversation(api, metadata={"customer": f"cu_{n}", "note": "x" * 200})
    conn = await asyncpg.connect(database_url)
    try:
        pending = await conn.fetchval(
            "SELECT gin_clean_pending_list('conversation_metadata_idx'::regclass)")
    finally:
        await conn.close()
    assert pending == 0, f"{pending} pages of new entries were waiting outside the index"
