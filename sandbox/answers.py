"""Deterministic answers: same input, processor and chain of prior questions, same output.

Text answer format (the context lists every ancestor's input, oldest first):

    Answer to "How many medals did they win?" (processor lite). Context: "Which country won...".
"""

from __future__ import annotations

import hashlib
from typing import Any

from sandbox.validation import output_schema_kind
from sandbox.wire import encode

AUTO_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string", "description": "Answer to the question"}},
    "required": ["answer"],
    "additionalProperties": False,
}


def question_text(value: str | dict[str, Any]) -> str:
    if isinstance(value, str):
        return value
    return encode(dict(sorted(value.items()))).decode()


def text_answer(question: str, processor: str, context: list[str]) -> str:
    answer = f'Answer to "{question}" (processor {processor}).'
    if context:
        answer += " Context: " + "; ".join(f'"{q}"' for q in context) + "."
    return answer


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def field_basis(field: str, question: str, context: list[str]) -> dict[str, Any]:
    digest = _digest(field, question, *context)
    return {
        "field": field,
        "citations": [
            {
                "url": f"https://example.org/{digest[:16]}",
                "title": f"Sandbox source for {question[:80]}",
                "excerpts": [f"Deterministic excerpt {digest[16:24]} about {question[:120]}"],
            }
        ],
        "reasoning": (
            f"Sandbox answer for {field!r} built from the question"
            f" and {len(context)} prior interaction(s)."
        ),
        "confidence": "high",
    }


class _Generator:
    """Builds a JSON value satisfying a simple JSON schema; follows $ref into $defs/definitions."""

    def __init__(self, root: dict[str, Any], text: str, seed: str) -> None:
        self.defs = {**root.get("definitions", {}), **root.get("$defs", {})}
        self.text = text
        self.seed = seed

    def _n(self, path: str) -> int:
        return int(_digest(self.seed, path)[:8], 16)

    def _resolve(self, schema: Any) -> dict[str, Any]:
        for _ in range(16):
            if not isinstance(schema, dict):
                return {}
            ref = schema.get("$ref")
            if isinstance(ref, str):
                schema = self.defs.get(ref.rsplit("/", 1)[-1], {})
                continue
            options = schema.get("anyOf") or schema.get("oneOf") or schema.get("allOf")
            if options:
                non_null = [
                    o for o in options if not (isinstance(o, dict) and o.get("type") == "null")
                ]
                schema = (non_null or options)[0]
                continue
            return schema
        return {}

    def value(self, schema: Any, path: str, depth: int = 0) -> Any:
        schema = self._resolve(schema)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][self._n(path) % len(schema["enum"])]
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            kind = (
                "object" if "properties" in schema else "array" if "items" in schema else "string"
            )
        if depth > 8:  # recursive schemas: stop with the simplest value
            return None if kind != "object" else {}
        if kind == "object":
            props = schema.get("properties") or {}
            return {
                name: self.value(sub, f"{path}.{name}", depth + 1) for name, sub in props.items()
            }
        if kind == "array":
            low = int(schema.get("minItems", 0))
            high = int(schema.get("maxItems", max(low, 2)))
            count = max(low, min(2, high))
            return [
                self.value(schema.get("items", {}), f"{path}.{i}", depth + 1) for i in range(count)
            ]
        if kind == "integer":
            return self._number(schema, path, integer=True)
        if kind == "number":
            return self._number(schema, path, integer=False)
        if kind == "boolean":
            return self._n(path) % 2 == 0
        if kind == "null":
            return None
        return self._string(schema, path)

    def _number(self, schema: dict[str, Any], path: str, integer: bool) -> int | float:
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        high = schema.get("maximum", schema.get("exclusiveMaximum", low + 1000))
        span = max(high - low, 0)
        value: float = low + (self._n(path) % 1000) / 1000 * span
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            value = (low + high) / 2
        if integer:
            value = int(value)
            if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
                value -= 1
            return max(value, int(schema.get("minimum", value)))
        return round(value, 2)

    def _string(self, schema: dict[str, Any], path: str) -> str:
        fmt = schema.get("format")
        digest = _digest(self.seed, path)
        if fmt == "date":
            value = f"2024-{1 + self._n(path) % 12:02d}-{1 + self._n(path) % 28:02d}"
        elif fmt == "date-time":
            value = f"2024-{1 + self._n(path) % 12:02d}-{1 + self._n(path) % 28:02d}T12:00:00Z"
        elif fmt in ("uri", "url"):
            value = f"https://example.org/{digest[:16]}"
        elif fmt == "email":
            value = f"sandbox-{digest[:8]}@example.org"
        else:
            value = f"{path.lstrip('.') or 'value'}: {self.text}"
        if "maxLength" in schema:
            value = value[: int(schema["maxLength"])]
        if len(value) < int(schema.get("minLength", 0)):
            value = value.ljust(int(schema["minLength"]), ".")
        return value


def build_output(
    input_value: str | dict[str, Any],
    processor: str,
    context: list[str],
    task_spec: dict[str, Any] | None,
) -> dict[str, Any]:
    """The `output` object of a completed run (TaskRunTextOutput or TaskRunJsonOutput)."""
    question = question_text(input_value)
    answer = text_answer(question, processor, context)
    kind, json_schema = output_schema_kind(task_spec)
    if kind == "text":
        return {
            "type": "text",
            "content": answer,
            "basis": [field_basis("output", question, context)],
        }
    if kind == "json" and json_schema is not None:
        gen = _Generator(json_schema, answer, _digest(processor, question, *context))
        content = gen.value(json_schema, "")
        if not isinstance(content, dict):  # the output must be an object; wrap scalars
            content = {"value": content}
        return {
            "type": "json",
            "content": content,
            "basis": [field_basis(name, question, context) for name in content],
            "output_schema": None,
        }
    return {
        "type": "json",
        "content": {"answer": answer},
        "basis": [field_basis("answer", question, context)],
        "output_schema": AUTO_SCHEMA,
    }
