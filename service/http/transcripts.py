"""A conversation's sources and transcripts (docs/design.md §3, "Sources and transcripts")."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency
from litestar.params import FromPath, QueryParameter

from service.domain import transcripts
from service.errors import NotAcceptable
from service.http import examples as ex
from service.http.deps import tenant_of
from service.http.problems import problem_responses
from service.resources import Resources
from service.schemas import SourceList, Transcript

JSON = "application/json"
MARKDOWN = "text/markdown"
TurnId = Annotated[
    str | None,
    QueryParameter(min_length=1, max_length=64,
                   description="A completed turn of the conversation; the newest by default"),
]


def negotiate(accept: str | None) -> str:
    """JSON or markdown, whichever the Accept header rates higher (RFC 9110 §12.5.1: each type
    takes the q of the most specific range matching it, `q=0` meaning "not this"); JSON on a
    tie, and when the header is absent or empty. Raises NotAcceptable when it allows
    neither."""
    ranges = _media_ranges(accept if accept and accept.strip() else "*/*")
    json_q, markdown_q = _quality(JSON, ranges), _quality(MARKDOWN, ranges)
    if max(json_q, markdown_q) <= 0:
        raise NotAcceptable(f"A transcript is served as {JSON} or {MARKDOWN}; the Accept header "
                            f"allows neither ({(accept or '')[:100]!r}).")
    return MARKDOWN if markdown_q > json_q else JSON


def _media_ranges(accept: str) -> list[tuple[str, str, float]]:
    """(type, subtype, q) of each well-formed media range; malformed ones are skipped."""
    ranges = []
    for media_range in accept.lower().split(","):
        kind, *parameters = media_range.split(";")
        main, slash, sub = kind.strip().partition("/")
        if not (main and slash and sub) or (main == "*" and sub != "*"):
            continue
        q = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = -1.0
        if 0 <= q <= 1:
            ranges.append((main, sub, q))
    return ranges


def _quality(media_type: str, ranges: list[tuple[str, str, float]]) -> float:
    main, _, sub = media_type.partition("/")
    best, quality = -1, 0.0
    for range_main, range_sub, q in ranges:
        specificity = 2 if (range_main, range_sub) == (main, sub) else (
            1 if (range_main, range_sub) == (main, "*") else
            0 if (range_main, range_sub) == ("*", "*") else -1)
        if specificity > best:
            best, quality = specificity, q
    return quality


class TranscriptController(Controller):
    path = "/v1/conversations/{conversation_id:str}"
    tags = ("conversations",)

    @get("/sources", operation_id="ListSources",
         summary="Every URL the conversation's completed turns cited, once, first seen first",
         responses={**problem_responses(404), **ex.answer(
             200, SourceList, "The conversation's sources, whole (not paged)",
             ex.example("sources", "Two turns citing one page", ex.SOURCES))})
    async def sources(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        conversation_id: FromPath[str],
    ) -> SourceList:
        """Every citation URL of the conversation's completed turns, once, in first-seen order
        (by turn `seq`, then by place in the turn's basis), with every turn that cited it and
        every excerpt cited from it, each once."""
        return await transcripts.list_sources(resources.pool, tenant_of(request), conversation_id)

    @get("/transcript", operation_id="GetTranscript",
         summary="A turn's lineage, oldest first, as JSON or (Accept: text/markdown) markdown",
         responses={**problem_responses(404, 406, 409), **ex.answer(
             200, Transcript, "The lineage of `turn_id` (completed turns only), oldest first",
             ex.example("transcript", "Two turns", ex.TRANSCRIPT))})
    async def transcript(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        conversation_id: FromPath[str], turn_id: TurnId = None,
    ) -> Response[Any]:
        """The lineage of `turn_id` (by default the conversation's newest completed turn): it and
        its completed ancestors, oldest first, each question with its answer and its numbered
        citations. A branch's transcript holds its own lineage only. With no completed turn yet,
        `turn_id` is null and `turns` empty; a `turn_id` that is not completed answers 409. With
        `Accept: text/markdown`, the same as a markdown document."""
        media_type = negotiate(request.headers.get("accept"))
        conversation, transcript = await transcripts.get_transcript(
            resources.pool, tenant_of(request), conversation_id, turn_id)
        # The annotation is JSON's; OpenAPI documents the markdown beside it
        # (service.http.openapi_extras).
        headers = {"Vary": "Accept"}
        if media_type == MARKDOWN:
            return Response(transcripts.render_markdown(conversation, transcript),
                            media_type=MARKDOWN, headers=headers)
        return Response(transcript, media_type=JSON, headers=headers)
