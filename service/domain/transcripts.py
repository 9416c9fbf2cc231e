"""What a conversation read and said: its sources, and a turn's transcript (JSON or markdown).

Both are read from the completed turns alone: a failed or cancelled turn has no answer, and a
queued or running one none yet. Neither is paged: a conversation's bibliography and a lineage
are each one document (docs/design.md, "Sources and transcripts", says why, and what a
conversation of 1,000 or 10,000 turns costs).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import quote

import asyncpg
import msgspec

from service.db import transcripts as db
from service.domain.conversations import get_conversation
from service.errors import Conflict, NotFound
from service.models import Conversation, FieldBasis
from service.schemas import NumberedCitation, Source, SourceList, Transcript, TranscriptTurn


async def list_sources(pool: asyncpg.Pool, tenant_id: str, conversation_id: str) -> SourceList:
    """Every URL the conversation's completed turns cited, once, in first-seen order (by turn
    seq, then by place in the basis), with the turns citing it and its excerpts, each once.
    Raises NotFound."""
    async with _snapshot(pool) as conn:
        await get_conversation(conn, tenant_id, conversation_id)
        rows = await db.list_citations(conn, tenant_id, conversation_id)
    return SourceList(data=collect_sources([tuple(row) for row in rows]))


def collect_sources(rows: list[tuple[str, str, str | None, Any]]) -> list[Source]:
    """Sources from (turn_id, url, title, excerpts) citation rows in first-seen order: each URL
    once, with its first turn, every turn citing it and every excerpt, each once."""
    sources: dict[str, Source] = {}
    excerpts: dict[str, dict[str, None]] = {}  # per URL, as an ordered set
    for turn_id, url, title, cited in rows:
        source = sources.get(url)
        if source is None:
            source = sources[url] = Source(url=url, title=None, first_turn_id=turn_id,
                                           turn_ids=[], excerpts=[])
            excerpts[url] = {}
        source.title = source.title or title
        if source.turn_ids[-1:] != [turn_id]:  # rows come turn by turn
            source.turn_ids.append(turn_id)
        if isinstance(cited, list):
            excerpts[url].update(dict.fromkeys(e for e in cited if isinstance(e, str)))
    for url, source in sources.items():
        source.excerpts = list(excerpts[url])
    return list(sources.values())


async def get_transcript(
    pool: asyncpg.Pool, tenant_id: str, conversation_id: str, turn_id: str | None
) -> tuple[Conversation, Transcript]:
    """The lineage of `turn_id` (default: the newest completed turn), completed turns only,
    oldest first; with no completed turn at all, an empty one. Raises NotFound (no such
    conversation, or no such turn in it) and Conflict (the turn named is not completed)."""
    async with _snapshot(pool) as conn:
        conversation = await get_conversation(conn, tenant_id, conversation_id)
        if turn_id is None:
            turn_id = await db.newest_completed(conn, tenant_id, conversation_id)
            if turn_id is None:
                return conversation, Transcript(conversation_id=conversation_id, turn_id=None,
                                                turns=[])
        else:
            status = await db.turn_status(conn, tenant_id, conversation_id, turn_id)
            if status is None:
                raise NotFound(f"Turn {turn_id!r} not found in conversation {conversation_id!r}.")
            if status != "completed":
                raise Conflict(f"Turn {turn_id!r} is {status}: a transcript ends at a completed "
                               "turn.")
        rows = await db.lineage(conn, tenant_id, conversation_id, turn_id)
    turns = [msgspec.convert({**row, "citations": numbered(row["basis"])}, TranscriptTurn)
             for row in rows]
    return conversation, Transcript(conversation_id=conversation_id, turn_id=turn_id, turns=turns)


@contextlib.asynccontextmanager
async def _snapshot(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection whose reads all see one snapshot (a read-only repeatable-read
    transaction): a conversation deleted meanwhile is not half read."""
    async with pool.acquire() as proxy, proxy.transaction(isolation="repeatable_read",
                                                          readonly=True):
        yield cast(asyncpg.Connection, proxy)


def numbered(basis: Any) -> list[dict[str, Any]]:
    """A turn's cited URLs, once each in basis order, numbered from 1 (the first title given)."""
    fields = msgspec.convert(basis or [], list[FieldBasis])
    titles: dict[str, str | None] = {}
    for citation in (c for field in fields for c in field.citations):
        titles[citation.url] = titles.get(citation.url) or citation.title
    return [{"n": n, "url": url, "title": title}
            for n, (url, title) in enumerate(titles.items(), 1)]


# --- markdown --------------------------------------------------------------------------------

def render_markdown(conversation: Conversation, transcript: Transcript) -> str:
    """The transcript as a CommonMark document: a `## Turn <seq>` section per turn with its
    question (quoted), its answer and its numbered citations. Questions and text answers are
    written as they are (an answer is often markdown itself; a code fence it leaves open is
    closed, so the next turn stays outside it); JSON inputs and outputs as fenced `json` blocks;
    titles and URLs escaped so that each citation stays one link."""
    lines = [f"# {_escape(conversation.title or f'Conversation {conversation.id}')}", ""]
    if transcript.turn_id is None:
        lines += [f"Conversation `{conversation.id}` has no completed turn yet.", ""]
    else:
        count = len(transcript.turns)
        lines += [f"Conversation `{conversation.id}`, up to turn `{transcript.turn_id}`: "
                  f"{count} completed turn{'s' if count != 1 else ''}, oldest first.", ""]
    for turn in transcript.turns:
        lines += [f"## Turn {turn.seq}", "", "**Question**", ""]
        if isinstance(turn.input, str):
            lines += [f"> {line}".rstrip() for line in turn.input.splitlines() or [""]]
        else:
            lines += _fenced(turn.input)
        lines += ["", "**Answer**", ""]
        content = turn.output.content
        lines += _closed(content.splitlines()) if isinstance(content, str) else _fenced(content)
        lines += ["", "**Citations**", ""]
        lines += [f"{c.n}. {_link(c)}" for c in turn.citations] or ["None."]
        lines.append("")
    return "\n".join(lines)


def _fenced(value: Any) -> list[str]:
    """A fenced `json` block, its fence longer than any backtick run inside."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return [f"{fence}json", *text.splitlines(), fence]


_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")


def _closed(lines: list[str]) -> list[str]:
    """The lines, plus a closing fence if they leave a code fence open (CommonMark's rule: a
    fence closes on a line of at least as many of the same character, and nothing else)."""
    open_fence = ""
    for line in lines:
        match = _FENCE.match(line)
        if match is None:
            continue
        fence = match.group(1)
        if not open_fence:
            if not (fence[0] == "`" and "`" in line[match.end():]):  # else an inline code span
                open_fence = fence
        elif fence[0] == open_fence[0] and len(fence) >= len(open_fence) and (
                not line[match.end():].strip()):
            open_fence = ""
    return [*lines, open_fence] if open_fence else lines


# What could start markup in a line of text; `_` only where it could open or close emphasis
# (not inside a word, as in `conv_5d3a`).
_SPECIALS = re.compile(r"[\\`*\[\]<>!#&]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def _escape(text: str) -> str:
    """One line of text that markdown shows as it is."""
    return _SPECIALS.sub(lambda m: "\\" + m.group(), " ".join(text.split()))


_PLAIN_URL = re.compile(r"[^\s<>()\\]+")
_UNSAFE_IN_BRACKETS = re.compile(r"[<>\s]")


def _link(citation: NumberedCitation) -> str:
    # A URL without spaces, brackets or backslashes is a link destination as it is; any other
    # goes in angle brackets, which allow all but <, > and line breaks: those (and spaces, at
    # which some readers stop) are percent-encoded.
    url = citation.url
    text = _escape(citation.title or "") or _escape(url)
    if _PLAIN_URL.fullmatch(url):
        return f"[{text}]({url})"
    return f"[{text}](<{_UNSAFE_IN_BRACKETS.sub(lambda m: quote(m.group()), url)}>)"
