"""Hostile variants of a generated request, for the fuzz test: text Postgres cannot store (NUL),
text UTF-8 cannot encode (lone surrogates) and bytes that are not UTF-8, put into the body, a
path id, the query or a header; and the conversation list's `metadata.<key>` filters with any
text. Each is a Hypothesis strategy, so the seed replays it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from hypothesis import strategies as st
from schemathesis.core import NotSet

# Text a JSON body can carry that Postgres cannot store or UTF-8 cannot encode.
BAD_TEXT = ["\x00", "a\x00b", "\ud800", "\udfff", "x\udc80y", "\x00\ud83d"]
# Byte sequences that are not UTF-8: a stray byte, a truncated sequence, an encoded surrogate,
# an overlong encoding.
BAD_BYTES = [b"\xff", b"\xc3", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80"]
# Percent-escapes for a path id or a query value.
BAD_ESCAPES = ["%00", "x%00", "%FF", "%C3", "%ED%A0%80", "%C0%AF"]
# Header values a real HTTP/1.1 parser lets through (a NUL it refuses before the app sees it).
BAD_HEADER_VALUES = [b"\xff", b"caf\xc3", b"\xed\xa0\x80", "²".encode("latin-1"), b"\xb2\xb3"]
HEADERS = ["Idempotency-Key", "Last-Event-ID", "Authorization", "X-Request-ID", "Accept",
           "webhook-id", "webhook-timestamp"]
QUERY_NAMES = ["cursor", "limit", "after", "wait", "month", "status", "turn_id", "x",
               "metadata.k", "metadata.", "metadata.a.b"]
# The conversation list's `metadata.<key>=<value>` filters, which the document can only describe
# (OpenAPI has no parameters named by a pattern): any text as key and value, several at once.
FILTER_TEXT = st.text(max_size=20) | st.text(min_size=500, max_size=520)
MARK = "\ue000"  # a private-use character, replaced by raw bytes after encoding


@dataclass
class Mutation:
    """How to turn a generated request into a hostile one."""

    kind: str
    body: bytes | None = None
    path: tuple[str, str] | None = None  # (parameter, percent-escaped value)
    query: str | None = None
    headers: dict[str, bytes] = field(default_factory=dict)


def string_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Where the strings of a JSON value are: (…, key) for values, (…, (key,)) for object keys."""
    found: list[tuple[Any, ...]] = []
    if isinstance(value, str):
        found.append(path)
    elif isinstance(value, dict):
        for key, child in value.items():
            found.append((*path, (key,)))
            found.extend(string_paths(child, (*path, key)))
    elif isinstance(value, list):
        for n, child in enumerate(value):
            found.extend(string_paths(child, (*path, n)))
    return found


def replaced(value: Any, path: tuple[Any, ...], text: str) -> Any:
    """A copy of the JSON value with `text` spliced into the string at `path`."""
    if not path:
        return value[: len(value) // 2] + text + value[len(value) // 2:]
    step, rest = path[0], path[1:]
    if isinstance(step, tuple):  # an object key
        return {(replaced(k, (), text) if k == step[0] else k): v for k, v in value.items()}
    if isinstance(value, dict):
        return {k: (replaced(v, rest, text) if k == step else v) for k, v in value.items()}
    return [replaced(v, rest, text) if n == step else v for n, v in enumerate(value)]


@st.composite
def body_mutation(draw: Any, body: Any) -> Mutation:
    paths = string_paths(body)
    if not paths:
        body = {"input": "q", "title": "t"} if not isinstance(body, dict) else {**body, "x": "q"}
        paths = string_paths(body)
    where = draw(st.sampled_from(paths))
    if draw(st.booleans()):
        text = draw(st.sampled_from(BAD_TEXT))
        # ensure_ascii: a lone surrogate travels as the JSON escape \ud800, as a client sends it.
        return Mutation("body-text", body=json.dumps(replaced(body, where, text)).encode())
    raw = json.dumps(replaced(body, where, MARK), ensure_ascii=False).encode()
    bad = draw(st.sampled_from(BAD_BYTES))
    return Mutation("body-bytes", body=raw.replace(MARK.encode(), bad))


@st.composite
def mutations(draw: Any, case: Any) -> Mutation | None:
    """None (the generated request as it is) half the time, else one hostile variant."""
    kinds = ["query", "header"]
    if case.path_parameters:
        kinds.append("path")
    if not isinstance(case.body, NotSet | bytes):
        kinds += ["body"] * 4  # the body carries most of what reaches Postgres
    if case.method.upper() == "GET" and case.path == "/v1/conversations":
        kinds += ["filter"] * 2
    if draw(st.booleans()):
        return None
    kind = draw(st.sampled_from(kinds))
    if kind == "body":
        return draw(body_mutation(case.body))
    if kind == "path":
        name = draw(st.sampled_from(sorted(case.path_parameters)))
        prefix = draw(st.sampled_from(["", "conv_", "turn_", "whd_"]))
        return Mutation("path", path=(name, prefix + draw(st.sampled_from(BAD_ESCAPES))))
    if kind == "filter":
        pairs = draw(st.lists(st.tuples(FILTER_TEXT, FILTER_TEXT), min_size=1, max_size=18))
        known = urlencode(case.query or {}, doseq=True, quote_via=quote)
        filters = urlencode([(f"metadata.{k}", v) for k, v in pairs], quote_via=quote)
        return Mutation("filter", query="&".join(q for q in (known, filters) if q))
    if kind == "query":
        name = draw(st.sampled_from(QUERY_NAMES))
        value = draw(st.sampled_from(BAD_ESCAPES))
        known = urlencode(case.query or {}, doseq=True, quote_via=quote)
        return Mutation("query", query="&".join(q for q in (known, f"{name}={value}") if q))
    header = draw(st.sampled_from(HEADERS))
    value = draw(st.sampled_from(BAD_HEADER_VALUES))
    if header == "Authorization":
        value = b"Bearer rsk_" + value
    return Mutation("header", headers={header: value})
