"""The SSRF guard's rules (globally routable addresses only, URL hygiene), and the inbound
webhook's timestamp parsing. No I/O: names resolve through a resolver with fixed answers."""

from __future__ import annotations

import ipaddress

import pytest

from service.domain.push import InvalidSignature, parallel_signature, verify_parallel_webhook
from service.domain.webhook_urls import (
    UnsafeWebhookUrl,
    check_webhook_url,
    is_forbidden,
    split_url,
)

PUBLIC_V4, PUBLIC_V6 = ipaddress.ip_address("93.184.215.14"), ipaddress.ip_address("2606:4700::1")
PRIVATE = ipaddress.ip_address("10.0.0.7")


@pytest.mark.parametrize("address", [
    "fec0::1", "fec0:1234::5",  # IPv6 site-local (deprecated, still routed inside sites)
    "192.88.99.1", "192.88.99.255",  # the old 6to4 relay anycast
    "3fff::1", "3fff:fff::1",  # IPv6 documentation (RFC 9637)
    "198.18.0.1", "192.0.2.5", "198.51.100.5", "203.0.113.5", "240.0.0.1", "2001:db8::1",
    "64:ff9b::a00:1", "64:ff9b::808:808", "64:ff9b:1::1", "5f00::1", "100::1", "2001::1",
])
def test_addresses_that_are_not_globally_routable_are_forbidden(address):
    assert is_forbidden(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["1.1.1.1", "2001:4860:4860::8888", "2a00:1450:4001::200e",
                                     "2002:5db8:d70e::1"])  # 6to4 of a public address
def test_globally_routable_addresses_are_allowed(address):
    assert not is_forbidden(ipaddress.ip_address(address))


@pytest.mark.parametrize("url", [
    "https://user:password@hooks.example.com/in", "https://token@hooks.example.com/in",
    "https://:pw@hooks.example.com/", "http://hooks.example.com/in side",
    "http://hooks.example.com/in\r\nX-Injected: 1", "http://hooks.example.com/in\ttab",
    "http://hooks.example.com/\x00", "http://hooks.example.com/\x7f", "http://hooks.example.com/\x85",
    "http://hooks.example.com/\u00a0", "http://hooks.example.com/\u2028", " http://h.example.com/",
    "http://hooks.example.com:22/", "http://hooks.example.com:25/", "https://hooks.example.com:0/",
    "http://hooks.example.com:1023/",
])
def test_urls_with_credentials_control_characters_whitespace_or_low_ports_are_refused(url):
    with pytest.raises(UnsafeWebhookUrl):
        split_url(url)


@pytest.mark.parametrize(("url", "port"), [
    ("http://hooks.example.com/in", 80), ("https://hooks.example.com/in", 443),
    ("http://hooks.example.com:80/in", 80), ("https://hooks.example.com:443/in", 443),
    ("https://hooks.example.com:1024/in", 1024), ("https://hooks.example.com:8443/in?x=1", 8443),
])
def test_ports_80_443_and_1024_up_are_allowed(url, port):
    assert split_url(url)[2] == port


def resolver_of(*addresses: str):
    async def resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [ipaddress.ip_address(a) for a in addresses]

    return resolve


@pytest.mark.parametrize("answers", [
    ("93.184.215.14", "10.0.0.7"), ("10.0.0.7", "93.184.215.14"),
    ("93.184.215.14", "2606:4700::1", "::1"), ("2606:4700::1", "fec0::1"),
    ("93.184.215.14", "93.184.215.15", "169.254.169.254"),
])
async def test_a_host_with_any_non_public_address_is_refused_whatever_the_order(answers):
    with pytest.raises(UnsafeWebhookUrl, match="non-public address"):
        await check_webhook_url("https://rebind.example.com/in", False, resolver_of(*answers))


async def test_a_host_with_only_public_addresses_is_sent_to_all_of_them():
    addresses = await check_webhook_url(
        "https://hooks.example.com/in", False, resolver_of("93.184.215.14", "2606:4700::1"))
    assert addresses == [PUBLIC_V4, PUBLIC_V6]


async def test_the_url_rules_hold_even_when_private_addresses_are_allowed():
    with pytest.raises(UnsafeWebhookUrl, match="credentials"):
        await check_webhook_url("http://u:p@127.0.0.1:8080/", True, resolver_of("127.0.0.1"))
    assert await check_webhook_url("http://127.0.0.1:8080/", True, resolver_of("127.0.0.1")) == []


@pytest.mark.parametrize("ts", ["²", "١٧٥١٤٩٨٩٧٥", "+1751498975", "1751498975.0", "-1", ""])
def test_a_webhook_timestamp_must_be_ascii_digits(ts):
    body = b"{}"
    headers = {"webhook-id": "whevent_1", "webhook-timestamp": ts,
               "webhook-signature": parallel_signature("s", "whevent_1", ts, body)}
    with pytest.raises(InvalidSignature):
        verify_parallel_webhook("s", headers, body, now=1751498975)
