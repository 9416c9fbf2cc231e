"""The API keeps verified keys in memory; a revoked or changed key must still be refused at once.

Keys are kept only while the process's LISTEN connection is up; the api_key_changed trigger
(migration 0004) tells it of every change on commit.
"""

from __future__ import annotations

import asyncio

import pytest

from service.db.keys import create_key, revoke_key, split_key
from service.domain.keycache import KeyCache
from service.resources import Resources
from tests.helpers import assert_problem, forgotten, new_key


async def listening(resources: Resources) -> None:
    hub = resources.hub
    assert hub is not None
    for _ in range(200):
        if hub.connected:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the LISTEN connection did not come up")


async def cached_key(client, resources: Resources) -> tuple[str, dict[str, str]]:
    """A new key, used once so that the API keeps it."""
    await listening(resources)
    key = await new_key(resources, "acme")
    headers = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/v1/conversations", headers=headers)).status_code == 200
    return key, headers


async def test_a_cached_key_is_refused_once_its_revocation_is_committed(client, resources):
    # The revoking process (here the test itself) and the API share nothing but Postgres: the
    # notification is what tells the API, within milliseconds of the commit.
    for _ in range(5):
        key, headers = await cached_key(client, resources)
        assert split_key(key) in resources.keys
        async with resources.pool.acquire() as conn:
            assert await revoke_key(conn, split_key(key))
        assert await forgotten(resources, key) < 0.5
        assert_problem(await client.get("/v1/conversations", headers=headers), 401)


async def test_keys_are_served_from_memory_and_the_trigger_is_what_keeps_that_honest(
    client, resources
):
    key, headers = await cached_key(client, resources)
    # Without the trigger, a revocation goes unnoticed by the cache: proof that it is used.
    await resources.pool.execute("ALTER TABLE api_key DISABLE TRIGGER api_key_changed")
    async with resources.pool.acquire() as conn:
        assert await revoke_key(conn, split_key(key))
    assert (await client.get("/v1/conversations", headers=headers)).status_code == 200
    # Losing the LISTEN connection (notifications may have been missed) distrusts every entry.
    hub = resources.hub
    assert hub is not None
    epoch = hub.epoch
    await resources.pool.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE query LIKE 'LISTEN%' AND datname = current_database()"
    )
    for _ in range(100):
        if hub.epoch != epoch:
            break
        await asyncio.sleep(0.02)
    assert hub.epoch != epoch
    assert_problem(await client.get("/v1/conversations", headers=headers), 401)


async def test_without_a_listening_connection_every_request_reads_postgres(client, resources):
    key, headers = await cached_key(client, resources)
    resources.keys = KeyCache(None)
    assert (await client.get("/v1/conversations", headers=headers)).status_code == 200
    await resources.pool.execute("ALTER TABLE api_key DISABLE TRIGGER api_key_changed")
    async with resources.pool.acquire() as conn:
        assert await revoke_key(conn, split_key(key))
    assert_problem(await client.get("/v1/conversations", headers=headers), 401)


async def test_a_new_rate_limit_applies_to_a_cached_key_at_once(client, resources):
    await listening(resources)
    async with resources.pool.acquire() as conn:
        key_id, key = await create_key(conn, "acme", rate_limit_per_min=100)  # exact: no leases
    headers = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/v1/conversations", headers=headers)).status_code == 200
    assert key_id in resources.keys
    await resources.pool.execute("UPDATE api_key SET rate_limit_per_min = 2 WHERE id = $1", key_id)
    await forgotten(resources, key)
    assert (await client.get("/v1/conversations", headers=headers)).status_code == 200
    assert_problem(await client.get("/v1/conversations", headers=headers), 429)


async def test_a_wrong_secret_for_a_cached_key_id_is_refused(client, resources):
    key, _ = await cached_key(client, resources)
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert_problem(
        await client.get("/v1/conversations", headers={"Authorization": f"Bearer {forged}"}), 401
    )


@pytest.mark.parametrize("statement", ["DELETE FROM api_key WHERE id = $1",
                                       "UPDATE api_key SET revoked_at = now() WHERE id = $1"])
async def test_any_change_to_the_key_row_reaches_the_cache(client, resources, statement):
    key, headers = await cached_key(client, resources)
    await resources.pool.execute(statement, split_key(key))
    await forgotten(resources, key)
    assert_problem(await client.get("/v1/conversations", headers=headers), 401)


async def test_an_entry_is_trusted_for_its_ttl_at_most(client, resources):
    # The bound for a LISTEN connection that looks up but silently stopped delivering.
    await listening(resources)
    now = [1000.0]  # the cache's clock, moved by hand: the test does not depend on timing
    resources.keys = KeyCache(resources.hub, ttl_s=10, clock=lambda: now[0])
    key = await new_key(resources, "acme")
    headers = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/v1/conversations", headers=headers)).status_code == 200
    await resources.pool.execute("ALTER TABLE api_key DISABLE TRIGGER api_key_changed")
    async with resources.pool.acquire() as conn:
        assert await revoke_key(conn, split_key(key))
    now[0] += 9.9
    assert (await client.get("/v1/conversations", headers=headers)).status_code == 200
    now[0] += 0.2
    assert_problem(await client.get("/v1/conversations", headers=headers), 401)
