"""Outbound `task_run.status` webhooks, signed as docs/parallel.md §4 describes.

Signature: `v1,` + base64(HMAC-SHA256(key=secret as raw UTF-8 bytes, msg=f"{id}.{ts}.{body}")).
Retries on non-2xx or connection errors with exponential backoff from `webhook_retry_base_s`,
up to `webhook_max_attempts` attempts, keeping the same `webhook-id`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from sandbox.store import Run, Store
from sandbox.wire import encode, rfc3339


def sign(secret: str, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: float | None = 300
) -> bool:
    """Check a delivery the way a receiver should (any space-separated `v1,` entry may match)."""
    webhook_id, ts = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not webhook_id or not ts.isdigit():
        return False
    if tolerance_s is not None and abs(time.time() - int(ts)) > tolerance_s:
        return False
    expected = sign(secret, webhook_id, ts, body).split(",", 1)[1]
    for entry in headers.get("webhook-signature", "").split():
        version, _, sig = entry.partition(",")
        if version == "v1" and hmac.compare_digest(sig, expected):
            return True
    return False


@dataclass(slots=True)
class Delivery:
    webhook_id: str
    run: Run
    url: str
    body: bytes
    attempt: int = 0


class WebhookSender:
    """Queue plus a fixed pool of sender tasks; retries are timers that re-queue the delivery."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.config = store.config
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self.client: httpx.AsyncClient | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._timers: dict[str, asyncio.TimerHandle] = {}  # webhook_id → pending retry
        store.on_terminal.append(self.on_terminal)

    async def start(self) -> None:
        self.client = httpx.AsyncClient(timeout=self.config.webhook_timeout_s, trust_env=False)
        self._workers = [
            asyncio.create_task(self._work())
            for _ in range(max(1, self.config.webhook_concurrency))
        ]

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()

    def on_terminal(self, run: Run) -> None:
        webhook = run.body.get("webhook")
        if not webhook:
            return
        envelope = {
            "timestamp": rfc3339(time.time()),
            "type": "task_run.status",
            "data": self.store.task_run(run),
        }
        delivery = Delivery(
            f"whevent_{secrets.token_hex(12)}", run, webhook["url"], encode(envelope)
        )
        self.queue.put_nowait(delivery)

    async def _work(self) -> None:
        while True:
            delivery = await self.queue.get()
            try:
                await self._attempt(delivery)
            except Exception as exc:
                self._log(delivery, None, f"internal error: {exc!r}", "")

    async def _attempt(self, d: Delivery) -> None:
        if self.store.runs.get(d.run.run_id) is not d.run or self.client is None:
            return  # reset since: drop it
        d.attempt += 1
        ts = str(int(time.time()))
        signature = sign(self.config.webhook_secret, d.webhook_id, ts, d.body)
        headers = {
            "content-type": "application/json",
            "webhook-id": d.webhook_id,
            "webhook-timestamp": ts,
            "webhook-signature": signature,
            "user-agent": "parallel-sandbox-webhooks",
        }
        status: int | None = None
        error: str | None = None
        try:
            resp = await self.client.post(d.url, content=d.body, headers=headers)
            status = resp.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._log(d, status, error, ts)
        if error is not None and d.attempt < self.config.webhook_max_attempts:
            delay = self.config.webhook_retry_base_s * 2 ** (d.attempt - 1)
            self._timers[d.webhook_id] = asyncio.get_running_loop().call_later(
                delay, self._requeue, d
            )

    def _requeue(self, d: Delivery) -> None:
        self._timers.pop(d.webhook_id, None)
        self.queue.put_nowait(d)

    def _log(self, d: Delivery, status: int | None, error: str | None, ts: str) -> None:
        self.store.webhook_log.append(
            {
                "webhook_id": d.webhook_id,
                "run_id": d.run.run_id,
                "url": d.url,
                "attempt": d.attempt,
                "status_code": status,
                "ok": error is None,
                "error": error,
                "at": rfc3339(time.time()),
                "webhook_timestamp": ts,
                "body": d.body.decode(),
            }
        )
