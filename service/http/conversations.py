"""Conversation routes (DESIGN.md §3, Conversations)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from service.domain import conversations
from service.http.deps import Cursor, Limit, tenant_of
from service.models import Conversation
from service.resources import Resources
from service.schemas import (
    ConversationCreate,
    ConversationCreated,
    ConversationPage,
    ConversationUpdate,
    WebhookSecret,
)


def _with_secret(conversation: Conversation, secret: str | None) -> ConversationCreated:
    return ConversationCreated(**{f: getattr(conversation, f) for f in conversation.__struct_fields__},
                               webhook_secret=secret)


class ConversationController(Controller):
    path = "/v1/conversations"
    tags = ["conversations"]

    @post(operation_id="CreateConversation", summary="Create a conversation", status_code=201)
    async def create(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources], data: ConversationCreate
    ) -> ConversationCreated:
        conversation, secret = await conversations.create_conversation(
            resources.pool, resources.settings, tenant_of(request), data
        )
        return _with_secret(conversation, secret)

    @get(operation_id="ListConversations", summary="List conversations, newest first")
    async def list(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources], limit: Limit = 20,
        cursor: Cursor = None,
    ) -> ConversationPage:
        return await conversations.list_conversations(resources.pool, tenant_of(request), limit, cursor)

    @get("/{conversation_id:str}", operation_id="GetConversation", summary="Get a conversation")
    async def get(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources], conversation_id: FromPath[str]
    ) -> Conversation:
        return await conversations.get_conversation(resources.pool, tenant_of(request), conversation_id)

    @patch("/{conversation_id:str}", operation_id="UpdateConversation",
           summary="Change a conversation's title, processor, metadata or webhook URL")
    async def update(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources], conversation_id: FromPath[str],
        data: ConversationUpdate,
    ) -> ConversationCreated:
        conversation, secret = await conversations.update_conversation(
            resources.pool, resources.settings, tenant_of(request), conversation_id, data
        )
        return _with_secret(conversation, secret)

    @post("/{conversation_id:str}/webhook-secret/rotate", operation_id="RotateWebhookSecret",
          summary="Rotate the webhook secret; the old one signs too for 24 h", status_code=200)
    async def rotate_secret(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources], conversation_id: FromPath[str]
    ) -> WebhookSecret:
        secret = await conversations.rotate_webhook_secret(
            resources.pool, tenant_of(request), conversation_id
        )
        return WebhookSecret(webhook_secret=secret)

    @delete("/{conversation_id:str}", operation_id="DeleteConversation",
            summary="Cancel a conversation's open turns and delete it")
    async def delete(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources], conversation_id: FromPath[str]
    ) -> None:
        await conversations.delete_conversation(resources.pool, tenant_of(request), conversation_id)


