"""Fair webhook delivery: one tenant's hanging receivers cannot delay another tenant's webhooks.

The end-to-end test runs the in-process worker against real receivers (one that accepts and never
answers); the claim tests call the dispatcher's claim against rows in Postgres, as two workers
would.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import datetime

import httpx
import msgspec
import pytest
from standardwebhooks import Webhook

from service.app import create_app
from service.config import Settings
from service.domain import webhooks
from service.resources import Resources
from tests.helpers import create_conversation, new_key, post_turn, running_worker, wait_until
from tests.processes import WorkerProcess
from tests.receivers import HangingReceiver, Receiver, hanging, serve

A_DELIVERIES = 110


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Production's delivery settings (10 s per attempt, 100 slots per worker, default caps)."""
    defaults = Settings(database_url="", redis_url="", parallel_api_key="")
    return msgspec.structs.replace(
        settings, webhook_timeout_s=defaults.webhook_timeout_s,
        webhook_batch=defaults.webhook_batch,
        webhook_max_in_flight_per_tenant=defaults.webhook_max_in_flight_per_tenant,
        webhook_max_in_flight_per_host=defaults.webhook_max_in_flight_per_host,
    )


@pytest.fixture
async def beta(settings: Settings, resources: Resources) -> AsyncIterator[httpx.AsyncClient]:
    """The API as a second tenant, beta."""
    key = await new_key(resources, "beta")
    transport = httpx.ASGITransport(app=create_app(settings, resources=resources))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        yield http


async def queue_cancelled_turns(api: httpx.AsyncClient, url: str, count: int) -> None:
    """`count` terminal events (cancelled turns) for conversations calling `url`."""
    per_conversation = 10

    async def one_conversation(turns: int) -> None:
        conversation = await create_conversation(api, webhook_url=url)
        for _ in range(turns):
            turn = await post_turn(api, conversation["id"], "[sandbox:slow=60] never mind")
            cancel = await api.post(
                f"/v1/conversations/{conversation['id']}/turns/{turn['id']}/cancel")
            assert cancel.status_code == 200, cancel.text

    await asyncio.gather(*(one_conversation(min(per_conversation, count - start))
                           for start in range(0, count, per_conversation)))


async def test_a_tenants_hanging_receiver_does_not_delay_another_tenants_webhook(
    api, beta, settings, resources
):
    cap = settings.webhook_max_in_flight_per_tenant
    dead = HangingReceiver()
    receiver = Receiver()
    async with running_worker(settings), serve(receiver) as live_url, hanging(dead) as dead_url:
        await queue_cancelled_turns(api, f"{dead_url}/hook", A_DELIVERIES)
        await dead.wait_open(cap)
        pending = await resources.pool.fetchval(
            "SELECT count(*) FROM webhook_delivery WHERE status = 'pending'")
        assert pending == A_DELIVERIES

        conversation = await create_conversation(beta, webhook_url=f"{live_url}/hooks/beta")
        await post_turn(beta, conversation["id"], "Who won in 2022?")
        [request] = await receiver.wait_for(1, timeout_s=60)
        hanging_then = dead.open

    payload = Webhook(conversation["webhook_secret"]).verify(request.body, request.headers)
    assert payload["type"] == "turn.completed"
    ended = datetime.fromisoformat(payload["timestamp"]).timestamp()
    delay = request.at - ended
    print(f"beta's webhook arrived {delay:.3f} s after its turn ended, "
          f"with {hanging_then} of acme's attempts hanging")
    assert hanging_then >= cap // 2, "acme's attempts were hanging all along"
    assert delay < 2.0, f"beta waited {delay:.1f} s behind acme's hanging receiver"
    assert dead.max_open <= cap, "never more of acme's attempts in flight than its cap"


@pytest.mark.slow
async def test_a_tenants_cap_holds_across_two_worker_processes(api, settings):
    cap = settings.webhook_max_in_flight_per_tenant
    dead = HangingReceiver()
    async with hanging(dead) as dead_url:
        await queue_cancelled_turns(api, f"{dead_url}/hook", 3 * cap)
        with WorkerProcess(settings) as first, WorkerProcess(settings) as second:
            await dead.wait_open(cap, timeout_s=60)
            # Until the first attempts timed out and both workers claimed the next ones.
            await dead.wait_accepted(2 * cap, timeout_s=60)
            # Whichever worker ticks first may take every free slot of a round: the other's
            # first attempt can take a few rounds of timeouts (20-45 s idle, more loaded).
            await wait_until(
                lambda: all('"webhook_attempt"' in w.output() for w in (first, second)), 150,
                interval=0.2, what="an attempt logged by each worker")
    assert dead.max_open == cap, "the tenant's cap counts the attempts of both workers"


# The claim itself, against rows in Postgres.


@pytest.fixture
async def tenants(resources: Resources) -> dict[str, str]:
    """Three tenants, each with a conversation: tenant name -> conversation id."""
    conversations = {}
    for name in ("t1", "t2", "t3"):
        await new_key(resources, name)
        conversations[name] = await resources.pool.fetchval(
            "INSERT INTO conversation (id, tenant_id, processor, webhook_url, webhook_secret) "
            "SELECT $1, id, 'lite', 'https://example.com/', $2 FROM tenant WHERE name = $3 "
            "RETURNING id",
            f"conv_{secrets.token_hex(6)}", "whsec_" + "A" * 43 + "=", name)
    return conversations


async def add_due(resources: Resources, conversation_id: str, url: str, count: int,
                  age_s: float = 1.0) -> None:
    """`count` due deliveries to `url`, the first due `age_s` ago, each later one 1 ms later."""
    await resources.pool.execute(
        """
        INSERT INTO webhook_delivery (id, conversation_id, tenant_id, event_sequence, event_type,
            webhook_id, url, payload, next_attempt_at)
        SELECT 'whd_' || md5(random()::text), c.id, c.tenant_id,
            coalesce((SELECT max(event_sequence) FROM webhook_delivery
                      WHERE conversation_id = c.id), 0) + g,
            'turn.completed', 'msg_' || md5(random()::text), $2, '{}'::jsonb,
            now() - make_interval(secs => $4) + g * interval '1 millisecond'
        FROM conversation c, generate_series(1, $3) g WHERE c.id = $1
        """, conversation_id, url, count, age_s)


async def tenant_names(resources: Resources, claimed) -> list[str]:
    names = dict(await resources.pool.fetch("SELECT id, name FROM tenant"))
    return [names[d.tenant_id] for d in claimed]


async def test_claims_take_tenants_in_turn_not_the_oldest_first(settings, resources, tenants):
    settings = msgspec.structs.replace(settings, webhook_max_in_flight_per_tenant=100,
                                       webhook_max_in_flight_per_host=100)
    await add_due(resources, tenants["t1"], "https://a.example/", 50, age_s=60)
    await add_due(resources, tenants["t2"], "https://b.example/", 3)
    await add_due(resources, tenants["t3"], "https://c.example/", 1)

    claim = await webhooks.claim_due(resources.pool, settings, 6)
    names = await tenant_names(resources, claim.deliveries)
    assert sorted(names) == ["t1", "t1", "t1", "t2", "t2", "t3"], names
    assert claim.next_due is not None  # the leases it just took


async def test_a_tenant_with_attempts_in_flight_waits_behind_one_without(
    settings, resources, tenants
):
    settings = msgspec.structs.replace(settings, webhook_max_in_flight_per_tenant=10,
                                       webhook_max_in_flight_per_host=100)
    await add_due(resources, tenants["t1"], "https://a.example/", 3, age_s=120)
    assert len((await webhooks.claim_due(resources.pool, settings, 3)).deliveries) == 3
    await add_due(resources, tenants["t1"], "https://a.example/", 5, age_s=60)
    await add_due(resources, tenants["t2"], "https://b.example/", 5)

    # t1's backlog is older, but it has 3 in flight and t2 none: t2 gets 3 of the 4 slots.
    claim = await webhooks.claim_due(resources.pool, settings, 4)
    assert sorted(await tenant_names(resources, claim.deliveries)) == ["t1", "t2", "t2", "t2"]


async def test_in_flight_caps_hold_across_claims_of_several_workers(settings, resources, tenants):
    settings = msgspec.structs.replace(settings, webhook_max_in_flight_per_tenant=4,
                                       webhook_max_in_flight_per_host=6)
    shared = "https://shared.example:8443/hook"
    for name in ("t1", "t2", "t3"):
        await add_due(resources, tenants[name], shared, 10)
    await add_due(resources, tenants["t1"], "https://own.example/hook", 10)

    # Three workers claim at once, each with room for 100.
    claims = await asyncio.gather(*(webhooks.claim_due(resources.pool, settings, 100)
                                    for _ in range(3)))
    claimed = [d for c in claims for d in c.deliveries]
    on_shared = [d for d in claimed if d.url == shared]
    names = await tenant_names(resources, claimed)
    assert len(on_shared) == 6, "the host's cap, across the three claims"
    assert sorted(await tenant_names(resources, on_shared)) == ["t1", "t1", "t2", "t2", "t3", "t3"]
    # t1 fills its cap with its other host's deliveries; t2 and t3 have nothing elsewhere.
    assert sorted(names) == ["t1"] * 4 + ["t2", "t2", "t3", "t3"], names

    # Nothing more while those are in flight; a recorded attempt frees its slot.
    assert (await webhooks.claim_due(resources.pool, settings, 100)).deliveries == []
    await resources.pool.execute(
        "UPDATE webhook_delivery SET leased_until = NULL, next_attempt_at = now() + "
        "interval '1 hour' WHERE id = $1", on_shared[0].id)
    [again] = (await webhooks.claim_due(resources.pool, settings, 100)).deliveries
    assert again.url == shared
