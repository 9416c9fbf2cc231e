"""Tenants and their API keys. A key is `rsk_<id>_<secret>`; only the SHA-256 of the whole key
is kept."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime
from decimal import Decimal

import asyncpg
import msgspec

from service.db.pool import Conn

KEY_PREFIX = "rsk_"


class ApiKeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tenant_id: str
    tenant_name: str
    created_at: datetime
    revoked_at: datetime | None
    rate_limit_per_min: int | None = None
    monthly_budget_usd: Decimal | None = None


class KeyAuth(msgspec.Struct, frozen=True, kw_only=True):
    """A verified key: whose it is, and its rate limit (None: the default, 0: unlimited)."""

    key_id: str
    tenant_id: str
    rate_limit_per_min: int | None


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def split_key(key: str) -> str | None:
    """The key's id (its visible prefix), or None when the key is not shaped like ours."""
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(KEY_PREFIX):].partition("_")
    if not sep or not key_id or not secret or len(key) > 200:
        return None
    return key_id


# A given budget replaces the tenant's; without one (NULL) an existing tenant keeps its own.
UPSERT_TENANT_SQL = """
INSERT INTO tenant (id, name, monthly_budget_usd) VALUES ($1, $2, $3)
ON CONFLICT (name) DO UPDATE
SET monthly_budget_usd = COALESCE(EXCLUDED.monthly_budget_usd, tenant.monthly_budget_usd)
RETURNING id
"""

INSERT_KEY_SQL = """
INSERT INTO api_key (id, tenant_id, key_hash, rate_limit_per_min) VALUES ($1, $2, $3, $4)
"""


async def create_key(
    conn: Conn, tenant_name: str, *, rate_limit_per_min: int | None = None,
    monthly_budget_usd: Decimal | None = None,
) -> tuple[str, str]:
    """Create the tenant if new and a key for it; return (key id, key). The key is not kept.

    `rate_limit_per_min` is the key's (None: the service default, 0: unlimited);
    `monthly_budget_usd`, when given, becomes the tenant's budget.
    """
    async with conn.transaction():
        tenant_id = await conn.fetchval(
            UPSERT_TENANT_SQL, f"ten_{secrets.token_hex(8)}", tenant_name, monthly_budget_usd
        )
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        await conn.execute(INSERT_KEY_SQL, key_id, tenant_id, hash_key(key), rate_limit_per_min)
    return key_id, key


# The key's tenant, its hash and its rate limit.
KEY_BY_ID_SQL = """
SELECT k.tenant_id, k.key_hash, k.rate_limit_per_min
FROM api_key k
WHERE k.id = $1 AND k.revoked_at IS NULL
"""


async def authenticate_key(conn: Conn | asyncpg.Pool, key: str) -> KeyAuth | None:
    """The live key this is, or None. Compares hashes in constant time. The one lookup of a
    key: service.domain.keycache keeps its answers."""
    key_id = split_key(key)
    if key_id is None:
        return None
    row = await conn.fetchrow(KEY_BY_ID_SQL, key_id)
    if row is None or not hmac.compare_digest(bytes(row["key_hash"]), hash_key(key)):
        return None
    return KeyAuth(
        key_id=key_id, tenant_id=str(row["tenant_id"]), rate_limit_per_min=row["rate_limit_per_min"]
    )


# Channel on which the api_key_changed trigger (migration 0004) names each changed key ('*': all).
CHANGES_CHANNEL = "api_keys"

REVOKE_KEY_SQL = """
UPDATE api_key SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING id
"""


async def revoke_key(conn: Conn, key_id: str) -> bool:
    """Revoke a key by id (`abc123`, `rsk_abc123`, or the whole key); False when no live key
    has that id."""
    key_id = split_key(key_id) or key_id.removeprefix(KEY_PREFIX)
    return await conn.fetchval(REVOKE_KEY_SQL, key_id) is not None


LIST_KEYS_SQL = """
SELECT k.id, k.tenant_id, t.name AS tenant_name, k.created_at, k.revoked_at,
       k.rate_limit_per_min, t.monthly_budget_usd
FROM api_key k JOIN tenant t ON t.id = k.tenant_id
ORDER BY k.created_at
"""


async def list_keys(conn: Conn) -> list[ApiKeyInfo]:
    return [ApiKeyInfo(**row) for row in await conn.fetch(LIST_KEYS_SQL)]
