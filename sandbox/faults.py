"""Fault injection set through `POST /_sandbox/faults`.

Decision order for a /v1 call: `response_delay_s` sleep, auth (401), then for a call that
creates runs (`POST /v1/tasks/runs`, a group's `POST …/runs`) the `create_status` fault, then
the random `error_rate` fault.
Every fault is decided before the request has side effects, except the kind
`"drop_after_create"`, which creates the run and then drops the connection (on
other routes it acts as `"drop"`).

`group_events_status` makes only the task groups' event streams answer that status;
`group_events_lose_runs` leaves out of them the events of runs ending meanwhile.

Two faults slow down a create served normally: `create_delay_s` waits before the
request is handled (no run exists meanwhile: a slow Parallel that has not acted
yet), `create_answer_delay_s` creates the run at once and waits that long before
answering (a client that gives up first never learns the run's id).
"""

from __future__ import annotations

import random
import re
from typing import Final, Literal

import msgspec

DROP: Final = "drop"
DROP_AFTER_CREATE: Final = "drop_after_create"
_KIND = re.compile(r"^(drop|drop_after_create|[1-5][0-9][0-9])$")

FAIL_MARKER = "[sandbox:fail]"
SLOW_MARKER = re.compile(r"\[sandbox:slow=([0-9]+(?:\.[0-9]+)?)\]")
# The run's interaction expires as soon as the run ends: later creates naming it are refused.
EXPIRE_MARKER = "[sandbox:expire]"


class FaultConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    create_status: int | None = None
    create_status_count: int | None = None
    error_rate: float = 0.0
    error_kinds: list[str | int] = msgspec.field(
        default_factory=lambda: ["429", "500", "503", "drop"]
    )
    retry_after_s: float | None = 1.0
    seed: int | None = None
    response_delay_s: float = 0.0
    create_delay_s: float = 0.0
    create_answer_delay_s: float = 0.0
    fail_runs: bool = False
    # A group's event stream answers this status (404: a Parallel whose groups have no event
    # streams), every other group route working.
    group_events_status: int | None = None
    # Runs that end while this is set get no task_run.state event in their group's stream (an
    # event lost upstream); the group's status events and run listing still tell.
    group_events_lose_runs: bool = False


Decision = tuple[Literal["status"], int] | tuple[Literal["drop", "drop_after_create"], None]


class FaultState:
    """The active FaultConfig plus its random generator and remaining create_status count."""

    def __init__(self) -> None:
        self.config = FaultConfig()
        self.rng = random.Random()
        self.remaining: int | None = None
        self.kinds: list[str] = []

    def set(self, config: FaultConfig) -> None:
        kinds = [str(k) for k in config.error_kinds]
        bad = [k for k in kinds if not _KIND.match(k)]
        if bad:
            raise ValueError(
                f"unknown error_kinds {bad}; use HTTP status codes, 'drop' or 'drop_after_create'"
            )
        if config.create_delay_s < 0 or config.create_answer_delay_s < 0:
            raise ValueError("create delays must not be negative")
        if not 0.0 <= config.error_rate <= 1.0:
            raise ValueError("error_rate must be between 0 and 1")
        if config.create_status is not None and not 100 <= config.create_status <= 599:
            raise ValueError("create_status must be an HTTP status code")
        if config.group_events_status is not None and not 400 <= config.group_events_status <= 599:
            raise ValueError("group_events_status must be an HTTP error status (400 to 599)")
        self.config = config
        self.kinds = kinds
        self.rng = random.Random(config.seed)
        self.remaining = config.create_status_count

    def clear(self) -> None:
        self.set(FaultConfig())

    def as_dict(self) -> dict[str, object]:
        out = msgspec.structs.asdict(self.config)
        out["create_status_remaining"] = self.remaining
        return out

    def decide(self, is_create: bool) -> Decision | None:
        """Pick the fault for one /v1 call (after auth), or None to serve it normally."""
        cfg = self.config
        if (
            is_create
            and cfg.create_status is not None
            and (self.remaining is None or self.remaining > 0)
        ):
            if self.remaining is not None:
                self.remaining -= 1
            return ("status", cfg.create_status)
        if cfg.error_rate > 0 and self.kinds and self.rng.random() < cfg.error_rate:
            kind = self.rng.choice(self.kinds)
            if kind == DROP_AFTER_CREATE:
                return (DROP_AFTER_CREATE, None) if is_create else (DROP, None)
            if kind == DROP:
                return (DROP, None)
            return ("status", int(kind))
        return None


def input_markers(text: str) -> tuple[bool, float | None, bool]:
    """(fail, slow_seconds, expire) from `[sandbox:fail]`, `[sandbox:slow=SECONDS]` and
    `[sandbox:expire]` in the input."""
    match = SLOW_MARKER.search(text)
    return FAIL_MARKER in text, float(match.group(1)) if match else None, EXPIRE_MARKER in text
