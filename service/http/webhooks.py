"""Webhook routes: the delivery ledger, redelivery, and Parallel's inbound webhook (push mode)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from service.domain import push, webhooks
from service.http import examples as ex
from service.http.deps import Cursor, Limit, tenant_of
from service.http.problems import problem_responses
from service.models import WebhookDelivery, WebhookDeliveryPage
from service.resources import Resources


class WebhookDeliveryController(Controller):
    path = "/v1"
    tags = ("webhooks",)

    @get("/conversations/{conversation_id:str}/webhook-deliveries",
         operation_id="ListWebhookDeliveries",
         summary="List a conversation's webhook deliveries with every attempt, in event order",
         responses={**problem_responses(404), **ex.answer(
             200, WebhookDeliveryPage, "A page of deliveries; pass `next_cursor` as `cursor`",
             ex.example("page", "Delivered on the second attempt",
                        {"data": [ex.DELIVERY], "next_cursor": None}))})
    async def list(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        conversation_id: FromPath[str], limit: Limit = 20, cursor: Cursor = None,
    ) -> WebhookDeliveryPage:
        """The conversation's webhook deliveries in event order, each with every attempt (status
        code, latency, error)."""
        return await webhooks.list_deliveries(
            resources.pool, tenant_of(request), conversation_id, limit, cursor
        )

    @post("/webhook-deliveries/{delivery_id:str}/redeliver", operation_id="RedeliverWebhook",
          summary="Send a webhook again, with the same webhook-id", status_code=202,
          responses={**problem_responses(404), **ex.answer(
              202, WebhookDelivery, "The delivery, due again now",
              ex.example("pending", "Queued for another attempt", {
                  **ex.DELIVERY, "status": "pending",
                  "next_attempt_at": "2026-02-23T10:02:11.000000Z"}))})
    async def redeliver(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources],
        delivery_id: FromPath[str],
    ) -> WebhookDelivery:
        """Send a delivery again, now, with the same `webhook-id`."""
        return await webhooks.redeliver(resources.pool, tenant_of(request), delivery_id)


class ParallelHookController(Controller):
    """Unauthenticated (app.py excludes /v1/hooks/ from API keys): the signature is the check."""

    path = "/v1/hooks"
    tags = ("hooks",)

    @post("/parallel", operation_id="ReceiveParallelWebhook",
          summary="Parallel's task_run.status webhook (push mode): triggers a check of the run",
          description="Needs no API key: the request must carry Parallel's signature "
                      "(PARALLEL_WEBHOOK_SECRET, docs/parallel.md §4), at most 300 s old.",
          status_code=204, responses=problem_responses(400, 401, auth=False))
    async def parallel(
        self, request: Request[Any, Any, Any], resources: NamedDependency[Resources]
    ) -> None:
        body = await request.body()
        await push.receive_parallel_webhook(
            resources.pool, resources.queue, resources.settings, request.headers, body
        )
