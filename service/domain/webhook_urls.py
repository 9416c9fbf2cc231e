"""The SSRF guard: webhook URLs must be http(s) and resolve only to public addresses.

Checked when a URL is registered and again before every attempt, since DNS can change in
between. The addresses checked at delivery are the ones connected to (the dispatcher pins the
connection to them), so a name cannot resolve to a public address for the check and to a
private one for the request. WEBHOOK_ALLOW_PRIVATE turns the guard off (local development,
tests).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from service.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata endpoints beyond the link-local range (AWS IPv6, Alibaba).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
RESOLVE_TIMEOUT_S = 5.0


class UnsafeWebhookUrl(InvalidInput):
    """The webhook URL is not allowed."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"webhook_url is refused: {reason}.",
            errors=[{"field": "webhook_url", "message": reason}],
        )
        self.reason = reason


def is_forbidden(ip: IPAddress) -> bool:
    """Loopback, private, link-local, reserved, multicast, unspecified or metadata addresses."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and is_forbidden(embedded):
            return True
    return (
        ip in METADATA_ADDRESSES
        or ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
        or not ip.is_global
    )


def split_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL. Raises UnsafeWebhookUrl."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeWebhookUrl("not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeWebhookUrl("only http and https URLs are allowed")
    if not parts.hostname:
        raise UnsafeWebhookUrl("the URL has no host")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address the host resolves to. Raises UnsafeWebhookUrl when it does not resolve."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        raise UnsafeWebhookUrl(f"the host {host!r} does not resolve") from None
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in found:
            found.append(ip)
    if not found:
        raise UnsafeWebhookUrl(f"the host {host!r} does not resolve")
    return found


async def check_webhook_url(url: str, allow_private: bool) -> list[IPAddress]:
    """The public addresses to send to (none checked when allow_private). Raises UnsafeWebhookUrl.

    A host with any forbidden address is refused as a whole, so DNS round-robin cannot sneak
    a private address in.
    """
    _scheme, host, port = split_url(url)
    if allow_private:
        return []
    addresses = await resolve(host, port)
    for ip in addresses:
        if is_forbidden(ip):
            raise UnsafeWebhookUrl(f"{host} resolves to {ip}, a non-public address")
    return addresses
