"""Conversation routes (docs/design.md §3, Conversations)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from litestar import Controller, Request, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, QueryParameter

from service.domain import conversations
from service.errors import InvalidInput
from service.http import examples as ex
from service.http.deps import Cursor, Limit, tenant_of
from service.http.problems import problem_responses
from service.models import Conversation, ConversationStatus
from service.resources import Resources
from service.schemas import (
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    ConversationCreate,
    ConversationPage,
    ConversationUpdate,
    ConversationWithSecret,
    WebhookSecret,
)

StatusFilter = Annotated[
    ConversationStatus | None,
    QueryParameter(description="`active`: a turn is queued or running; `idle`: none is"),
]
METADATA_PREFIX = "metadata."


def metadata_filter(query: Iterable[tuple[str, str]]) -> dict[str, str] | None:
    """The `metadata.<key>=<value>` pairs of the query, or None when it has none.

    Raises InvalidInput for a pair no conversation's metadata can hold."""
    pairs: dict[str, str] = {}
    errors = []
    for name, value in query:
        if not name.startswith(METADATA_PREFIX):
            continue
        key = name[len(METADATA_PREFIX):]
        problem = (
            f"a metadata key has 1 to {MAX_METADATA_KEY} characters"
            if not 1 <= len(key) <= MAX_METADATA_KEY
            else f"a metadata value has at most {MAX_METADATA_VALUE} characters"
            if len(value) > MAX_METADATA_VALUE
            else "given more than once" if key in pairs
            else None
        )
        if problem:
            errors.append({"field": name, "message": problem, "source": "query"})
        pairs[key] = value
    if len(pairs) > MAX_METADATA_PAIRS:
        errors.append({"field": "metadata", "source": "query",
                       "message": f"a conversation has at most {MAX_METADATA_PAIRS} pairs"})
    if errors:
        raise InvalidInput("; ".join(f"{e['field']}: {e['message']}" for e in errors),
                           errors=errors)
    return pairs or None


def _with_secret(conversation: Conversation, secret: str | None) -> ConversationWithSecret:
    fields = {f: getattr(conversation, f) for f in conversation.__struct_fields__}
    return ConversationWithSecret(**fields,
                               webhook_secret=secret)


class ConversationController(Controller):
    path = "/v1/conversations"
    tags = ("conversations",)

    @post(operation_id="CreateConversation", summary="Create a conversation", status_code=201,
          responses={**problem_responses(413), **ex.answer(
              201, ConversationWithSecret, "The conversation; `webhook_secret` only here, once",
              ex.example("created", "With a webhook URL", ex.NEW_CONVERSATION))})
    async def create(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        data: Annotated[ConversationCreate, ex.body(*ex.CREATE_CONVERSATION)],
    ) -> ConversationWithSecret:
        """Create a conversation. With `webhook_url` (http(s), resolving to public addresses only
        unless WEBHOOK_ALLOW_PRIVATE), the answer carries the `webhook_secret` that signs its
        webhooks, this once. With `ttl_seconds`, it is deleted (as DELETE does) that long after
        its last activity (creation, a new turn, a turn changing status), never while a turn is
        queued or running; `expires_at` says when."""
        conversation, secret = await conversations.create_conversation(
            resources.pool, resources.settings, tenant_of(request), data
        )
        return _with_secret(conversation, secret)

    @get(operation_id="ListConversations", summary="List conversations, newest first",
         responses={**problem_responses(), **ex.answer(
             200, ConversationPage, "A page of conversations; pass `next_cursor` as `cursor`",
             ex.example("page", "One conversation, no more pages",
                        {"data": [ex.CONVERSATION], "next_cursor": None}))})
    async def list(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        limit: Limit = 20,
        cursor: Cursor = None,
        status: StatusFilter = None,
    ) -> ConversationPage:
        """The tenant's conversations, newest first, a page at a time, with the filters ANDed:
        `status`, and `metadata.<key>=<value>` for each metadata pair a conversation must hold
        (several allowed, e.g. `?metadata.customer=c_42&metadata.region=eu`; the key as the
        metadata has it, percent-encoded like any query value). A filter no conversation can
        meet (a key that is empty or over 16 characters, a value over 512, more than 16 pairs,
        a key given twice) answers 422. Each page keeps the filters: pass them again with
        `cursor`."""
        return await conversations.list_conversations(
            resources.pool, tenant_of(request), limit, cursor, status,
            metadata_filter(request.query_params.multi_items()))

    @get("/{conversation_id:str}", operation_id="GetConversation", summary="Get a conversation",
         responses={**problem_responses(404), **ex.answer(
             200, Conversation, "The conversation",
             ex.example("conversation", "Two turns, both ended", ex.CONVERSATION))})
    async def get(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        conversation_id: FromPath[str],
    ) -> Conversation:
        """One conversation, with its status (`active` while a turn is queued or running) and turn
        count."""
        return await conversations.get_conversation(
            resources.pool, tenant_of(request), conversation_id)

    @patch("/{conversation_id:str}", operation_id="UpdateConversation",
           summary="Change a conversation's title, processor, metadata, webhook URL or TTL",
           responses={**problem_responses(404, 413), **ex.answer(
               200, ConversationWithSecret,
               "The conversation; `webhook_secret` once, when a webhook URL is set where none was",
               ex.example("updated", "Retitled",
                          {**ex.CONVERSATION, "title": "Milano Cortina 2026"}))})
    async def update(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        conversation_id: FromPath[str],
        data: Annotated[ConversationUpdate, ex.body(*ex.UPDATE_CONVERSATION)],
    ) -> ConversationWithSecret:
        """Change the title, processor, metadata, webhook URL or TTL; `null` clears the title,
        the webhook URL or the TTL. Setting a webhook URL where there was none answers its new
        `webhook_secret`, once. A new `ttl_seconds` counts from the last activity (this PATCH is
        not one): a TTL shorter than the time since then expires the conversation at once."""
        conversation, secret = await conversations.update_conversation(
            resources.pool, resources.settings, tenant_of(request), conversation_id, data
        )
        return _with_secret(conversation, secret)

    @post("/{conversation_id:str}/webhook-secret/rotate", operation_id="RotateWebhookSecret",
          summary="Rotate the webhook secret; each one replaced within 24 h keeps signing",
          status_code=200,
          responses={**problem_responses(404), **ex.answer(
              200, WebhookSecret, "The new secret, shown once",
              ex.example("rotated", "A new secret",
                         {"webhook_secret": "whsec_Jr1zXh0sPq3pVw9UuO1tKb5EaMd8Yn2C"}))})
    async def rotate_secret(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        conversation_id: FromPath[str],
    ) -> WebhookSecret:
        """A new webhook secret, shown once. Webhooks are signed with it and with every secret it
        replaced within the last 24 hours, so receivers can switch over."""
        secret = await conversations.rotate_webhook_secret(
            resources.pool, tenant_of(request), conversation_id
        )
        return WebhookSecret(webhook_secret=secret)

    @delete("/{conversation_id:str}", operation_id="DeleteConversation",
            summary="Cancel a conversation's open turns and delete it",
            responses=problem_responses(404))
    async def delete(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        conversation_id: FromPath[str],
    ) -> None:
        """Cancel the conversation's open turns, then delete it and everything it holds."""
        await conversations.delete_conversation(resources.pool, tenant_of(request), conversation_id)


