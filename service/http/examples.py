"""Examples for the OpenAPI document: request bodies and successful answers, as clients see them.

`answer(...)` documents a route's success response with examples (it replaces the one Litestar
derives from the return type, same schema); `body(...)` annotates a request body. Error answers
and their examples come from service.http.problems.problem_responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example
from litestar.params import BodyKwarg

CONVERSATION_ID = "conv_5d3aaf9f42be041f26853248"
TURN_1 = "turn_9a31a0607ae061b9a28d34e2"
TURN_2 = "turn_4be2c6a1d05f7e93b8a1c044"
CREATED_AT = "2026-02-23T09:15:02.114000Z"

CONVERSATION: dict[str, Any] = {
    "id": CONVERSATION_ID,
    "title": "Winter Olympics 2026",
    "processor": "lite",
    "metadata": {"team": "sports-desk"},
    "webhook_url": "https://example.com/webhooks/research",
    "status": "idle",
    "turn_count": 2,
    "last_turn_id": TURN_2,
    "ttl_seconds": 2592000,
    "expires_at": "2026-03-25T09:16:40.520000Z",
    "created_at": CREATED_AT,
    "updated_at": "2026-02-23T09:16:40.520000Z",
}
NEW_CONVERSATION: dict[str, Any] = {
    **CONVERSATION, "turn_count": 0, "last_turn_id": None, "updated_at": CREATED_AT,
    "expires_at": "2026-03-25T09:15:02.114000Z",
    "webhook_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
}

QUEUED_TURN: dict[str, Any] = {
    "id": TURN_2,
    "conversation_id": CONVERSATION_ID,
    "seq": 2,
    "parent_turn_id": TURN_1,
    "input": "How many medals did they win?",
    "processor": "lite",
    "output_schema": {"type": "text"},
    "metadata": {},
    "status": "queued",
    "run_id": None,
    "interaction_id": None,
    "previous_interaction_id": None,
    "output": None,
    "basis": None,
    "error": None,
    "upstream_may_continue": False,
    "context": None,
    "created_at": "2026-02-23T09:16:01.001000Z",
    "started_at": None,
    "completed_at": None,
}
COMPLETED_TURN: dict[str, Any] = {
    **QUEUED_TURN,
    "status": "completed",
    "run_id": "trun_f43b54cb9e51f619d98816841c4758f3",
    "interaction_id": "intr_0c5e4f8a6b1d42e3a9f7",
    "previous_interaction_id": "intr_7d2a9c1e3f5b48a6c0d1",
    "context": "chained",
    "output": {"type": "text", "content": "Norway won 41 medals: 18 gold, 12 silver, 11 bronze."},
    "basis": [{
        "field": "output",
        "citations": [{
            "url": "https://www.olympics.com/en/milano-cortina-2026/medals",
            "title": "Milano Cortina 2026 medal table",
            "excerpts": ["Norway tops the medal table with 18 gold medals."],
        }],
        "reasoning": "The official medal table lists Norway's totals.",
        "confidence": "high",
    }],
    "started_at": "2026-02-23T09:16:01.210000Z",
    "completed_at": "2026-02-23T09:16:40.518000Z",
}
FAILED_TURN: dict[str, Any] = {
    **QUEUED_TURN,
    "status": "failed",
    "run_id": "trun_6ab1c9d0e2f34a5b8c7d9e0f1a2b3c4d",
    "interaction_id": "intr_2e4f6a8b0c1d3e5f7a9b",
    "context": "none",
    "error": {"code": "timeout", "message": "The run was still running after 300 s."},
    "upstream_may_continue": True,
    "started_at": "2026-02-23T09:16:01.210000Z",
    "completed_at": "2026-02-23T09:21:01.400000Z",
}
# Parallel refused the parent's interaction (expired): the run was created without it.
RESEEDED_TURN: dict[str, Any] = {
    **COMPLETED_TURN,
    "run_id": "trun_0b7e2d9a4c6f48e1a3d5b7c9e1f3a5b7",
    "interaction_id": "intr_5a7c9e1b3d5f4a6c8e0b",
    "previous_interaction_id": None,
    "context": "reseeded",
}
CANCELLED_TURN: dict[str, Any] = {
    **QUEUED_TURN, "status": "cancelled", "completed_at": "2026-02-23T09:16:03.870000Z",
}


@dataclass
class ExampleObject(Example):
    """An OpenAPI Example Object that keeps the nulls of its value (Litestar drops None from
    every dict it renders, which would hide fields such as `"run_id": null`) and whose id is
    only its key in `examples`."""

    def to_schema(self) -> dict[str, Any]:
        fields = {"summary": self.summary, "description": self.description, "value": self.value,
                  "externalValue": self.external_value}
        return {key: value for key, value in fields.items() if value is not None}


def example(id: str, summary: str, value: Any) -> Example:
    return ExampleObject(id=id, summary=summary, value=value)


def body(*examples: Example) -> BodyKwarg:
    """Request body metadata carrying examples: `data: Annotated[Model, body(...)]`."""
    return BodyKwarg(examples=list(examples))


def answer(
    status: int, model: Any, description: str, *examples: Example
) -> dict[int, ResponseSpec]:
    """The success response of a route, with examples, for its `responses=` mapping."""
    return {status: ResponseSpec(data_container=model, description=description,
                                 generate_examples=False, examples=list(examples))}


CREATE_CONVERSATION = (
    example("minimal", "Defaults only", {}),
    example("with-webhook", "A title, a processor, metadata, a webhook URL, a 30-day TTL", {
        "title": "Winter Olympics 2026", "processor": "lite",
        "metadata": {"team": "sports-desk"}, "webhook_url": "https://example.com/webhooks/research",
        "ttl_seconds": 2592000,
    }),
)
UPDATE_CONVERSATION = (
    example("retitle", "Change the title", {"title": "Milano Cortina 2026"}),
    example("move-webhooks", "Send webhooks to a new URL",
            {"webhook_url": "https://example.com/webhooks/research-v2"}),
    example("keep", "Keep the conversation: no TTL", {"ttl_seconds": None}),
)
CREATE_TURN = (
    example("question", "A follow-up question", {"input": "How many medals did they win?"}),
    example("json-output", "Structured output with a JSON schema", {
        "input": "Medal count of the top three countries at the 2026 Winter Olympics",
        "processor": "core",
        "output_schema": {"type": "json", "json_schema": {
            "type": "object",
            "properties": {"countries": {"type": "array", "items": {
                "type": "object",
                "properties": {"country": {"type": "string"}, "gold": {"type": "integer"},
                               "total": {"type": "integer"}},
            }}},
        }},
        "metadata": {"ticket": "SPORTS-42"},
    }),
    example("branch", "Branch from an earlier turn", {
        "input": "And in 2022?", "parent_turn_id": TURN_1,
    }),
    example("reject-if-busy", "Refuse (409) while the conversation's previous turn is open",
            {"input": "How many were gold?", "if_busy": "reject"}),
    example("interrupt", "Replace the open turn with this question",
            {"input": "Actually: how many were gold?", "if_busy": "interrupt"}),
)
EVENT = {
    "sequence": 4, "type": "turn.completed", "conversation_id": CONVERSATION_ID,
    "turn_id": TURN_2, "created_at": "2026-02-23T09:16:40.520000Z", "data": COMPLETED_TURN,
}
DELIVERY = {
    "id": "whd_3f9c2a7b1e5d4c6a8b0e",
    "conversation_id": CONVERSATION_ID,
    "event_sequence": 4,
    "event_type": "turn.completed",
    "webhook_id": "msg_2LJQ8fX5cQyS0v1pWm3Zt9KaB7e",
    "url": "https://example.com/webhooks/research",
    "status": "delivered",
    "attempt_count": 2,
    "next_attempt_at": None,
    "created_at": "2026-02-23T09:16:40.520000Z",
    "delivered_at": "2026-02-23T09:16:46.731000Z",
    "attempts": [
        {"attempt": 1, "started_at": "2026-02-23T09:16:40.601000Z", "status_code": 503,
         "latency_ms": 212, "error": None, "response_excerpt": "Service Unavailable"},
        {"attempt": 2, "started_at": "2026-02-23T09:16:46.602000Z", "status_code": 200,
         "latency_ms": 129, "error": None, "response_excerpt": "ok"},
    ],
}
USAGE = {
    "month": "2026-02",
    "total_usd": 0.125,
    "budget_usd": 50.0,
    "by_processor": [{"processor": "lite", "turns": 25, "usd": 0.125}],
    "by_conversation": [{"conversation_id": CONVERSATION_ID, "turns": 25, "usd": 0.125}],
}
MEDALS_URL = "https://www.olympics.com/en/milano-cortina-2026/medals"
SOURCES = {"data": [
    {"url": MEDALS_URL, "title": "Milano Cortina 2026 medal table", "first_turn_id": TURN_1,
     "turn_ids": [TURN_1, TURN_2],
     "excerpts": ["Norway tops the medal table with 18 gold medals.",
                  "Norway: 18 gold, 12 silver, 11 bronze."]},
    {"url": "https://en.wikipedia.org/wiki/2026_Winter_Olympics_medal_table",
     "title": "2026 Winter Olympics medal table", "first_turn_id": TURN_2,
     "turn_ids": [TURN_2], "excerpts": []},
]}
TRANSCRIPT = {
    "conversation_id": CONVERSATION_ID,
    "turn_id": TURN_2,
    "turns": [
        {"id": TURN_1, "seq": 1, "input": "Which country won the most gold medals in 2026?",
         "output": {"type": "text", "content": "Norway, with 18 gold medals."},
         "citations": [{"n": 1, "url": MEDALS_URL, "title": "Milano Cortina 2026 medal table"}]},
        {"id": TURN_2, "seq": 2, "input": "How many medals did they win?",
         "output": COMPLETED_TURN["output"],
         "citations": [
             {"n": 1, "url": MEDALS_URL, "title": "Milano Cortina 2026 medal table"},
             {"n": 2, "url": "https://en.wikipedia.org/wiki/2026_Winter_Olympics_medal_table",
              "title": "2026 Winter Olympics medal table"}]},
    ],
}
