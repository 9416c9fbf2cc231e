"""SSE stream for `GET /v1/tasks/runs/{id}/events` (docs/parallel.md §5).

Each message is `event: <type>` plus one JSON `data:` line; no `id:` lines, no keep-alive
comments, no `[DONE]`. Order: a `task_run.state` event, the progress trace so far (replayed
on every connection), progress messages and `task_run.progress_stats` on every tick while the
run is active, then the remaining trace, a final `task_run.state` (with `output` when
completed) and the end of the stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from sandbox.answers import question_text
from sandbox.store import Run, Store
from sandbox.wire import encode, rfc3339

# (fraction of the run's duration, message type suffix, template)
_SCRIPT = (
    (0.0, "exec_status", "Starting research"),
    (0.05, "plan", "Planning how to answer: {q}"),
    (0.2, "search", "Searching the web for: {q}"),
    (0.45, "search", "Reading sources about: {q}"),
    (0.7, "exec_status", "Cross-checking {n} sources"),
    (0.9, "exec_status", "Writing the answer"),
)
SOURCES_CONSIDERED = 40
SOURCES_READ = 12


def _sse(payload: dict[str, Any]) -> bytes:
    kind: str = payload["type"]
    return b"event: " + kind.encode() + b"\ndata: " + encode(payload) + b"\n\n"


def _state(store: Store, run: Run, final: bool) -> bytes:
    output = store.output(run) if final else None
    return _sse(
        {
            "type": "task_run.state",
            "event_id": None,
            "input": None,
            "run": store.task_run(run),
            "output": output,
        }
    )


def _message(run: Run, index: int) -> bytes:
    fraction, kind, template = _SCRIPT[index]
    question = question_text(run.body["input"])[:120]
    at = run.created_wall + fraction * (run.due_mono - run.created_mono)
    return _sse(
        {
            "type": f"task_run.progress_msg.{kind}",
            "message": template.format(q=question, n=SOURCES_CONSIDERED),
            "timestamp": rfc3339(at),
        }
    )


def _stats(run: Run, fraction: float) -> bytes:
    read = int(SOURCES_READ * fraction)
    sample = [f"https://example.org/{run.run_id[-8:]}/source-{i}" for i in range(min(read, 3))]
    return _sse(
        {
            "type": "task_run.progress_stats",
            "progress_meter": round(100.0 * fraction, 1),
            "source_stats": {
                "num_sources_considered": int(SOURCES_CONSIDERED * fraction),
                "num_sources_read": read,
                "sources_read_sample": sample,
            },
        }
    )


def _fraction(run: Run, now: float) -> float:
    span = run.due_mono - run.running_mono
    if now < run.running_mono:
        return 0.0
    if span <= 0:
        return 1.0
    return min(1.0, (now - run.running_mono) / span)


def tick_interval(store: Store, run: Run) -> float:
    if store.config.events_interval_s is not None:
        return store.config.events_interval_s
    return min(2.0, max(0.1, (run.due_mono - run.created_mono) / 20))


async def stream_events(store: Store, run: Run) -> AsyncIterator[bytes]:
    store.get(run.run_id)  # finish it if already due
    yield _state(store, run, final=False)
    sent = 0
    deadline = time.monotonic() + store.config.events_max_s
    interval = tick_interval(store, run)
    while run.final is None:
        now = time.monotonic()
        fraction = _fraction(run, now)
        while sent < len(_SCRIPT) and _SCRIPT[sent][0] <= fraction and now >= run.running_mono:
            yield _message(run, sent)
            sent += 1
        yield _stats(run, fraction)
        if now >= deadline or store.closed:
            return  # the real API closes streams after 570 s
        await store.wait_terminal(run, min(interval, deadline - now))
    if run.final == "completed":
        while sent < len(_SCRIPT):
            yield _message(run, sent)
            sent += 1
        yield _stats(run, 1.0)
    yield _state(store, run, final=True)
