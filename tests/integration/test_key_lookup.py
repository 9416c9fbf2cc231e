"""A key is looked up in one place (service.db.keys.authenticate_key, which the key cache
keeps): a wrong secret for a real key id is refused on a first request as well as a cached one,
and a refused key leaves nothing behind that would let the right one fail or a wrong one pass."""

from __future__ import annotations

from service.db.keys import authenticate_key, revoke_key, split_key
from service.resources import Resources
from tests.helpers import assert_problem, new_key


def forge(key: str) -> str:
    return key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")


async def test_a_wrong_secret_for_a_key_never_used_is_refused(client, resources: Resources):
    key = await new_key(resources, "acme")
    forged = {"Authorization": f"Bearer {forge(key)}"}
    assert_problem(await client.get("/v1/conversations", headers=forged), 401)
    right = {"Authorization": f"Bearer {key}"}
    assert (await client.get("/v1/conversations", headers=right)).status_code == 200
    assert_problem(await client.get("/v1/conversations", headers=forged), 401)


async def test_the_lookup_answers_the_key_s_tenant_and_refuses_a_revoked_one(
    resources: Resources,
):
    key = await new_key(resources, "acme")
    auth = await authenticate_key(resources.pool, key)
    assert auth is not None and auth.key_id == split_key(key)
    assert await authenticate_key(resources.pool, forge(key)) is None
    async with resources.pool.acquire() as conn:
        assert await revoke_key(conn, key)
    assert await authenticate_key(resources.pool, key) is None
