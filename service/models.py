"""Wire types shared by the API, the worker and the event log (DESIGN.md §3)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

TurnStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
EventType = Literal[
    "turn.queued", "turn.running", "turn.completed", "turn.failed", "turn.cancelled"
]


class Citation(msgspec.Struct, kw_only=True):
    url: str
    title: str | None = None
    excerpts: list[str] | None = None


class FieldBasis(msgspec.Struct, kw_only=True):
    field: str
    citations: list[Citation] = []
    reasoning: str | None = None
    confidence: str | None = None


class TextOutput(msgspec.Struct, kw_only=True, tag_field="type", tag="text"):
    content: str


class JsonOutput(msgspec.Struct, kw_only=True, tag_field="type", tag="json"):
    content: dict[str, Any]


class TurnError(msgspec.Struct, kw_only=True):
    code: str
    message: str


class Turn(msgspec.Struct, kw_only=True):
    id: str
    conversation_id: str
    seq: int
    parent_turn_id: str | None
    input: str | dict[str, Any]
    processor: str
    output_schema: dict[str, Any]
    metadata: dict[str, str]
    status: TurnStatus
    run_id: str | None
    interaction_id: str | None
    previous_interaction_id: str | None
    output: TextOutput | JsonOutput | None
    basis: list[FieldBasis] | None
    error: TurnError | None
    upstream_may_continue: bool
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


class Conversation(msgspec.Struct, kw_only=True):
    id: str
    title: str | None
    processor: str
    metadata: dict[str, str]
    webhook_url: str | None
    status: Literal["idle", "active"]
    turn_count: int
    last_turn_id: str | None
    created_at: datetime
    updated_at: datetime


class Event(msgspec.Struct, kw_only=True):
    sequence: int
    type: EventType
    conversation_id: str
    turn_id: str
    created_at: datetime
    data: Turn
