"""Quotas on new turns (open-turn limits, the monthly budget) and the usage report."""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime
from decimal import Decimal

import asyncpg
import msgspec

from service.config import Settings
from service.db import usage as db
from service.domain.schedule import profile
from service.errors import BadRequest, PaymentRequired, ServiceError, TooManyOpenTurns
from service.schemas import ConversationUsage, ProcessorUsage, Usage


def estimate_cost(processor: str) -> Decimal:
    """Parallel's price of one run of the processor (docs/parallel.md §7), in USD."""
    return Decimal(str(profile(processor).usd_per_run))


@functools.cache
def prices(processors: tuple[str, ...]) -> dict[str, str]:
    """Each processor's estimate_cost, as text (exact in SQL's numeric): the price list a turn
    created in one statement is charged from (service.db.new_turns.queue_turn_at_once)."""
    return {processor: str(estimate_cost(processor)) for processor in processors}


def month_start(month: str | None = None) -> date:
    """The first day of `YYYY-MM`, or of the current month in UTC. Raises BadRequest."""
    if month is None:
        today = datetime.now(UTC).date()
        return today.replace(day=1)
    try:
        year, number = month.split("-")
        return date(int(year), int(number), 1)
    except ValueError:
        raise BadRequest("month must be YYYY-MM.") from None


# The SQLSTATEs the turn_quota_insert trigger (migration 0011) fails a new turn's commit with; its
# DETAIL is JSON: {"open", "limit"} and {"spent", "budget", "cost"}.
OPEN_TURNS_REFUSED = "RQ429"
BUDGET_REFUSED = "RQ402"


def check_open_in_conversation(settings: Settings, open_turns: int) -> None:
    """Refuse a new turn of a conversation that already has `open_turns` queued or running
    (counted under the conversation's lock). Raises TooManyOpenTurns."""
    if open_turns >= settings.max_open_turns_per_conversation:
        raise TooManyOpenTurns(
            f"This conversation already has {open_turns} turns queued or running (the "
            f"limit is {settings.max_open_turns_per_conversation}); wait for some to finish."
        )


def quota_refusal(exc: asyncpg.PostgresError) -> ServiceError | None:
    """What the API answers when a new turn's commit was refused for the tenant's open-turn
    limit or monthly budget; None for any other error."""
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate not in (OPEN_TURNS_REFUSED, BUDGET_REFUSED):
        return None
    detail = msgspec.json.decode(getattr(exc, "detail", None) or "{}")
    if sqlstate == OPEN_TURNS_REFUSED:
        return TooManyOpenTurns(
            f"This account already has {detail['open']} turns queued or running (the limit "
            f"is {detail['limit']}); wait for some to finish."
        )
    spent, budget, cost = (Decimal(detail[k]) for k in ("spent", "budget", "cost"))
    return PaymentRequired(
        f"This turn (estimated ${cost:.4f}) would take this month's spend past the budget: "
        f"${spent:.4f} of "
        f"${budget:.4f} is used. New turns are accepted again next month, or after the "
        "budget is raised."
    )


async def repair_quota_counters(pool: asyncpg.Pool) -> list[str]:
    """Recount the quota counters of every tenant whose counters disagree with its turns (this
    month's spend, and open turns); the tenants whose counters were wrong.

    The counters change only in the commits that change turns (triggers: whoever changes a
    turn counts it), so they drift only when that is bypassed (counters edited by hand, turns
    deleted without their spend archived, a restore, turns committed while migration 0011
    ran). Each tenant is recounted in its own short transaction that locks its counter
    rows first: commits of its new turns wait those few milliseconds, and the limits stay exact
    while it runs."""
    month = month_start()
    repaired = []
    for tenant_id in await db.drifted_tenants(pool, month):
        async with pool.acquire() as conn, conn.transaction():
            before, after = await db.recount(conn, tenant_id, month)
        if before != after:
            repaired.append(tenant_id)
    return repaired


async def get_usage(pool: asyncpg.Pool, tenant_id: str, month: str | None) -> Usage:
    """The tenant's estimated spend in a calendar month (UTC), by processor and conversation."""
    first = month_start(month)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        # One snapshot, so the two breakdowns add up to the same total.
        by_processor = await db.usage_by_processor(conn, tenant_id, first)
        by_conversation = await db.usage_by_conversation(conn, tenant_id, first)
        budget = await db.tenant_budget(conn, tenant_id)
    return Usage(
        month=f"{first:%Y-%m}",
        total_usd=_usd(sum((r["usd"] for r in by_processor), Decimal(0))),
        budget_usd=None if budget is None else _usd(budget),
        by_processor=[
            ProcessorUsage(processor=r["processor"], turns=r["turns"], usd=_usd(r["usd"]))
            for r in by_processor
        ],
        by_conversation=[
            ConversationUsage(conversation_id=r["conversation_id"], turns=r["turns"],
                              usd=_usd(r["usd"]))
            for r in by_conversation
        ],
    )


def _usd(amount: Decimal) -> float:
    return float(round(amount, 6))
