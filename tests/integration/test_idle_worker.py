"""An idle worker sleeps, and still takes work at once: an enqueue wakes it, a retry or a cron
job falls due on time, and a stored run's first check is not left to the follower's long sleep.
Each worker here would look for unannounced work only once a minute (idle_poll_s, and the
follower's and dispatcher's FOLLOWER_IDLE_S), so each of these would take a minute without its
wake-up."""

from __future__ import annotations

import asyncio
import secrets
import time

import msgspec

from service import queue as jobs
from service.db import turns as turn_db
from tests.helpers import create_conversation, post_turn, running_worker, wait_turn, wait_until

ASLEEP_S = 60.0


def sleepy(settings, **changes):
    return msgspec.structs.replace(settings, follower_idle_s=ASLEEP_S, **changes)


async def test_an_idle_worker_does_not_poll_redis(settings):
    async with running_worker(sleepy(settings), idle_poll_s=ASLEEP_S) as worker:
        await wait_until(lambda: worker.listening, what="the wake channel subscribed")
        # The start-up jobs: the reconcile, the retention sweep and the quota repair.
        await wait_until(lambda: not worker.tasks, 60, what="the start-up jobs to end")
        # The last start-up job's end polls once more (jobs may wait): count from after it.
        async def settled() -> bool:
            before = worker.polls
            await asyncio.sleep(0.3)
            return worker.polls == before

        await wait_until(settled, 20, what="the polls after the start-up jobs")
        polls = worker.polls
        await asyncio.sleep(1.0)  # a window to count in, not a wait for a condition
        # arq's own loop would have polled 100 times (every poll_delay, 10 ms).
        assert worker.polls - polls <= 2


async def test_a_turn_posted_to_an_idle_worker_starts_and_ends_at_once(settings, api):
    async with running_worker(sleepy(settings), idle_poll_s=ASLEEP_S) as worker:
        await wait_until(lambda: worker.listening, what="the wake channel subscribed")
        conv = await create_conversation(api)
        began = time.monotonic()
        # Poll mode: the run's first check is due poll_initial_s (0.1 s) after its start; the
        # follower, asleep for a minute, must be told (jobs.start_turn's wake_in).
        turn = await wait_turn(api, await post_turn(api, conv["id"], "asleep?"), timeout_s=20)
        assert turn["status"] == "completed"
        assert time.monotonic() - began < 20


async def test_a_retried_job_runs_again_when_its_delay_ends(settings, resources):
    """A webhook's check for a run no turn has recorded retries 4 times, 0.25 to 1 s apart
    (worker.jobs.check_turn), then gives up: 2.5 s in all, not four idle polls."""
    async with running_worker(sleepy(settings), idle_poll_s=ASLEEP_S) as worker:
        await wait_until(lambda: worker.listening, what="the wake channel subscribed")
        run_id = f"trun_nobody_{secrets.token_hex(4)}"  # job ids are global to the Redis
        await jobs.enqueue_check_turn(resources.queue, settings.queue_name, run_id)
        job_key = f"arq:job:{jobs.CHECK_TURN}:{run_id}"
        await wait_until(lambda: worker.jobs_retried >= 4, timeout_s=20,
                         what="four retries of the check")

        async def gone() -> bool:
            return not await resources.queue.exists(job_key)

        await wait_until(gone, timeout_s=20, what="the check to give up")


async def test_the_reconciler_runs_on_its_schedule_while_the_worker_sleeps(settings, resources):
    """The reconciler is an arq cron job: the sleeping worker wakes in time to enqueue it."""
    async with running_worker(sleepy(settings, reconcile_interval_s=2),
                              idle_poll_s=ASLEEP_S) as worker:
        await wait_until(lambda: worker.listening, what="the wake channel subscribed")
        await wait_until(lambda: worker.jobs_complete >= 1, what="the start-up pass")
        done = worker.jobs_complete
        # Then passes on the 2 s schedule (a poll right after a job may enqueue the next one,
        # due within a second: the one after that needs the sleeping worker to wake for it).
        await wait_until(lambda: worker.jobs_complete >= done + 3, timeout_s=20,
                         what="three more reconcile passes")


async def test_a_reported_run_is_checked_at_once_by_a_sleeping_follower(settings, api, resources):
    """Push mode: the run's first poll is a minute away and the follower sleeps for a minute;
    the API's report of Parallel's webhook (service.domain.push) wakes it over NOTIFY."""
    # lite's checks are scaled by 0.005 (service.domain.schedule): a first poll a minute away.
    push = sleepy(settings, public_base_url="http://127.0.0.1:9",
                  push_poll_initial_s=ASLEEP_S / 0.005, parallel_task_groups="off")
    async with running_worker(push, idle_poll_s=ASLEEP_S) as worker:
        await wait_until(lambda: worker.listening, what="the wake channel subscribed")
        conv = await create_conversation(api)
        turn = await wait_turn(api, await post_turn(api, conv["id"], "reported"),
                               statuses={"running"}, timeout_s=20)
        # The run has ended upstream (instant), its webhook went nowhere: report it as the
        # API does on Parallel's webhook.
        began = time.monotonic()
        assert (await turn_db.report_run(resources.pool, turn["run_id"], "completed"))[0]
        done = await wait_turn(api, turn, timeout_s=20)
        assert done["status"] == "completed"
        assert time.monotonic() - began < 10, "the follower waited for its idle poll"
