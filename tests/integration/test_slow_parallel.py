"""A slow Parallel: creates that make their run at once but answer late. Each turn pays for at most
1 + MAX_DOUBTFUL_ATTEMPTS runs (README, "Guarantees"), and every run is accounted for: the turn's
own, or one of its attempts in doubt, or an extra run recorded with its id."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import asyncpg
import msgspec
import pytest

from service import metrics
from service.db import attempts
from tests.helpers import create_conversation, post_turn, running_worker, sandbox_runs, set_faults

ANSWER_DELAY_S = 20.0


@pytest.fixture
def settings(settings):
    """One by one (PARALLEL_TASK_GROUPS=off): the window these tests measure only exists there;
    in group mode a lost create's run is adopted (tests/integration/test_task_groups.py)."""
    return msgspec.structs.replace(settings, parallel_task_groups="off")


def counted() -> dict[str, float]:
    samples = {}
    for family in (metrics.CREATE_IN_DOUBT, metrics.EXTRA_RUNS):
        for metric in family.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    samples[f"{sample.name}:{sample.labels.get('reason')}"] = sample.value
    return samples


def increase(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


async def wait_all_ended(database_url: str, turn_ids: list[str], timeout_s: float) -> list[dict]:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = await conn.fetch(
                "SELECT id, status, error, run_id, start_attempts, doubtful_attempts FROM turn "
                "WHERE id = ANY($1::text[])", turn_ids)
            if all(r["status"] not in ("queued", "running") for r in rows):
                out = []
                for r in rows:
                    extra = await attempts.extra_runs(conn, r["id"])
                    error = json.loads(r["error"]) if r["error"] else None
                    out.append({**dict(r), "error": error,
                                "extra": {e["attempt"]: e["run_id"] for e in extra}})
                return out
            assert time.monotonic() < deadline, [dict(r) for r in rows]
            await asyncio.sleep(0.25)
    finally:
        await conn.close()


def assert_every_run_accounted_for(turn: dict, runs: list[dict], max_doubtful: int) -> None:
    by_attempt = Counter(int(r["metadata"]["rs_attempt"]) for r in runs)
    assert all(n == 1 for n in by_attempt.values()), f"an attempt made two runs: {turn}"
    assert len(runs) <= 1 + max_doubtful, f"{len(runs)} runs for one turn: {turn}"
    for run in runs:
        attempt = int(run["metadata"]["rs_attempt"])
        if run["run_id"] == turn["run_id"]:
            assert attempt == turn["start_attempts"]
        elif attempt in turn["extra"]:
            assert turn["extra"][attempt] == run["run_id"]
        else:
            assert attempt in turn["doubtful_attempts"], f"a run nobody knows of: {turn} {run}"


async def post_stretch(api, sandbox_url: str, conversations: int, stretch_s: float, **faults):
    """Post one turn on each conversation while every create answers late, for stretch_s."""
    convs = [await create_conversation(api) for _ in range(conversations)]
    set_faults(sandbox_url, **faults)
    turns = [await post_turn(api, c["id"], f"slow {n}") for n, c in enumerate(convs)]
    return convs, turns, time.monotonic() + stretch_s


async def test_creates_answered_within_the_create_timeout_make_one_run_each(
    api, settings, sandbox, database_url
):
    # The defaults: a create may take up to CREATE_TIMEOUT_S (30 s), so a 20 s answer is waited
    # for, and nothing is in doubt.
    assert settings.create_timeout_s > ANSWER_DELAY_S
    before = counted()
    async with running_worker(settings):
        convs, turns, stretch_end = await post_stretch(
            api, sandbox.url, 4, 5, create_answer_delay_s=ANSWER_DELAY_S)
        await asyncio.sleep(max(0.0, stretch_end - time.monotonic()))
        set_faults(sandbox.url)
        turns += [await post_turn(api, c["id"], "and after it") for c in convs]
        ended = await wait_all_ended(database_url, [t["id"] for t in turns], timeout_s=90)
    assert Counter(t["status"] for t in ended) == {"completed": len(turns)}
    for turn in ended:
        runs = sandbox_runs(sandbox.url, turn["id"])
        assert len(runs) == 1 and runs[0]["run_id"] == turn["run_id"]
        assert turn["doubtful_attempts"] == [] and turn["extra"] == {}
    assert increase(before, counted()) == {}


async def test_creates_answered_after_the_create_timeout_bill_at_most_the_documented_runs(
    api, settings, sandbox, database_url
):
    # A create timeout shorter than Parallel's answers: every attempt during the stretch is in
    # doubt (its run exists, its id never arrives). After MAX_DOUBTFUL_ATTEMPTS of them the turn
    # fails with create_in_doubt instead of paying for more.
    settings = msgspec.structs.replace(settings, start_lease_s=12.0, create_timeout_s=3.0)
    before = counted()
    async with running_worker(settings):
        convs, turns, stretch_end = await post_stretch(
            api, sandbox.url, 4, 15, create_answer_delay_s=ANSWER_DELAY_S)
        while time.monotonic() < stretch_end:  # keep posting while Parallel is slow
            turns += [await post_turn(api, c["id"], "still slow") for c in convs[:2]]
            await asyncio.sleep(3)
        set_faults(sandbox.url)
        turns += [await post_turn(api, c["id"], "fast again") for c in convs]
        ended = await wait_all_ended(database_url, [t["id"] for t in turns], timeout_s=120)
    statuses = Counter(t["status"] for t in ended)
    assert set(statuses) <= {"completed", "failed"}
    assert statuses["failed"] >= 4, ended  # every turn posted at the stretch's start gave up
    doubtful = 0
    for turn in ended:
        runs = sandbox_runs(sandbox.url, turn["id"])
        assert_every_run_accounted_for(turn, runs, settings.max_doubtful_attempts)
        doubtful += len(turn["doubtful_attempts"])
        if turn["status"] == "failed":
            assert turn["error"]["code"] == "create_in_doubt", turn
            assert len(turn["doubtful_attempts"]) == settings.max_doubtful_attempts
            assert turn["run_id"] is None
    fast = [t for t in ended if t["id"] in {x["id"] for x in turns[-len(convs):]}]
    assert all(t["status"] == "completed" and t["doubtful_attempts"] == [] for t in fast)
    assert increase(before, counted()) == {"research_create_in_doubt_total:timeout": doubtful}
