"""Turn routes (docs/design.md §3, Turns)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, HeaderParameter, QueryParameter

from service.domain import turns
from service.http import examples as ex
from service.http.deps import Cursor, Limit, tenant_of
from service.http.problems import BUSY_EXAMPLE, problem_responses
from service.models import Turn
from service.resources import Resources
from service.schemas import TurnCreate, TurnPage

IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(name="Idempotency-Key", max_length=255, description="Retry-safe creation key"),
]
Wait = Annotated[
    float, QueryParameter(ge=0, le=60, description="Seconds to wait for the turn to end (0 to 60)")
]


T = TypeVar("T")


class TurnController(Controller):
    path = "/v1/conversations/{conversation_id:str}/turns"
    tags = ("turns",)

    @post(operation_id="CreateTurn", summary="Ask a question (a new turn)", status_code=202,
          responses={**problem_responses(402, 404, 409, 413, also=(BUSY_EXAMPLE,)), **ex.answer(
              202, Turn, "The queued turn; `Location` names it. The same Idempotency-Key and body "
              "answer the first response again",
              ex.example("queued", "Queued behind the conversation's previous turn",
                         ex.QUEUED_TURN))})
    async def create(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        conversation_id: FromPath[str],
        data: Annotated[TurnCreate, ex.body(*ex.CREATE_TURN)],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Turn]:
        """Queue a question as a new turn, chained to the conversation's newest turn (or to
        `parent_turn_id`). Answered 202 once committed, with the turn's URL in `Location`. While
        a turn is queued or running, `if_busy` decides: `enqueue` (default) waits behind it,
        `reject` answers 409 `/problems/conversation-busy` and writes nothing, `interrupt`
        cancels every open turn first (in the same transaction; a running one's turn says
        `upstream_may_continue`). The same `Idempotency-Key` with the same body answers the
        first turn again, whatever the conversation is doing now; with another body (another
        `if_busy` too), 409. A refused request (any 4xx, `conversation-busy` included) records
        nothing, so its key stays unused."""
        turn = await turns.create_turn(
            resources.pool, resources.queue, resources.settings, tenant_of(request),
            conversation_id, data, idempotency_key,
        )
        location = f"/v1/conversations/{conversation_id}/turns/{turn.id}"
        return Response(turn, status_code=202, headers={"Location": location})

    @get(operation_id="ListTurns", summary="List a conversation's turns, oldest first",
         responses={**problem_responses(404), **ex.answer(
             200, TurnPage, "A page of turns; pass `next_cursor` as `cursor`",
             ex.example("page", "A completed turn and a queued one",
                        {"data": [{**ex.COMPLETED_TURN, "id": ex.TURN_1, "seq": 1,
                                   "parent_turn_id": None, "previous_interaction_id": None,
                                   "context": "none",
                                   "input": "Which country won the most medals in 2026?"},
                                  ex.QUEUED_TURN], "next_cursor": None}))})
    async def list(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        conversation_id: FromPath[str],
        limit: Limit = 20, cursor: Cursor = None,
    ) -> TurnPage:
        """The conversation's turns, oldest first, a page at a time."""
        return await turns.list_turns(
            resources.pool, tenant_of(request), conversation_id, limit, cursor
        )

    @get("/{turn_id:str}", operation_id="GetTurn",
         summary="Get a turn; with ?wait=, long-poll until it ends",
         responses={**problem_responses(404), **ex.answer(
             200, Turn, "The turn: terminal, or as it is when `wait` runs out",
             ex.example("completed", "Completed, with output and citations", ex.COMPLETED_TURN),
             ex.example("failed", "Failed: the run outlived its deadline", ex.FAILED_TURN),
             ex.example("reseeded", "Completed after Parallel refused the parent's "
                        "interaction: reseeded with the earlier questions and answers",
                        ex.RESEEDED_TURN))})
    async def get(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        conversation_id: FromPath[str],
        turn_id: FromPath[str], wait: Wait = 0,
    ) -> Turn:
        """One turn. With `wait` (seconds), the answer comes as soon as the turn ends, or when
        `wait` runs out; such a long-poll holds one of the tenant's stream slots."""
        tenant_id = tenant_of(request)
        if wait > 0 and resources.streams is not None:
            # A long-poll holds one of the tenant's stream slots while it waits.
            async with resources.streams.long_poll(tenant_id) as feeds:
                waited = await _unless_disconnected(request, turns.wait_for_turn(
                    resources.pool, feeds, tenant_id, conversation_id, turn_id, wait
                ))
            if waited is not None:
                return waited
        return await turns.get_turn(resources.pool, tenant_id, conversation_id, turn_id)

    @post("/{turn_id:str}/cancel", operation_id="CancelTurn", summary="Cancel a turn",
          status_code=200, responses={**problem_responses(404, 409), **ex.answer(
              200, Turn, "The cancelled turn (again, if it already was)",
              ex.example("cancelled", "Cancelled while queued", ex.CANCELLED_TURN))})
    async def cancel(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        conversation_id: FromPath[str],
        turn_id: FromPath[str],
    ) -> Turn:
        """Cancel a queued or running turn (again: the same answer). A running turn's Parallel run
        may still finish upstream: `upstream_may_continue` says so. 409 once completed or failed."""
        return await turns.cancel_turn(
            resources.pool, resources.queue, resources.settings, tenant_of(request),
            conversation_id, turn_id,
        )


async def _unless_disconnected(
    request: Request[Any, Any, Any], work: Coroutine[Any, Any, T]
) -> T | None:
    """The long-poll's answer, or None once the client has gone away: the wait then stops, and
    gives its slot back, at once rather than when `wait` runs out."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (gone, task):
            pending.cancel()
        await asyncio.gather(gone, task, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
