"""Quotas on new turns (open-turn limits, the monthly budget) and the usage report."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import asyncpg

from service.config import Settings
from service.db import usage as db
from service.db.pool import Conn
from service.domain.schedule import profile
from service.errors import BadRequest, PaymentRequired, TooManyOpenTurns
from service.schemas import ConversationUsage, ProcessorUsage, Usage


def estimate_cost(processor: str) -> Decimal:
    """Parallel's price of one run of the processor (docs/parallel.md §7), in USD."""
    return Decimal(str(profile(processor).usd_per_run))


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


async def check_quotas(
    conn: Conn, settings: Settings, tenant_id: str, conversation_id: str,
    cost: Decimal,
) -> int:
    """Refuse a new turn past the open-turn limits or the tenant's monthly budget; return how
    many turns of the conversation are open (queued or running).

    Locks the tenant row until the caller's transaction ends, so that two turns created at
    once cannot both fit under a limit only one of them fits under.
    Raises TooManyOpenTurns, PaymentRequired.
    """
    budget = await db.lock_tenant(conn, tenant_id)
    in_conversation, in_tenant = await db.count_open_turns(conn, tenant_id, conversation_id)
    if in_conversation >= settings.max_open_turns_per_conversation:
        raise TooManyOpenTurns(
            f"This conversation already has {in_conversation} turns queued or running (the "
            f"limit is {settings.max_open_turns_per_conversation}); wait for some to finish."
        )
    if in_tenant >= settings.max_open_turns_per_tenant:
        raise TooManyOpenTurns(
            f"This account already has {in_tenant} turns queued or running (the limit is "
            f"{settings.max_open_turns_per_tenant}); wait for some to finish."
        )
    if budget is None:
        return in_conversation
    spent = await db.month_spend(conn, tenant_id, month_start())
    if spent + cost > budget:
        raise PaymentRequired(
            f"This turn (estimated ${cost:.4f}) would take this month's spend past the budget: "
            f"${spent:.4f} of ${budget:.4f} is used. New turns are accepted again next month, "
            "or after the budget is raised."
        )
    return in_conversation


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
