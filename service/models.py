"""Wire types shared by the API, the worker and the event log (docs/design.md §3)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

TurnStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
ConversationStatus = Literal["idle", "active"]
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
TurnContext = Literal["none", "chained", "reseeded"]
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
    # Events and idempotent answers stored before this field existed lack it: null then.
    context: Annotated[TurnContext | None, Meta(description=(
        "How the run was given the conversation's context: `none` (no completed ancestor), "
        "`chained` (created with `previous_interaction_id`), or `reseeded` (Parallel refused "
        "that interaction on create, expired or unknown, so the run was created once more "
        "without it, the lineage's earlier questions and answers prefixed to its input; "
        "`previous_interaction_id` is then null). Null until the turn's run is created: while "
        "queued, and for a turn that failed or was cancelled before it had a run."
    ))] = None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


class Conversation(msgspec.Struct, kw_only=True):
    id: str
    title: str | None
    processor: str
    metadata: dict[str, str]
    webhook_url: str | None
    status: ConversationStatus
    turn_count: int
    last_turn_id: str | None
    ttl_seconds: int | None
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime


class Event(msgspec.Struct, kw_only=True):
    sequence: int
    type: EventType
    conversation_id: str
    turn_id: str
    created_at: datetime
    data: Turn


class Progress(msgspec.Struct, kw_only=True):
    """The latest of Parallel's progress reports for a running turn's run (each field null until
    Parallel reports it)."""

    progress_meter: Annotated[
        float | None, Meta(description="Parallel's estimate of how far the run is, 0 to 100")
    ] = None
    sources_considered: Annotated[int | None, Meta(description="Sources looked at so far")] = None
    sources_read: Annotated[int | None, Meta(description="Sources read so far")] = None
    sources_read_sample: Annotated[
        list[str] | None, Meta(description="Some of the URLs read")
    ] = None
    message: Annotated[str | None, Meta(description="Parallel's latest progress message")] = None
    message_type: Annotated[
        str | None, Meta(description="Its kind, as Parallel names it (e.g. `plan`)")
    ] = None
    message_at: Annotated[
        str | None, Meta(description="When Parallel wrote the message (RFC 3339)")
    ] = None


class ProgressEvent(msgspec.Struct, kw_only=True):
    """`turn.progress`: SSE only, never stored or sent as a webhook, so it has no sequence."""

    type: Literal["turn.progress"] = "turn.progress"
    conversation_id: str
    turn_id: str
    created_at: datetime  # when the stream relayed it
    data: Progress


DeliveryStatus = Literal["pending", "delivered", "failed"]


class WebhookAttempt(msgspec.Struct, kw_only=True):
    attempt: int
    started_at: datetime
    status_code: int | None
    latency_ms: int | None
    error: str | None
    response_excerpt: str | None


class WebhookDelivery(msgspec.Struct, kw_only=True):
    id: str
    conversation_id: str
    event_sequence: int
    event_type: EventType
    webhook_id: str
    url: str
    status: DeliveryStatus
    attempt_count: int
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None
    attempts: list[WebhookAttempt]


class WebhookDeliveryPage(msgspec.Struct, kw_only=True):
    data: list[WebhookDelivery]
    next_cursor: str | None


class AttemptOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """How one webhook attempt went, as the ledger records it."""

    started_at: datetime
    status_code: int | None
    latency_ms: int | None
    error: str | None
    response_excerpt: str | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status_code is not None and 200 <= self.status_code < 300
