"""Group mode: start attempts add their runs to a Parallel task group this worker owns, several
per POST, and an attempt that may have made a run finds it in its group before creating another.

One `GroupStarts` per worker process. Attempts hand it their create body; while one add is in
flight the next ones wait and go together in the following POST (up to 1,000). Before each add,
Postgres records which group each attempt's run goes to (service.db.groups.assign_attempts), so
an attempt whose answer is lost (a broken connection here, a dead worker for the next attempt)
can list that group and adopt the run tagged with its turn and attempt. Groups rotate by age and
size so a listing stays short; their event streams are followed by worker.group_follower.

With PARALLEL_TASK_GROUPS=auto, a group route that answers as a deployment without groups would
(404, 405, 501), or any other refusal, or calls that keep failing, switch this process back to
one-by-one creates for a while (logged once, counted in research_task_groups_fallback_total); a
turn never fails because of the group routes. With `on` such an answer is an error (the attempt
is retried later); with `off` this module is not used.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from service import metrics
from service.clients.parallel import ParallelClient, RunInfo, run_input
from service.config import Settings
from service.db import groups as db
from service.errors import UpstreamRejected, UpstreamUnavailable

log = structlog.get_logger(__name__)

MAX_ADD = 1000  # Parallel's limit of inputs per add
UNSUPPORTED = frozenset({404, 405, 501})
# Refusals of the account or the processor, not of the group route's shape: the turn's answer.
REFUSED_ANYWAY = frozenset({401, 402, 403})
# Group calls failing in a row, with no group call answered between (auto mode), before going
# one by one. A Parallel failing a fifth of all calls at random fails 10 in a row about once in
# ten million calls (5 in a row was reached in a CI run of the 20 % fault test, whose stream
# reads and adds make hundreds of group calls); a Parallel that is down fails 10 in seconds.
FAILURES_BEFORE_FALLBACK = 10
RETRY_GROUPS_S = 600.0  # after a fallback, groups are tried again this much later
TURN_TAG, ATTEMPT_TAG = "rs_turn", "rs_attempt"  # the tags service.domain.starts puts on runs


@dataclass(slots=True)
class _Pending:
    turn_id: str
    attempt: int
    body: dict[str, Any]
    deadline: float  # time.monotonic() by which the add must have answered
    future: asyncio.Future[RunInfo] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(slots=True)
class _Group:
    taskgroup_id: str
    made_at: float
    runs: int = 0


class GroupStarts:
    def __init__(
        self, pool: asyncpg.Pool, parallel: ParallelClient, settings: Settings, follower: str,
        on_added: Callable[[str], None] | None = None,
    ) -> None:
        self._pool, self._parallel, self._settings = pool, parallel, settings
        self._follower = follower  # this worker's id as a group stream's follower
        self._on_added = on_added  # told each group runs were added to (its stream has news)
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._group: _Group | None = None
        self._off_until = 0.0 if settings.parallel_task_groups != "off" else float("inf")
        self._failures = 0
        self._said = False

    @property
    def active(self) -> bool:
        """Whether new runs go to task groups now (False: one by one)."""
        return time.monotonic() >= self._off_until

    # creating runs ---------------------------------------------------------------------------

    async def create_run(
        self, *, input: str | dict[str, Any], processor: str, output_schema: dict[str, Any],
        previous_interaction_id: str | None, metadata: dict[str, str],
        webhook_url: str | None = None, timeout_s: float = 30.0,
    ) -> RunInfo:
        """Create the attempt's run in this worker's group (ParallelClient.create_run's
        arguments and errors; the attempt is named by its metadata tags)."""
        if not self.active:  # given up on since the attempt began
            await db.unmark_attempt(self._pool, metadata[TURN_TAG], int(metadata[ATTEMPT_TAG]))
            return await self._parallel.create_run(
                input=input, processor=processor, output_schema=output_schema,
                previous_interaction_id=previous_interaction_id, metadata=metadata,
                webhook_url=webhook_url, timeout_s=timeout_s)
        body = run_input(input=input, processor=processor, output_schema=output_schema,
                         previous_interaction_id=previous_interaction_id, metadata=metadata,
                         webhook_url=webhook_url)
        pending = _Pending(metadata[TURN_TAG], int(metadata[ATTEMPT_TAG]), body,
                           time.monotonic() + timeout_s)
        self._pending.append(pending)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all(), name="group-adds")
        # Shielded: a start job cancelled meanwhile leaves the add to finish for the others.
        return await asyncio.shield(pending.future)

    async def _flush_all(self) -> None:
        await asyncio.sleep(0)  # let attempts begun in the same moment join the first POST
        while self._pending:
            size = min(MAX_ADD, max(1, self._settings.group_max_runs))
            batch, self._pending = self._pending[:size], self._pending[size:]
            try:
                await self._flush(batch)
            except BaseException as exc:  # a bug, or cancelled at shutdown: nobody may hang
                for item in batch:
                    _settle(item, exc=UpstreamUnavailable(f"The add of runs failed: {exc!r}"))
                if not isinstance(exc, Exception):
                    raise
                log.exception("group_add_failed")

    async def _flush(self, batch: list[_Pending]) -> None:
        if not self.active:  # switched to one by one meanwhile
            await asyncio.gather(*(self._one_by_one(item) for item in batch))
            return
        try:
            group = await self._current_group(len(batch))
        except (UpstreamUnavailable, UpstreamRejected) as exc:
            self._group_failed("create_group", exc)
            if self.active:  # a passing failure (429, 5xx): the attempts are retried later
                for item in batch:
                    _settle(item, exc=_not_made(exc))
            else:
                await asyncio.gather(*(self._one_by_one(item) for item in batch))
            return
        owned = await db.assign_attempts(self._pool, group.taskgroup_id,
                                         [(item.turn_id, item.attempt) for item in batch])
        for item in batch:
            if item.turn_id not in owned:  # its lease ran out, or the turn was cancelled
                _settle(item, exc=UpstreamUnavailable("The attempt no longer owns its turn."))
        batch = [item for item in batch if item.turn_id in owned]
        if batch:
            group.runs += len(batch)
            await self._add(group, batch)

    async def _one_by_one(self, item: _Pending) -> None:
        body = item.body
        try:
            await db.unmark_attempt(self._pool, item.turn_id, item.attempt)
            run = await self._parallel.create_run(
                input=body["input"], processor=body["processor"],
                output_schema=body["task_spec"]["output_schema"],
                previous_interaction_id=body.get("previous_interaction_id"),
                metadata=body["metadata"], webhook_url=(body.get("webhook") or {}).get("url"),
                timeout_s=max(0.1, item.deadline - time.monotonic()))
        except (UpstreamUnavailable, UpstreamRejected) as exc:
            _settle(item, exc=exc)
        else:
            _settle(item, run=run)

    async def _add(self, group: _Group, batch: list[_Pending]) -> None:
        timeout_s = min(item.deadline for item in batch) - time.monotonic()
        try:
            if timeout_s <= 0:
                raise UpstreamUnavailable("The attempts' leases have too little time left.")
            run_ids, cursor = await self._parallel.add_runs(
                group.taskgroup_id, [item.body for item in batch], timeout_s=timeout_s)
        except UpstreamUnavailable as exc:
            if exc.in_doubt:  # the runs may exist: the group's listing says which do
                await self._resolve(group, batch, exc)
                return
            self._group_failed("add_runs", exc)
            for item in batch:
                _settle(item, exc=_not_made(exc))
            return
        except UpstreamRejected as exc:
            if exc.status_code not in UNSUPPORTED and len(batch) > 1:
                # One input may be what is refused: each goes alone, so only it is refused.
                for item in batch:
                    await self._add(group, [item])
                return
            if exc.status_code in REFUSED_ANYWAY:
                for item in batch:
                    _settle(item, exc=exc)
                return
            self._group_failed("add_runs", exc)
            if self._settings.parallel_task_groups == "on":
                for item in batch:  # a refusal of the input itself, or of the group route
                    _settle(item, exc=exc if exc.status_code not in UNSUPPORTED else _not_made(exc))
                return
            # No run was made. The same create, one by one: Parallel's answer to it is the
            # turn's (a group route that behaves otherwise must never fail a turn).
            await asyncio.gather(*(self._one_by_one(item) for item in batch))
            return
        self._failures = 0
        if self._on_added is not None:
            self._on_added(group.taskgroup_id)
        await self._describe(group, batch, run_ids, cursor)

    async def _describe(
        self, group: _Group, batch: list[_Pending], run_ids: list[str], cursor: str | None
    ) -> None:
        """Settle each attempt with its run as the group lists it (the add answers only ids:
        the interaction id comes from the listing, or from the run itself)."""
        listed: dict[str, RunInfo] = {}
        try:
            listed = {run.run_id: run for run in
                      await self._parallel.group_runs(group.taskgroup_id, after=cursor)}
            self._failures = 0
        except (UpstreamUnavailable, UpstreamRejected) as exc:
            log.info("group_listing_failed", taskgroup_id=group.taskgroup_id, error=exc.detail)
        for item, run_id in zip(batch, run_ids, strict=True):
            run = listed.get(run_id)
            if run is None:
                try:
                    run = await self._parallel.retrieve(run_id)
                except (UpstreamUnavailable, UpstreamRejected) as exc:
                    # The run exists, its interaction id unknown: the next attempt adopts it.
                    error = UpstreamUnavailable(f"Run {run_id} made, not described: {exc.detail}")
                    error.in_doubt = True
                    _settle(item, exc=error)
                    continue
            _settle(item, run=_in_group(run, group.taskgroup_id))

    async def _resolve(
        self, group: _Group, batch: list[_Pending], lost: UpstreamUnavailable
    ) -> None:
        """The add's answer was lost: adopt the runs the group lists for these attempts; an
        attempt without one made none. If the listing fails too, they stay in doubt."""
        try:
            runs = await self._parallel.group_runs(group.taskgroup_id)
        except (UpstreamUnavailable, UpstreamRejected) as exc:
            log.warning("group_listing_failed", taskgroup_id=group.taskgroup_id, error=exc.detail)
            for item in batch:
                _settle(item, exc=lost)
            return
        self._failures = 0
        found = {(tag(run, TURN_TAG), tag(run, ATTEMPT_TAG)): run for run in runs}
        adopted = 0
        for item in batch:
            run = found.get((item.turn_id, str(item.attempt)))
            if run is None:
                _settle(item, exc=_not_made(lost))
            else:
                adopted += 1
                _settle(item, run=_in_group(run, group.taskgroup_id))
        log.info("group_add_answer_lost", taskgroup_id=group.taskgroup_id, attempts=len(batch),
                 adopted=adopted, error=lost.detail)

    async def _current_group(self, size: int) -> _Group:
        """This worker's open group, a new one when it is too old or too full for `size` more."""
        settings, group = self._settings, self._group
        if group is not None and (
            time.monotonic() - group.made_at >= settings.group_max_age_s
            or group.runs + size > settings.group_max_runs
        ):
            await db.close_group(self._pool, group.taskgroup_id)
            self._group = group = None
        if group is None:
            taskgroup_id = await self._parallel.create_group({"service": "research-service"})
            self._failures = 0
            await db.insert_group(self._pool, taskgroup_id, self._follower, settings.group_lease_s)
            log.info("task_group_created", taskgroup_id=taskgroup_id)
            self._group = group = _Group(taskgroup_id, time.monotonic())
        return group

    def stream_read(self, exc: UpstreamUnavailable | UpstreamRejected | None) -> None:
        """A group's event stream was read (GroupFollower), or failed with `exc`: counted as a
        group call, so a Parallel without group streams (404) or whose streams keep failing
        sends this worker's new runs one by one, whose polls need no stream."""
        if exc is None:
            self._failures = 0
        elif self.active:  # once gone one by one, a stream still failing changes nothing
            self._group_failed("group_events", exc)

    def _group_failed(self, call: str, exc: UpstreamUnavailable | UpstreamRejected) -> None:
        """Count a failed group call; in auto mode, refusals and failures in a row mean going
        one by one for RETRY_GROUPS_S."""
        status = exc.status_code if isinstance(exc, UpstreamRejected) else None
        self._failures += 1
        if status in UNSUPPORTED:
            reason = "unsupported"
        elif status is not None and call == "create_group":
            reason = "refused"
        elif self._failures >= FAILURES_BEFORE_FALLBACK:
            reason = "failing"
        else:
            log.info("group_call_failed", call=call, error=exc.detail)
            return
        if self._settings.parallel_task_groups == "on":
            log.error("task_groups_required", call=call, reason=reason, error=exc.detail)
            return
        self._off_until = time.monotonic() + RETRY_GROUPS_S
        self._failures = 0
        self._group = None
        metrics.task_groups_fallback(reason)
        fields = {"call": call, "reason": reason, "error": exc.detail,
                  "retry_in_s": RETRY_GROUPS_S}
        if not self._said:
            self._said = True
            log.warning("task_groups_unavailable_one_by_one", **fields)
        else:
            log.info("task_groups_unavailable_one_by_one", **fields)


def tag(run: RunInfo, name: str) -> str | None:
    """A tag the service put in the run's metadata (as a string: numbers may come back floats)."""
    value = (run.metadata or {}).get(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return None if value is None else str(value)


def _in_group(run: RunInfo, taskgroup_id: str) -> RunInfo:
    if run.task_group_id:
        return run
    return RunInfo(run_id=run.run_id, interaction_id=run.interaction_id, status=run.status,
                   is_active=run.is_active, processor=run.processor, error=run.error,
                   metadata=run.metadata, task_group_id=taskgroup_id)


def _not_made(exc: UpstreamUnavailable | UpstreamRejected) -> UpstreamUnavailable:
    """No run was made: the attempt is retried (one by one, if groups were given up on)."""
    retry_after = exc.retry_after if isinstance(exc, UpstreamUnavailable) else None
    return UpstreamUnavailable(f"No run was made: {exc.detail}", retry_after=retry_after)


def _settle(item: _Pending, *, run: RunInfo | None = None, exc: Exception | None = None) -> None:
    if item.future.done():
        return
    if exc is not None:
        item.future.set_exception(exc)
    else:
        assert run is not None
        item.future.set_result(run)


async def adopt(
    pool: asyncpg.Pool, parallel: ParallelClient, turn_id: str, attempt: int
) -> RunInfo | None:
    """The run an earlier attempt of the turn added to a group, found by its tags, or None
    when the groups those attempts used list none (or cannot be listed: Parallel refused).
    Raises UpstreamUnavailable (list again later)."""
    groups = await db.attempt_groups(pool, turn_id)
    earlier = sorted({gid for number, gid in groups.items() if gid and int(number) < attempt})
    for taskgroup_id in earlier:
        try:
            runs = await parallel.group_runs(taskgroup_id)
        except UpstreamRejected as exc:
            log.warning("group_listing_refused", taskgroup_id=taskgroup_id, error=exc.detail)
            continue
        mine = [run for run in runs if tag(run, TURN_TAG) == turn_id]
        if mine:
            run = max(mine, key=lambda r: int(tag(r, ATTEMPT_TAG) or 0))
            log.info("run_adopted", turn_id=turn_id, run_id=run.run_id, attempt=attempt,
                     from_attempt=tag(run, ATTEMPT_TAG), taskgroup_id=taskgroup_id)
            return _in_group(run, taskgroup_id)
    return None
