"""Runs and their lifecycle: queued → running → completed | failed on a timeline.

Status is derived from timestamps on every read; one timer (a heap of due times, no task per
run) finishes runs at their due time so `/result` waiters wake and webhooks fire even when
nobody polls.
"""

from __future__ import annotations

import asyncio
import heapq
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sandbox.answers import build_output, question_text
from sandbox.config import SandboxConfig
from sandbox.faults import FaultState, input_markers
from sandbox.validation import RUN_INPUT_FIELDS
from sandbox.wire import ApiError, error_object, rfc3339

ACTIVE = frozenset({"queued", "running", "cancelling"})
FAILED_MESSAGE = "Task execution failed (sandbox)"


class Run:
    __slots__ = (
        "betas",
        "body",
        "created_mono",
        "created_wall",
        "due_mono",
        "error",
        "expires",
        "final",
        "finished_mono",
        "finished_wall",
        "interaction_id",
        "processor",
        "run_id",
        "running_mono",
        "taskgroup_id",
        "waiters",
        "will_fail",
    )

    def __init__(
        self, run_id: str, interaction_id: str, body: dict[str, Any], betas: list[str]
    ) -> None:
        self.run_id = run_id
        self.interaction_id = interaction_id
        self.body = body
        self.processor: str = body["processor"]
        self.betas = betas
        self.created_wall = time.time()
        self.created_mono = time.monotonic()
        self.running_mono = self.created_mono
        self.due_mono = self.created_mono
        self.will_fail = False
        self.expires = False  # its interaction expires when it ends ([sandbox:expire])
        self.final: str | None = None
        self.finished_wall: float | None = None
        self.finished_mono: float | None = None
        self.error: dict[str, Any] | None = None
        self.waiters: list[asyncio.Future[None]] | None = None
        self.taskgroup_id: str | None = None  # set when the run was added to a task group


class Store:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.runs: dict[str, Run] = {}
        self.interactions: dict[str, Run] = {}
        self.expired: set[str] = set()  # interactions refused as previous_interaction_id
        self.calls: deque[dict[str, Any]] = deque(maxlen=config.max_log_entries)
        self.calls_total = 0
        self.webhook_log: deque[dict[str, Any]] = deque(maxlen=config.max_log_entries)
        self.faults = FaultState()
        self.on_terminal: list[Callable[[Run], None]] = []
        self.on_reset: list[Callable[[], None]] = []
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None  # set at app startup
        self._heap: list[tuple[float, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    # --- lifecycle -------------------------------------------------------------------------

    def status(self, run: Run, now: float | None = None) -> str:
        if run.final is not None:
            return run.final
        return "running" if (now or time.monotonic()) >= run.running_mono else "queued"

    def interaction_refusal(self, prev: Any) -> tuple[int, str, str] | None:
        """(status, message, detail) refusing a create whose previous_interaction_id is `prev`:
        an expired interaction, or an unknown one with strict_interactions; None to accept."""
        if prev is None:
            return None
        if prev in self.expired:
            status = self.config.expired_interaction_status
            return status, "Expired previous_interaction_id", f"interaction {prev} has expired"
        if self.config.strict_interactions and prev not in self.interactions:
            return 422, "Unknown previous_interaction_id", f"unknown interaction {prev}"
        return None

    def expire(self, interaction_id: str) -> Run | None:
        """Expire an interaction now (its run is returned; None when unknown)."""
        run = self.interactions.get(interaction_id)
        if run is not None:
            self.expired.add(interaction_id)
        return run

    def create(self, body: dict[str, Any], betas: list[str]) -> Run:
        refused = self.interaction_refusal(body.get("previous_interaction_id"))
        if refused is not None:
            status, message, detail = refused
            loc = ["body", "previous_interaction_id"]
            raise ApiError(status, message, {"errors": [{"loc": loc, "msg": detail}]})
        run_id = f"trun_{secrets.token_hex(16)}"
        interaction_id = (
            run_id if self.config.interaction_id_equals_run_id else f"intr_{secrets.token_hex(16)}"
        )
        run = Run(run_id, interaction_id, body, betas)
        fail, slow, expires = input_markers(question_text(body["input"]))
        latency = max(0.0, slow if slow is not None else self.config.latency_for(run.processor))
        run.running_mono = run.created_mono + min(self.config.queued_s, latency)
        run.due_mono = run.created_mono + latency
        run.will_fail = fail or self.faults.config.fail_runs
        run.expires = expires
        self.runs[run_id] = run
        self.interactions[interaction_id] = run
        self._schedule(run)
        return run

    def get(self, run_id: str) -> Run | None:
        run = self.runs.get(run_id)
        if run is not None and run.final is None and time.monotonic() >= run.due_mono:
            self._finish(run, run.will_fail)
        return run

    def finish(self, run: Run, failed: bool, message: str | None = None) -> bool:
        """Finish a run now (control API); False when it already was terminal."""
        if run.final is not None:
            return False
        self._finish(run, failed, message)
        return True

    def _finish(self, run: Run, failed: bool, message: str | None = None) -> None:
        run.final = "failed" if failed else "completed"
        run.finished_wall = time.time()
        run.finished_mono = time.monotonic()
        if failed:
            run.error = error_object(message or FAILED_MESSAGE)
        if run.expires:
            self.expired.add(run.interaction_id)
        self._wake(run)
        for callback in self.on_terminal:
            callback(run)

    def _wake(self, run: Run) -> None:
        for fut in run.waiters or ():
            if not fut.done():
                fut.set_result(None)
        run.waiters = None

    def _schedule(self, run: Run) -> None:
        heapq.heappush(self._heap, (run.due_mono, run.run_id))
        if run.due_mono < self._timer_at:
            self._arm(run.due_mono)

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, due - time.monotonic()), self._on_timer
        )

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = time.monotonic() + 0.001
        while self._heap and self._heap[0][0] <= now:
            _, run_id = heapq.heappop(self._heap)
            run = self.runs.get(run_id)
            if run is not None and run.final is None:
                self._finish(run, run.will_fail)
        if self._heap and not self.closed:
            self._arm(self._heap[0][0])

    async def wait_terminal(self, run: Run, seconds: float) -> bool:
        """Wait until the run is terminal (True) or `seconds` pass (False); event-driven."""
        self.get(run.run_id)  # finishes it if already due
        if run.final is not None:
            return True
        if self.closed or seconds <= 0:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if run.waiters is None:
            run.waiters = []
        run.waiters.append(fut)
        try:
            await asyncio.wait_for(fut, seconds)
        except TimeoutError:
            pass
        finally:
            if run.waiters is not None and fut in run.waiters:
                run.waiters.remove(fut)
        return run.final is not None

    def reset(self) -> None:
        for run in self.runs.values():
            self._wake(run)
        self.runs.clear()
        self.interactions.clear()
        self.expired.clear()
        self._heap.clear()
        self.calls.clear()
        self.calls_total = 0
        self.webhook_log.clear()
        self.faults.clear()
        for callback in self.on_reset:
            callback()

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        for run in self.runs.values():
            self._wake(run)

    # --- views -----------------------------------------------------------------------------

    def context(self, run: Run) -> list[str]:
        """Inputs of every ancestor along previous_interaction_id, oldest first."""
        chain: list[str] = []
        seen = {run.interaction_id}
        prev = run.body.get("previous_interaction_id")
        while prev and prev not in seen and (parent := self.interactions.get(prev)) is not None:
            seen.add(prev)
            chain.append(question_text(parent.body["input"]))
            prev = parent.body.get("previous_interaction_id")
        chain.reverse()
        return chain

    def task_run(self, run: Run) -> dict[str, Any]:
        now = time.monotonic()
        status = self.status(run, now)
        if run.finished_wall is not None:
            modified = run.finished_wall
        elif status == "running":
            modified = run.created_wall + (run.running_mono - run.created_mono)
        else:
            modified = run.created_wall
        return {
            "run_id": run.run_id,
            "interaction_id": run.interaction_id,
            "status": status,
            "is_active": status in ACTIVE,
            "warnings": None,
            "error": run.error,
            "processor": run.processor,
            "metadata": run.body.get("metadata"),
            "taskgroup_id": run.taskgroup_id,
            "created_at": rfc3339(run.created_wall),
            "modified_at": rfc3339(modified),
        }

    def run_input(self, run: Run) -> dict[str, Any]:
        return {key: run.body[key] for key in RUN_INPUT_FIELDS if key in run.body}

    def output(self, run: Run) -> dict[str, Any] | None:
        if run.final != "completed":
            return None
        return build_output(
            run.body["input"], run.processor, self.context(run), run.body.get("task_spec")
        )

    def record(self, run: Run, with_output: bool = False) -> dict[str, Any]:
        """The control API's view of a run (GET /_sandbox/runs)."""
        body = run.body
        rec: dict[str, Any] = {
            "run_id": run.run_id,
            "interaction_id": run.interaction_id,
            "status": self.status(run),
            "processor": run.processor,
            "input": body["input"],
            "metadata": body.get("metadata"),
            "taskgroup_id": run.taskgroup_id,
            "previous_interaction_id": body.get("previous_interaction_id"),
            "interaction_expired": run.interaction_id in self.expired,
            "task_spec": body.get("task_spec"),
            "webhook": body.get("webhook"),
            "enable_events": body.get("enable_events"),
            "betas": run.betas,
            "error": run.error,
            "created_at": rfc3339(run.created_wall),
            "created_at_unix": run.created_wall,
            "created_at_monotonic": run.created_mono,
            "due_at_monotonic": run.due_mono,
            "completed_at": rfc3339(run.finished_wall) if run.finished_wall is not None else None,
            "completed_at_unix": run.finished_wall,
            "completed_at_monotonic": run.finished_mono,
            "context": self.context(run),
        }
        if with_output:
            rec["output"] = self.output(run)
        return rec

    def log_call(self, entry: dict[str, Any]) -> None:
        self.calls_total += 1
        self.calls.append(entry)

    def stats(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        now = time.monotonic()
        for run in self.runs.values():
            status = self.status(run, now)
            counts[status] = counts.get(status, 0) + 1
        return {"runs": len(self.runs), "by_status": counts, "calls_total": self.calls_total}
