"""What the OpenAPI document says beyond Litestar's routes, applied in one place: `finish`.

Litestar derives the paths from the handlers; `finish` then makes the document describe what a
client meets and what the server enforces:

- component schemas from msgspec itself (service.http.openapi_schemas), so request schemas
  carry `additionalProperties: false` and every limit; enums, metadata, output schemas and
  JSON inputs as named components, so generated clients get one type each;
- the SSE answer of ListEvents (`text/event-stream`) beside its JSON, one schema per message,
  and GetTranscript's markdown (`text/markdown`) beside its JSON;
- the response headers (`X-Request-ID` everywhere, `RateLimit`/`RateLimit-Policy` on /v1,
  `Retry-After` on 429 and 503, `Location` on CreateTurn's 202);
- `security: []` on the public routes, and the outbound webhooks (OpenAPI 3.1 `webhooks`).

Both the served /schema (service.app) and `make openapi` (service.openapi) go through here.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
from litestar import Request, Router
from litestar.openapi.plugins import (
    JsonRenderPlugin,
    OpenAPIRenderPlugin,
    RapidocRenderPlugin,
    RedocRenderPlugin,
    StoplightRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)

from service.domain.transcripts import render_markdown
from service.http import examples as ex
from service.http.openapi_schemas import component_schemas, ref
from service.models import Conversation
from service.schemas import Transcript

# Litestar's `oneOf: [T, null]` of an optional query parameter: a query value is never null.
_NULL = {"type": "null"}


# --- headers ---------------------------------------------------------------------------------

HEADERS: dict[str, Any] = {
    "X-Request-ID": {
        "description": "The request's id (the caller's X-Request-ID when it is 1 to 128 of "
                       "`A-Za-z0-9._-`, else a new one); every log line of the request names it",
        "schema": {"type": "string", "maxLength": 132}},
    "RateLimit": {
        "description": "Where the key stands (IETF draft-ietf-httpapi-ratelimit-headers): "
                       "`r` requests left, `t` seconds until the minute's counter closes. Absent "
                       "for keys without a limit and while Redis is unreachable",
        "schema": {"type": "string", "examples": ['"default";r=599;t=42']}},
    "RateLimit-Policy": {
        "description": "The key's quota: `q` requests per `w` seconds",
        "schema": {"type": "string", "examples": ['"default";q=600;w=60']}},
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer", "minimum": 1}},
    "Location": {
        "description": "The turn's URL: `/v1/conversations/{conversation_id}/turns/{turn_id}`",
        "schema": {"type": "string"}},
    "WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}},
    "Vary": {"description": "`Accept`: the answer's media type follows the Accept header",
             "schema": {"type": "string"}},
}


def header(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/headers/{name}"}


def _add_headers(path: str, operation: dict[str, Any]) -> None:
    keyed = bool(operation.get("security"))
    for status, response in operation["responses"].items():
        names = ["X-Request-ID"]
        if keyed:
            names += ["RateLimit", "RateLimit-Policy"]
        if status in ("429", "503"):
            names.append("Retry-After")
        if status == "401":
            names.append("WWW-Authenticate")
        if status == "202" and operation["operationId"] == "CreateTurn":
            names.append("Location")
        response["headers"] = {name: header(name) for name in names}


# --- the event stream ------------------------------------------------------------------------

def _json_data(schema: str, description: str) -> dict[str, Any]:
    return {"type": "string", "contentMediaType": "application/json",
            "contentSchema": ref(schema), "description": description}


STREAM_SCHEMAS: dict[str, Any] = {
    "StoredEventMessage": {
        "description": "An SSE message for a stored event: `id:` its sequence (resume with "
                       "Last-Event-ID), `event:` its type, `data:` the Event as JSON",
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9]{1,19}$"},
            "event": ref("EventType"),
            "data": _json_data("Event", "The event, as the JSON page lists it"),
        },
        "required": ["id", "event", "data"],
        "additionalProperties": False,
    },
    "ProgressMessage": {
        "description": "An SSE message relaying Parallel's progress for the running turn while "
                       "a client watches: no `id:` (neither stored nor resumable)",
        "type": "object",
        "properties": {
            "event": {"type": "string", "const": "turn.progress"},
            "data": _json_data("ProgressEvent", "The progress event"),
        },
        "required": ["event", "data"],
        "additionalProperties": False,
    },
    "EventStreamMessage": {
        "description": "One message of the stream, by its `event:` field",
        "oneOf": [ref("StoredEventMessage"), ref("ProgressMessage")],
    },
}
STREAM_DESCRIPTION = (
    "With `Accept: text/event-stream`: a Server-Sent Events stream. It sends `retry: 2000` "
    "once, then every stored event after the start point as a message (`id:` its sequence, "
    "`event:` its type, `data:` the Event as JSON), then each new one as it happens, and "
    "`turn.progress` messages (no `id:`) while a turn runs. Heartbeats are comment lines "
    "(`: heartbeat`), which clients dispatch nothing for. The start point is `Last-Event-ID`, "
    "else `after`, else `cursor`, else 0. The stream ends when the key is revoked, the "
    "conversation is deleted, or after MAX_STREAM_S (3,600 s by default): reconnect with "
    "`Last-Event-ID` and nothing is missed. Open streams plus `?wait=` long-polls are limited "
    "per tenant (MAX_OPEN_STREAMS_PER_TENANT): past it, 429 `/problems/too-many-streams`."
)
PROGRESS = {
    "type": "turn.progress", "conversation_id": ex.CONVERSATION_ID, "turn_id": ex.TURN_2,
    "created_at": "2026-02-23T09:16:12.402000Z",
    "data": {"progress_meter": 40.0, "sources_considered": 12, "sources_read": 5,
             "sources_read_sample": ["https://www.olympics.com/en/milano-cortina-2026/medals"],
             "message": "Reading the official medal table", "message_type": "plan",
             "message_at": "2026-02-23T09:16:12.100000Z"},
}
# One message each, as its fields: on the wire, `id: 4`, `event: turn.completed`, `data: {…}`.
STREAM_EXAMPLES = {
    "stored": {"summary": "A stored event (`id:`, `event:`, `data:` lines)", "value": {
        "id": "4", "event": "turn.completed", "data": msgspec.json.encode(ex.EVENT).decode()}},
    "progress": {"summary": "Progress of the running turn (no `id:`)", "value": {
        "event": "turn.progress", "data": msgspec.json.encode(PROGRESS).decode()}},
}


def _add_stream(operation: dict[str, Any]) -> None:
    response = operation["responses"]["200"]
    response["description"] = (
        "A page of events after the start point (JSON), or, with `Accept: text/event-stream`, "
        "the stream of them"
    )
    response["content"]["text/event-stream"] = {
        "schema": {**ref("EventStreamMessage"), "description": STREAM_DESCRIPTION},
        "examples": STREAM_EXAMPLES,
    }


# --- the markdown transcript ----------------------------------------------------------------

MARKDOWN_DESCRIPTION = (
    "With `Accept: text/markdown` (CommonMark, UTF-8): a `# <conversation title>` heading, a line "
    "naming the conversation and the turn, then per turn, oldest first, a `## Turn <seq>` "
    "section: **Question** (a text question quoted with `>`, an object as a fenced `json` "
    "block), **Answer** (a text answer as Parallel wrote it, a JSON one as a fenced `json` "
    "block) and **Citations** (a numbered list of `[title](<url>)` links, numbered as `n` in "
    "the JSON; `None.` when the turn cited nothing). Questions and answers are written "
    "verbatim: render the document with an HTML-sanitizing renderer."
)


def _add_markdown(operation: dict[str, Any]) -> None:
    conversation = msgspec.convert(ex.CONVERSATION, Conversation)
    example = render_markdown(conversation, msgspec.convert(ex.TRANSCRIPT, Transcript))
    response = operation["responses"]["200"]
    response["description"] += "; with `Accept: text/markdown`, the same as a document"
    response["content"]["text/markdown"] = {
        "schema": {"type": "string", "description": MARKDOWN_DESCRIPTION},
        "examples": {"transcript": {"summary": "Two turns, as markdown", "value": example}},
    }
    response["headers"]["Vary"] = header("Vary")


# --- webhooks --------------------------------------------------------------------------------

WEBHOOK_HEADERS = (
    ("webhook-id", "The message id (`msg_…`): the same on every attempt of one event; "
                   "deduplicate on it", "msg_2LJQ8fX5cQyS0v1pWm3Zt9KaB7e"),
    ("webhook-timestamp", "Unix seconds when this attempt was signed; refuse ones far from now",
     "1771838200"),
    ("webhook-signature", "Standard Webhooks signatures, space-separated: `v1,<base64 "
                          "HMAC-SHA256 of '{webhook-id}.{webhook-timestamp}.{body}'>` with each "
                          "live secret (the `whsec_` value base64-decoded after its prefix); "
                          "during a rotation, one per secret replaced within 24 h as well. Accept "
                          "the message when any one matches (the `standardwebhooks` and `svix` "
                          "libraries do)",
     "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4= v1,bm9ub25jZV9vZl90aGVfb2xkX3NlY3JldA=="),
)


def webhook(event_type: str, summary: str, turn: dict[str, Any]) -> dict[str, Any]:
    data = {**ex.EVENT, "type": event_type, "data": turn}
    return {"post": {
        "operationId": "Turn" + event_type.split(".")[1].capitalize() + "Webhook",
        "tags": ["webhooks"],
        "summary": summary,
        "description": (
            f"POSTed to the conversation's `webhook_url` when a turn becomes "
            f"`{event_type.split('.')[1]}`. Delivery is at least once: anything but a 2xx "
            "within the timeout is retried with backoff for about a day, with the same "
            "`webhook-id`. The body is self-contained (the whole turn, with output and basis)."),
        "security": [],
        "parameters": [
            {"name": name, "in": "header", "required": True, "description": description,
             "schema": {"type": "string"}, "example": example}
            for name, description, example in WEBHOOK_HEADERS
        ],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": ref("WebhookPayload"),
            "examples": {event_type: {"summary": summary, "value": {
                "type": event_type, "timestamp": data["created_at"], "data": data}}},
        }}},
        "responses": {
            "2XX": {"description": "Received: the delivery is done"},
            "4XX": {"description": "Refused (a bad signature, say): retried with backoff, "
                                   "then marked failed"},
            "5XX": {"description": "Retried with backoff for about a day"},
        },
    }}


WEBHOOKS = {
    "turn.completed": webhook("turn.completed", "A turn completed", ex.COMPLETED_TURN),
    "turn.failed": webhook("turn.failed", "A turn failed", ex.FAILED_TURN),
    "turn.cancelled": webhook("turn.cancelled", "A turn was cancelled", ex.CANCELLED_TURN),
}


# --- parameters ------------------------------------------------------------------------------

# Bounds Litestar drops from the parameter markers (a falsy `ge=0`).
PARAMETER_MINIMUMS = {"after": 0, "wait": 0}
# What service.domain.cursors.parse_sequence accepts (within int8 too).
PARAMETER_PATTERNS = {"Last-Event-ID": "^[0-9]{1,19}$"}
# Query parameters typed by a shared Literal: its component, so clients get one enum.
PARAMETER_REFS = {"status": "ConversationStatus"}


def _fix_parameter(parameter: dict[str, Any]) -> None:
    schema = parameter["schema"]
    arms = schema.get("oneOf")
    if arms and _NULL in arms and len(arms) == 2:
        (arm,) = [a for a in arms if a != _NULL]
        del schema["oneOf"]
        schema.update(arm)
    for bound in ("minimum", "maximum"):
        if isinstance(schema.get(bound), float) and schema[bound].is_integer():
            schema[bound] = int(schema[bound])
    if parameter["name"] in PARAMETER_MINIMUMS:
        schema["minimum"] = PARAMETER_MINIMUMS[parameter["name"]]
    if parameter["name"] in PARAMETER_PATTERNS:
        schema["pattern"] = PARAMETER_PATTERNS[parameter["name"]]
    if parameter["in"] == "query" and parameter["name"] in PARAMETER_REFS:
        parameter["schema"] = ref(PARAMETER_REFS[parameter["name"]])
        return
    schema.pop("description", None)  # the parameter's own description says it


def finish(document: dict[str, Any]) -> dict[str, Any]:
    """The complete document, from Litestar's (which is left unchanged)."""
    doc = copy.deepcopy(document)
    components = doc.setdefault("components", {})
    components["schemas"] = {
        **component_schemas(list(components.get("schemas", {}))), **STREAM_SCHEMAS}
    components["headers"] = HEADERS
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            operation.setdefault("security", [])
            for parameter in operation.get("parameters", []):
                _fix_parameter(parameter)
            _add_headers(path, operation)
            if operation["operationId"] == "ListEvents":
                _add_stream(operation)
            if operation["operationId"] == "GetTranscript":
                _add_markdown(operation)
    doc["webhooks"] = WEBHOOKS
    return doc


class FinishedRenderPlugin(OpenAPIRenderPlugin):
    """Serves `inner` (JSON, YAML, a UI) with the finished document instead of Litestar's."""

    def __init__(self, inner: OpenAPIRenderPlugin) -> None:
        super().__init__(path=inner.paths, media_type=inner.media_type, favicon=inner.favicon,
                         style=inner.style)
        self.inner = inner
        self._source: dict[str, Any] | None = None
        self._finished: dict[str, Any] = {}

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self._source is not openapi_schema:  # Litestar builds its document once per app
            self._source, self._finished = openapi_schema, finish(openapi_schema)
        return self.inner.render(request, self._finished)

    def receive_router(self, router: Router) -> None:
        self.inner.receive_router(router)


def render_plugins() -> list[OpenAPIRenderPlugin]:
    """Litestar's default set under /schema (Redoc at its root), serving `finish`'s document."""
    inner: list[OpenAPIRenderPlugin] = [
        RedocRenderPlugin(), SwaggerRenderPlugin(), StoplightRenderPlugin(), RapidocRenderPlugin(),
        JsonRenderPlugin(), YamlRenderPlugin(path=["/openapi.yaml", "/openapi.yml"]),
    ]
    return [FinishedRenderPlugin(plugin) for plugin in inner]
