"""Request bodies and pages of the contract (docs/design.md §3). Validation lives in the types."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from service.models import Conversation, Event, JsonOutput, TextOutput, Turn

MAX_METADATA_KEY, MAX_METADATA_VALUE, MAX_METADATA_PAIRS = 16, 512, 16
MetadataKey = Annotated[
    str, Meta(min_length=1, max_length=MAX_METADATA_KEY, description="At most 16 characters")
]
MetadataValue = Annotated[
    str, Meta(max_length=MAX_METADATA_VALUE, description="At most 512 characters")
]
Metadata = Annotated[
    dict[MetadataKey, MetadataValue],
    Meta(max_length=MAX_METADATA_PAIRS,
         description="Up to 16 string pairs; passed to Parallel with the run"),
]
Title = Annotated[str, Meta(max_length=200)]
Processor = Annotated[
    str, Meta(min_length=1, max_length=32, description="A Parallel processor, e.g. lite or core")
]
WebhookUrl = Annotated[
    str,
    Meta(max_length=2048, pattern=r"^https?://[^\s/]+",
         description="http(s) URL for turn webhooks; it must resolve to public addresses only "
                     "(unless WEBHOOK_ALLOW_PRIVATE)"),
]
Id = Annotated[str, Meta(min_length=1, max_length=64)]
MAX_TTL_S = 31_536_000  # 365 days
TtlSeconds = Annotated[
    int,
    Meta(ge=1, le=MAX_TTL_S,
         description="Delete the conversation this many seconds after its last activity "
                     "(1 to 31,536,000: 365 days); null: keep it"),
]


class Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every request body: unknown fields are an error, not silently dropped."""


class ConversationCreate(Request):
    title: Title | None = None
    processor: Processor | None = None
    metadata: Metadata = {}
    webhook_url: WebhookUrl | None = None
    ttl_seconds: TtlSeconds | None = None


class ConversationUpdate(Request):
    title: Title | msgspec.UnsetType | None = msgspec.UNSET
    processor: Processor | msgspec.UnsetType = msgspec.UNSET
    metadata: Metadata | msgspec.UnsetType = msgspec.UNSET
    webhook_url: WebhookUrl | msgspec.UnsetType | None = msgspec.UNSET
    ttl_seconds: TtlSeconds | msgspec.UnsetType | None = msgspec.UNSET


class TextOutputSchema(Request, tag_field="type", tag="text", omit_defaults=True):
    """A text answer, optionally described."""

    description: Annotated[str, Meta(max_length=10_000)] | None = None


class JsonOutputSchema(Request, tag_field="type", tag="json"):
    """A JSON answer fitting `json_schema`: a JSON schema of type object with properties."""

    json_schema: dict[str, Any]


class AutoOutputSchema(Request, tag_field="type", tag="auto"):
    """Parallel chooses the answer's shape."""


# The names the domain checks use (service.domain.validation).
TextSchema = TextOutputSchema
JsonSchema = JsonOutputSchema
AutoSchema = AutoOutputSchema
OutputSchema = TextOutputSchema | JsonOutputSchema | AutoOutputSchema

TurnInput = (
    Annotated[str, Meta(min_length=1, description="The question, at most 25,000 characters")]
    | Annotated[dict[str, Any], Meta(min_length=1, description="A JSON object input")]
)


# What a new turn does when its conversation already has a queued or running turn.
IfBusy = Annotated[
    Literal["enqueue", "reject", "interrupt"],
    Meta(description="When the conversation already has a queued or running turn: `enqueue` "
                     "queues behind it; `reject` answers 409 `/problems/conversation-busy` and "
                     "writes nothing; `interrupt` cancels every open turn (as cancel does) in "
                     "the same transaction, then queues this one"),
]


class TurnCreate(Request):
    input: TurnInput
    processor: Processor | None = None
    output_schema: OutputSchema = msgspec.field(default_factory=TextOutputSchema)
    parent_turn_id: Id | None = None
    metadata: Metadata = {}
    if_busy: IfBusy = "enqueue"


class ConversationWithSecret(Conversation, kw_only=True, omit_defaults=True):
    """A conversation as created or changed: `webhook_secret` appears once, when a webhook URL
    gets its first secret."""

    webhook_secret: str | None = None


class WebhookSecret(msgspec.Struct, kw_only=True):
    webhook_secret: str


class ConversationPage(msgspec.Struct, kw_only=True):
    data: list[Conversation]
    next_cursor: str | None


class TurnPage(msgspec.Struct, kw_only=True):
    data: list[Turn]
    next_cursor: str | None


class EventPage(msgspec.Struct, kw_only=True):
    data: list[Event]
    next_cursor: str | None


class Source(msgspec.Struct, kw_only=True):
    """A URL the conversation's completed turns cited, with every turn that cited it."""

    url: str
    title: Annotated[str | None, Meta(description="The first title a citation gave it")]
    first_turn_id: Annotated[str, Meta(description="The earliest turn (by seq) citing it")]
    turn_ids: Annotated[list[str], Meta(description="Each turn citing it, once, by seq")]
    excerpts: Annotated[list[str], Meta(description="Every excerpt cited from it, once each")]


class SourceList(msgspec.Struct, kw_only=True):
    """The conversation's bibliography, whole (not paged), in first-seen order."""

    data: list[Source]


class NumberedCitation(msgspec.Struct, kw_only=True):
    n: Annotated[int, Meta(ge=1, description="Its number within the turn, from 1")]
    url: str
    title: str | None


class TranscriptTurn(msgspec.Struct, kw_only=True):
    id: str
    seq: int
    input: str | dict[str, Any]
    output: TextOutput | JsonOutput
    citations: Annotated[
        list[NumberedCitation], Meta(description="The turn's cited URLs, once each, numbered")
    ]


class Transcript(msgspec.Struct, kw_only=True):
    """A turn's lineage: its completed ancestors and itself, oldest first."""

    conversation_id: str
    turn_id: Annotated[
        str | None, Meta(description="The turn it ends at; null when no turn has completed")
    ]
    turns: list[TranscriptTurn]


class ProcessorUsage(msgspec.Struct, kw_only=True):
    processor: str
    turns: int
    usd: float


class ConversationUsage(msgspec.Struct, kw_only=True):
    conversation_id: str
    turns: int
    usd: float


class Usage(msgspec.Struct, kw_only=True):
    """Estimated spend of one calendar month (UTC): Parallel's price per run of each turn."""

    month: Annotated[str, Meta(description="YYYY-MM")]
    total_usd: float
    budget_usd: Annotated[float | None, Meta(description="The monthly budget; null: none")]
    by_processor: list[ProcessorUsage]
    by_conversation: list[ConversationUsage]


class ProblemItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    field: str
    message: str
    source: str | None = None


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An error (RFC 9457 problem details), served as application/problem+json."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[ProblemItem] | None = None


TerminalEventType = Literal["turn.completed", "turn.failed", "turn.cancelled"]


class WebhookPayload(msgspec.Struct, kw_only=True):
    """The body of an outbound webhook (migration 0014's append_event writes it)."""

    type: TerminalEventType
    timestamp: datetime  # the event's created_at
    data: Event
