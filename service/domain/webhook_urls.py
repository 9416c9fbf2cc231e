"""The SSRF guard: webhook URLs must be http(s) and resolve only to globally routable addresses.

The URL itself must carry no credentials, no control characters or whitespace, and no port
below 1024 but 80 and 443 (these hold whatever WEBHOOK_ALLOW_PRIVATE says).

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
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from service.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata endpoints beyond the link-local range (AWS IPv6, Alibaba).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
# IANA's special-purpose ranges, named here as well as through `is_global`, whose answers
# depend on the Python version (3.11 counts fec0::/10, 192.88.99.0/24 and 3fff::/20 global).
DENIED_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    # NAT64 (64:ff9b::/96 and /48) reaches IPv4 addresses that could not be vetted here.
    "::/127", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
    "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))
ALLOWED_LOW_PORTS = frozenset({80, 443})
RESOLVE_TIMEOUT_S = 5.0

Resolver = Callable[[str, int], Awaitable[list["IPAddress"]]]


class UnsafeWebhookUrl(InvalidInput):
    """The webhook URL is not allowed."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"webhook_url is refused: {reason}.",
            errors=[{"field": "webhook_url", "message": reason}],
        )
        self.reason = reason


def is_forbidden(ip: IPAddress) -> bool:
    """Any address that is not globally routable: loopback, private, link-local, site-local,
    reserved, documentation, multicast, unspecified, metadata; or an IPv6 one embedding such."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and is_forbidden(embedded):
            return True
    return (
        ip in METADATA_ADDRESSES
        or any(ip in net for net in DENIED_NETWORKS if net.version == ip.version)
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
    # Anywhere, not only in the host: urlsplit strips some (tabs, newlines) without a word, and
    # a receiver or proxy may read the URL differently from us.
    if any(c.isspace() or not c.isprintable() for c in url):
        raise UnsafeWebhookUrl("the URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeWebhookUrl("not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeWebhookUrl("only http and https URLs are allowed")
    if "@" in parts.netloc:
        # They would be stored, echoed in every answer and sent in clear over http.
        raise UnsafeWebhookUrl("credentials (user:password@) are not allowed in the URL")
    if not parts.hostname:
        raise UnsafeWebhookUrl("the URL has no host")
    if port is not None and port < 1024 and port not in ALLOWED_LOW_PORTS:
        raise UnsafeWebhookUrl("ports below 1024 other than 80 and 443 are not allowed")
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


def vet_addresses(host: str, addresses: list[IPAddress]) -> list[IPAddress]:
    """The addresses, when every one of them is public. Raises UnsafeWebhookUrl.

    A host with any forbidden address is refused as a whole, so DNS round-robin cannot sneak
    a private address in.
    """
    for ip in addresses:
        if is_forbidden(ip):
            raise UnsafeWebhookUrl(f"{host} resolves to {ip}, a non-public address")
    if not addresses:
        raise UnsafeWebhookUrl(f"the host {host!r} does not resolve")
    return addresses


async def check_webhook_url(
    url: str, allow_private: bool, resolver: Resolver = resolve
) -> list[IPAddress]:
    """The public addresses to send to (none checked when allow_private). Raises UnsafeWebhookUrl.

    `resolver` is the name lookup (tests give one with fixed answers).
    """
    _scheme, host, port = split_url(url)
    if allow_private:
        return []
    return vet_addresses(host, await resolver(host, port))
