"""Outbound webhook requests, signed per Standard Webhooks with the `standardwebhooks` package."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks import Webhook

from service import __version__
from service.models import AttemptOutcome

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

EXCERPT_CHARS = 500
USER_AGENT = f"research-service-webhooks/{__version__}"


def signature_header(secrets: Sequence[str], webhook_id: str, at: datetime, body: str) -> str:
    """`webhook-signature`: one `v1,<sig>` per live secret, space-separated (after rotations)."""
    return " ".join(Webhook(secret).sign(webhook_id, at, body) for secret in secrets)


def signed_headers(secrets: Sequence[str], webhook_id: str, body: str) -> dict[str, str]:
    at = datetime.now(UTC).replace(microsecond=0)
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature_header(secrets, webhook_id, at, body),
    }


class WebhookSender:
    """One HTTP connection pool for a process's webhook attempts. Redirects are not followed."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def send(
        self, url: str, body: str, headers: dict[str, str], pin_to: IPAddress | None = None
    ) -> AttemptOutcome:
        """POST once; any answer or failure becomes an outcome, nothing is raised.

        `pin_to` connects to that (already vetted) address while keeping the URL's host for
        the Host header and TLS (SNI and certificate name).
        """
        started_at = datetime.now(UTC)
        start = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        excerpt: str | None = None
        try:
            request = self._request(url, body, headers, pin_to)
            async with asyncio.timeout(self._timeout_s):
                response = await self._http.send(request, stream=True)
                try:
                    status_code = response.status_code
                    excerpt = await _excerpt(response)
                finally:
                    await response.aclose()
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}"
        except TimeoutError:
            error = f"timed out after {self._timeout_s:g} s"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        latency_ms = int((time.monotonic() - start) * 1000)
        return AttemptOutcome(started_at=started_at, status_code=status_code,
                              latency_ms=latency_ms, error=error, response_excerpt=excerpt)

    def _request(
        self, url: str, body: str, headers: dict[str, str], pin_to: IPAddress | None
    ) -> httpx.Request:
        target = httpx.URL(url)
        extensions: dict[str, Any] = {}
        if pin_to is not None:
            headers = {**headers, "host": target.netloc.decode("ascii")}
            if target.scheme == "https":
                extensions["sni_hostname"] = target.host
            target = target.copy_with(host=str(pin_to))
        return self._http.build_request(
            "POST", target, content=body.encode(), headers=headers, extensions=extensions
        )


async def _excerpt(response: httpx.Response) -> str:
    """The first EXCERPT_CHARS characters of the answer, without reading all of a huge one."""
    chunks = bytearray()
    async for chunk in response.aiter_bytes():
        chunks += chunk
        if len(chunks) >= EXCERPT_CHARS * 4:
            break
    return chunks.decode("utf-8", errors="replace")[:EXCERPT_CHARS]
