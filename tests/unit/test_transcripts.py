"""The pure parts of sources and transcripts: merging citations, numbering them, the markdown,
and choosing the media type from an Accept header. No I/O; the routes themselves are tested in
tests/integration/test_transcripts.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from markdown_it import MarkdownIt

from service.domain.transcripts import collect_sources, numbered, render_markdown
from service.errors import NotAcceptable
from service.http.transcripts import JSON, MARKDOWN, negotiate
from service.models import Conversation, JsonOutput, TextOutput
from service.schemas import NumberedCitation, Transcript, TranscriptTurn

A, B, C = "https://a.example/1", "https://b.example/2", "https://c.example/3"


def test_sources_merge_a_url_cited_in_several_fields_and_turns():
    rows = [  # (turn, url, title, excerpts), in first-seen order
        ("t1", A, None, ["a1"]), ("t1", B, "B", None), ("t1", A, "A from t1", ["a1", "a2"]),
        ("t2", C, "C", []), ("t2", A, "A from t2", ["a3", "a1"]), ("t3", A, None, "odd"),
    ]
    sources = collect_sources(rows)
    assert [(s.url, s.first_turn_id, s.turn_ids) for s in sources] == [
        (A, "t1", ["t1", "t2", "t3"]), (B, "t1", ["t1"]), (C, "t2", ["t2"])]
    assert sources[0].title == "A from t1"  # the first title given, even after a null one
    assert sources[0].excerpts == ["a1", "a2", "a3"]
    assert sources[1].excerpts == [] and sources[2].title == "C"


def test_a_turns_citations_are_numbered_once_per_url():
    basis = [{"field": "winner", "citations": [{"url": A}, {"url": B, "title": "B"}]},
             {"field": "golds", "citations": [{"url": A, "title": "A"}, {"url": C}]}]
    assert numbered(basis) == [{"n": 1, "url": A, "title": "A"}, {"n": 2, "url": B, "title": "B"},
                               {"n": 3, "url": C, "title": None}]
    assert numbered(None) == []


def conversation(title: str | None) -> Conversation:
    now = datetime.now(UTC)
    return Conversation(id="conv_1", title=title, processor="lite", metadata={},
                        webhook_url=None, status="idle", turn_count=1, last_turn_id="turn_1",
                        ttl_seconds=None, expires_at=None, created_at=now, updated_at=now)


def test_markdown_keeps_fences_urls_and_titles_intact():
    content = {"code": "a ```` run", "list": [1, 2]}
    citations = [NumberedCitation(n=1, url="https://x.example/a b(c)", title="Line\nbreak ]"),
                 NumberedCitation(n=2, url="https://x.example/plain_path", title=None)]
    turn = TranscriptTurn(id="turn_1", seq=1, input={"q": "```"},
                          output=JsonOutput(content=content), citations=citations)
    text = render_markdown(conversation(None), Transcript(conversation_id="conv_1",
                                                         turn_id="turn_1", turns=[turn]))
    tokens = MarkdownIt("commonmark").parse(text)
    fences = [t for t in tokens if t.type == "fence"]
    assert [json.loads(f.content) for f in fences] == [{"q": "```"}, content]
    assert [f.markup for f in fences] == ["````", "`````"]  # longer than the runs inside
    links = [(child.attrs["href"], "".join(c.content for c in t.children or []
                                           if c.type == "text"))
             for t in tokens if t.type == "inline"
             for child in t.children or [] if child.type == "link_open"]
    assert links == [("https://x.example/a%20b(c)", "Line break ]"),
                     ("https://x.example/plain_path", "https://x.example/plain_path")]
    assert text.startswith("# Conversation conv_1\n")  # `_` inside a word is left alone


def test_markdown_of_no_turn_and_of_a_text_answer():
    empty = render_markdown(conversation("T"), Transcript(conversation_id="conv_1", turn_id=None,
                                                          turns=[]))
    assert empty == "# T\n\nConversation `conv_1` has no completed turn yet.\n"
    turn = TranscriptTurn(id="turn_1", seq=3, input="Why?\n\nReally?",
                          output=TextOutput(content="Because.\n~~~\nopen"), citations=[])
    text = render_markdown(conversation("T"), Transcript(conversation_id="conv_1",
                                                         turn_id="turn_1", turns=[turn]))
    assert "> Why?\n>\n> Really?\n" in text
    assert "Because.\n~~~\nopen\n~~~\n" in text and text.endswith("**Citations**\n\nNone.\n")


@pytest.mark.parametrize(("accept", "chosen"), [
    (None, JSON), ("", JSON), ("*/*", JSON), ("application/json", JSON),
    ("text/markdown", MARKDOWN), ("TEXT/Markdown; charset=UTF-8", MARKDOWN),
    ("text/*;q=0.9, application/*;q=0.8", MARKDOWN),
    ("text/markdown;q=0.5, application/json", JSON),
    ("text/markdown, application/json", JSON),  # a tie: JSON
    ("application/json;q=0, */*", MARKDOWN),  # the most specific range decides,
    ("*/*, application/json;q=0", MARKDOWN),  # wherever it stands
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", JSON),
    ("text/markdown;q=bad, application/json;q=0.1", JSON),  # a malformed range is skipped
])
def test_negotiate_chooses_by_quality_and_specificity(accept, chosen):
    assert negotiate(accept) == chosen


@pytest.mark.parametrize("accept", [
    "text/html", "application/xml, image/*", "*/*;q=0", "text/markdown;q=0, application/json;q=0",
    "garbage", "*/json", "text/markdown;q=2",
])
def test_negotiate_refuses_what_allows_neither(accept):
    with pytest.raises(NotAcceptable):
        negotiate(accept)
