"""Reseeding: a turn's input with its lineage's earlier questions and answers in front, for a run
created without the previous_interaction_id that Parallel refused (expired or unknown).

The earlier exchanges are the turn's completed ancestors, oldest first, as many of the newest as
fit in Parallel's limit on input plus task spec (MAX_REQUEST_CHARS); when not even the newest
fits whole, its beginning is kept, cut. A text input becomes

    Earlier in this conversation (oldest first):

    Question: <an earlier input>
    Answer: <its answer>

    Now answer this follow-up question:
    <the turn's input>

and an object input gains that transcript (without the last line) as a first field,
`conversation_context` (`conversation_context_2`, … when the input has that field already).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec

from service.clients.parallel import MAX_REQUEST_CHARS, request_chars
from service.db import turns as turn_db
from service.models import Turn

HEADER = "Earlier in this conversation (oldest first):\n\n"
HEADER_TRIMMED = "Earlier in this conversation (oldest first; older turns left out):\n\n"
FOLLOW_UP = "Now answer this follow-up question:\n"
CONTEXT_FIELD = "conversation_context"
CUT = "…"

Input = str | dict[str, Any]


def as_text(value: Any) -> str:
    """A question or an answer's content as it reads in the transcript (objects as JSON)."""
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def exchange(question: Any, output: Any) -> str:
    """One earlier turn in the transcript: its input, then its output's content."""
    content = output.get("content") if isinstance(output, dict) else output
    return f"Question: {as_text(question)}\nAnswer: {as_text(content)}\n\n"


def _compose(question: Input, exchanges: list[str], trimmed: bool) -> Input:
    transcript = (HEADER_TRIMMED if trimmed else HEADER) + "".join(exchanges)
    if isinstance(question, str):
        return transcript + FOLLOW_UP + question
    field, n = CONTEXT_FIELD, 1
    while field in question:
        n += 1
        field = f"{CONTEXT_FIELD}_{n}"
    return {field: transcript.rstrip("\n"), **question}


def _cut(text: str, keep: int) -> str:
    return text[:keep].rstrip() + CUT + "\n\n"


def seeded_input(question: Input, exchanges: list[str], fits: Callable[[Input], bool]) -> Input:
    """`question` with the newest of `exchanges` (oldest first) that `fits` allows in front;
    the question alone when not even a cut exchange fits."""
    kept: list[str] = []
    for text in reversed(exchanges):
        candidate = [text, *kept]
        if not fits(_compose(question, candidate, len(candidate) < len(exchanges))):
            break
        kept = candidate
    if kept or not exchanges:
        return _compose(question, kept, len(kept) < len(exchanges)) if kept else question
    newest = exchanges[-1]
    low, high = 0, len(newest)  # the longest beginning of it that fits: binary search
    while low < high:
        mid = (low + high + 1) // 2
        if fits(_compose(question, [_cut(newest, mid)], len(exchanges) > 1)):
            low = mid
        else:
            high = mid - 1
    if low == 0:
        return question
    return _compose(question, [_cut(newest, low)], len(exchanges) > 1)


async def reseeded_input(conn: asyncpg.Connection | asyncpg.Pool, turn: Turn) -> Input:
    """The turn's input for a run created without its previous_interaction_id: its lineage's
    earlier questions and answers in front, within Parallel's limit."""

    def fits(candidate: Input) -> bool:
        return request_chars(candidate, turn.output_schema) <= MAX_REQUEST_CHARS

    ancestors = await turn_db.lineage(conn, turn.parent_turn_id, MAX_REQUEST_CHARS)
    return seeded_input(turn.input, [exchange(q, out) for q, out in ancestors], fits)
