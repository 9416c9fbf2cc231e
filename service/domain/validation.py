"""Checks that need settings or more than one field, done before anything is written."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec

from service.config import Settings
from service.errors import BadRequest, InvalidInput
from service.schemas import JsonSchema, TextSchema, TurnCreate

# Parallel refuses output schemas nested deeper than this (docs/parallel.md §1.2).
MAX_SCHEMA_DEPTH = 3
# Raw nesting (objects and arrays) allowed in a json_schema: room for a 3-deep schema with
# arrays and combinators, and a bound for the recursive checks below.
MAX_SCHEMA_NESTING = 16

# Postgres integer columns: every number a client sends for one is bounded by these first
# (asyncpg refuses a larger one client-side, which would otherwise be a 500).
INT4_MAX = 2**31 - 1
INT8_MAX = 2**63 - 1

# What Postgres cannot store in text or jsonb (NUL), and what UTF-8 cannot encode (lone
# surrogates, which asyncpg would fail to encode).
UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def unstorable_field(value: Any, where: str = "body") -> str | None:
    """The dotted path of the first string (value or object key) in a decoded JSON value that
    Postgres cannot store, or None. Walks iteratively: decoded bodies may nest deeply."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if UNSTORABLE.search(item):
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and UNSTORABLE.search(key):
                    return path
                stack.append((child, f"{path}.{key}" if path != "body" else str(key)))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{n}]") for n, child in enumerate(item))
    return None


def check_storable(value: Any, where: str = "body") -> None:
    """Refuse a decoded JSON value holding a NUL or a lone surrogate anywhere.

    Raises InvalidInput."""
    field = unstorable_field(value, where)
    if field is not None:
        raise InvalidInput(
            f"{field}: strings may not contain NUL (\\u0000) or unpaired surrogates.",
            errors=[{"field": field, "message": "contains NUL or an unpaired surrogate"}],
        )


def check_raw_text(raw: bytes, where: str) -> str:
    """Raw bytes of a path, query or header as text: UTF-8 without NUL. Raises BadRequest."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"The {where} is not valid UTF-8.") from None
    if "\x00" in text:
        raise BadRequest(f"The {where} contains a NUL character.")
    return text


def check_processor(settings: Settings, processor: str) -> None:
    if processor not in settings.processors:
        raise InvalidInput(
            f"Unknown processor {processor!r}.",
            errors=[{"field": "processor", "message": f"one of: {', '.join(settings.processors)}"}],
        )


def json_depth(value: Any, cap: int) -> int:
    """Levels of objects and arrays in a JSON value (a flat object is 1); stops counting past
    cap."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > cap:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def schema_depth(schema: Any) -> int:
    """Levels of nested objects in a JSON schema: a flat object is 1."""
    if not isinstance(schema, dict):
        return 0
    own = 1 if schema.get("type") == "object" or "properties" in schema else 0
    properties = schema.get("properties")
    children = list(properties.values()) if isinstance(properties, dict) else []
    if isinstance(schema.get("items"), dict):
        children.append(schema["items"])
    return own + max((schema_depth(c) for c in children), default=0)


def spec_size(data: TurnCreate) -> int:
    """Characters Parallel counts against its limit: the input plus a non-trivial task spec."""
    size = len(data.input) if isinstance(data.input, str) else len(msgspec.json.encode(data.input))
    schema = data.output_schema
    if isinstance(schema, JsonSchema) or (isinstance(schema, TextSchema) and schema.description):
        size += len(msgspec.json.encode(schema))
    return size


def check_turn_request(settings: Settings, data: TurnCreate) -> None:
    """Refuse what Parallel would refuse (docs/parallel.md §1.2), the processor the request
    names included (the conversation's, when it names none, is checked as the turn is
    written: service.domain.lifecycle). Raises InvalidInput."""
    if data.processor is not None:
        check_processor(settings, data.processor)
    if json_depth(data.input, settings.max_input_depth) > settings.max_input_depth:
        raise InvalidInput(
            f"input nests objects and arrays deeper than {settings.max_input_depth} levels.",
            errors=[{"field": "input", "message": f"at most {settings.max_input_depth} levels"}],
        )
    schema = data.output_schema
    if isinstance(schema, JsonSchema):
        js = schema.json_schema
        if json_depth(js, MAX_SCHEMA_NESTING) > MAX_SCHEMA_NESTING:
            raise InvalidInput(
                f"output_schema.json_schema nests deeper than {MAX_SCHEMA_NESTING} levels.",
                errors=[{"field": "output_schema.json_schema", "message": "too deep"}],
            )
        if js.get("type") != "object" or not isinstance(js.get("properties"), dict):
            raise InvalidInput(
                "output_schema.json_schema must be a JSON schema of type object with properties.",
                errors=[{"field": "output_schema.json_schema", "message": "type object required"}],
            )
        if schema_depth(js) > MAX_SCHEMA_DEPTH:
            raise InvalidInput(
                f"output_schema nests objects deeper than {MAX_SCHEMA_DEPTH} levels.",
                errors=[{"field": "output_schema.json_schema", "message": "too deep"}],
            )
    size = spec_size(data)
    if size > settings.max_input_chars:
        raise InvalidInput(
            f"input (with its task spec) is {size} characters; the limit is "
            f"{settings.max_input_chars}.",
            errors=[{"field": "input",
                     "message": f"at most {settings.max_input_chars} characters"}],
        )
