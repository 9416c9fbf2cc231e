"""Conversation routes (docs/design.md §3, Conversations)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from service.domain import conversations
from service.http import examples as ex
from service.http.deps import Cursor, Limit, tenant_of
from service.http.problems import problem_responses
from service.models import Conversation
from service.resources import Resources
from service.schemas import (
    ConversationCreate,
    ConversationPage,
    ConversationUpdate,
    ConversationWithSecret,
    WebhookSecret,
)


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
        webhooks, this once."""
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
    ) -> ConversationPage:
        """The tenant's conversations, newest first, a page at a time."""
        return await conversations.list_conversations(
            resources.pool, tenant_of(request), limit, cursor)

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
           summary="Change a conversation's title, processor, metadata or webhook URL",
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
        """Change the title, processor, metadata or webhook URL; `null` clears the title or the
        webhook URL. Setting a webhook URL where there was none answers its new `webhook_secret`,
        once."""
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


