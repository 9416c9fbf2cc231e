"""Validation of `POST /v1/tasks/runs` bodies, following docs/parallel.md §1.2."""

from __future__ import annotations

from typing import Any

from sandbox.config import PROCESSORS
from sandbox.wire import ApiError, encode

MAX_INPUT_CHARS = 25_000
MAX_SCHEMA_DEPTH = 3
MAX_METADATA_KEY = 16
MAX_METADATA_VALUE = 512
MAX_SOURCE_POLICY_DOMAINS = 200
WEBHOOK_BETA = "webhook-2025-08-12"

# Fields of RunInput (SDK types/run_input.py), echoed by GET /input.
RUN_INPUT_FIELDS = (
    "input",
    "processor",
    "task_spec",
    "previous_interaction_id",
    "metadata",
    "webhook",
    "enable_events",
    "source_policy",
    "advanced_settings",
    "mcp_servers",
    "memory_scope_key",
)


def _invalid(loc: str, msg: str) -> ApiError:
    return ApiError(
        422, "Request validation error", {"errors": [{"loc": ["body", loc], "msg": msg}]}
    )


def output_schema_kind(task_spec: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """Return ("text" | "json" | "auto", json_schema or None) for a validated task_spec.

    No task_spec means text here (the brief's choice; Parallel documents auto as the default).
    An object without `type` reads as Parallel's OpenAPI reads it: the first of JsonSchema
    (needs `json_schema`), TextSchema (no required field) and AutoSchema that it fits, so `{}`
    (the SDK's `TextSchemaParam()`) is a text schema and only `{"type": "auto"}` is auto.
    """
    if task_spec is None:
        return "text", None
    schema = task_spec.get("output_schema")
    if isinstance(schema, str):
        return "text", None
    if not isinstance(schema, dict):
        return "auto", None
    kind = schema.get("type")
    if kind is None:
        kind = "json" if "json_schema" in schema else "text"
    return kind, schema.get("json_schema") if kind == "json" else None


def object_depth(schema: Any, defs: dict[str, Any], guard: int = 0) -> int:
    """Object nesting depth: a flat object is 1; arrays do not add a level."""
    if not isinstance(schema, dict) or guard > 32:  # guard: recursive $refs
        return 0
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        schema = defs.get(ref.rsplit("/", 1)[-1], {})
    depth = 0
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key) or []:
            depth = max(depth, object_depth(sub, defs, guard + 1))
    if isinstance(schema.get("items"), dict):
        depth = max(depth, object_depth(schema["items"], defs, guard + 1))
    props = schema.get("properties")
    if isinstance(props, dict) or schema.get("type") == "object":
        inner = [object_depth(p, defs, guard + 1) for p in (props or {}).values()]
        depth = max(depth, 1 + max(inner, default=0))
    return depth


def check_task_spec(task_spec: Any) -> None:
    if task_spec is None:
        return
    if not isinstance(task_spec, dict) or "output_schema" not in task_spec:
        raise _invalid("task_spec", "task_spec must be an object with output_schema")
    schema = task_spec["output_schema"]
    if isinstance(schema, str):
        return
    if not isinstance(schema, dict):
        raise _invalid("task_spec.output_schema", "output_schema must be an object or a string")
    kind, json_schema = output_schema_kind(task_spec)
    if kind not in ("json", "text", "auto"):
        raise _invalid("task_spec.output_schema.type", "type must be one of json, text, auto")
    if kind == "json":
        if not isinstance(json_schema, dict):
            raise _invalid("task_spec.output_schema.json_schema", "json_schema must be an object")
        defs = {**json_schema.get("definitions", {}), **json_schema.get("$defs", {})}
        if object_depth(json_schema, defs) > MAX_SCHEMA_DEPTH:
            raise ApiError(
                422,
                "Output schema is too complex: nested more than 3 levels deep",
                {
                    "errors": [
                        {"loc": ["body", "task_spec", "output_schema"], "msg": "schema too deep"}
                    ]
                },
            )


def check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise _invalid("metadata", "metadata must be an object")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise _invalid(
                "metadata", f"metadata key {key!r} is longer than {MAX_METADATA_KEY} characters"
            )
        if not isinstance(value, str | int | float | bool):
            raise _invalid(
                "metadata", f"metadata value for {key!r} must be a string, number or boolean"
            )
        if isinstance(value, str) and len(value) > MAX_METADATA_VALUE:
            raise _invalid(
                "metadata",
                f"metadata value for {key!r} is longer than {MAX_METADATA_VALUE} characters",
            )


def _check_webhook(webhook: Any, betas: list[str], strict_betas: bool) -> None:
    if webhook is None:
        return
    if not isinstance(webhook, dict) or not isinstance(webhook.get("url"), str):
        raise _invalid("webhook", "webhook must be an object with a url")
    if not webhook["url"].startswith(("http://", "https://")):
        raise _invalid("webhook.url", "webhook url must be http(s)")
    types = webhook.get("event_types")
    if types is not None and (
        not isinstance(types, list) or any(t != "task_run.status" for t in types)
    ):
        raise _invalid("webhook.event_types", "event_types may only contain 'task_run.status'")
    if strict_betas and WEBHOOK_BETA not in betas:
        raise _invalid("webhook", f"webhooks need the header parallel-beta: {WEBHOOK_BETA}")


def validate_create(body: Any, betas: list[str], strict_betas: bool = False) -> dict[str, Any]:
    """Check a decoded create body; return it unchanged or raise ApiError (422 or 403)."""
    if not isinstance(body, dict):
        raise _invalid("", "body must be a JSON object")
    if "input" not in body or not isinstance(body["input"], str | dict):
        raise _invalid("input", "input is required and must be a string or an object")
    processor = body.get("processor")
    if not isinstance(processor, str):
        raise _invalid("processor", "processor is required and must be a string")
    if processor not in PROCESSORS:
        raise ApiError(403, "Forbidden: invalid processor in request")
    prev = body.get("previous_interaction_id")
    if prev is not None and not isinstance(prev, str):
        raise _invalid("previous_interaction_id", "previous_interaction_id must be a string")
    check_task_spec(body.get("task_spec"))
    check_metadata(body.get("metadata"))
    _check_webhook(body.get("webhook"), betas, strict_betas)
    if body.get("enable_events") is not None and not isinstance(body["enable_events"], bool):
        raise _invalid("enable_events", "enable_events must be a boolean")
    policy = body.get("source_policy")
    if policy is not None:
        if not isinstance(policy, dict):
            raise _invalid("source_policy", "source_policy must be an object")
        domains = (policy.get("include_domains") or []) + (policy.get("exclude_domains") or [])
        if len(domains) > MAX_SOURCE_POLICY_DOMAINS:
            raise _invalid("source_policy", "at most 200 include and exclude domains in total")
    text = body["input"] if isinstance(body["input"], str) else encode(body["input"]).decode()
    spec = body.get("task_spec")
    size = len(text) + (len(encode(spec).decode()) if spec is not None else 0)
    if size > MAX_INPUT_CHARS:
        raise ApiError(
            422,
            f"Input and task spec are too long: {size} characters (limit {MAX_INPUT_CHARS})",
            {"errors": [{"loc": ["body", "input"], "msg": "input too long"}]},
        )
    return body
