"""When group mode (PARALLEL_TASK_GROUPS=auto) gives the task groups up: group calls failing in a
row, with none answered between, not failures scattered among answered calls."""

from __future__ import annotations

from typing import Any

from service.config import Settings
from service.domain.groups import FAILURES_BEFORE_FALLBACK, GroupStarts
from service.errors import UpstreamUnavailable

FAILED = UpstreamUnavailable("Parallel answered 503.")


def starts() -> GroupStarts:
    settings = Settings(database_url="postgresql://unused", redis_url="redis://unused",
                        parallel_api_key="unused", parallel_task_groups="auto")
    # Counting failures needs neither Postgres nor Parallel.
    none: Any = None
    return GroupStarts(none, none, settings, follower="test")


def test_failures_with_a_stream_read_between_them_keep_the_groups():
    groups = starts()
    for _ in range(5):
        for _ in range(FAILURES_BEFORE_FALLBACK - 1):
            groups.stream_read(FAILED)
        groups.stream_read(None)
    assert groups.active


def test_failures_in_a_row_go_one_by_one():
    groups = starts()
    for _ in range(FAILURES_BEFORE_FALLBACK - 1):
        groups.stream_read(FAILED)
    assert groups.active
    groups.stream_read(FAILED)
    assert not groups.active
