"""Signatures both ways (Parallel's inbound, ours outbound), SSRF rules, the retry schedule."""

from __future__ import annotations

import ipaddress
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from service.clients.webhooks import WebhookSender, signature_header, signed_headers
from service.config import Settings
from service.domain.push import InvalidSignature, parallel_signature, verify_parallel_webhook
from service.domain.schedule import poll_cap
from service.domain.webhook_urls import UnsafeWebhookUrl, is_forbidden, split_url
from service.domain.webhooks import next_step

# docs/parallel.md §4, "Test vector".
VECTOR_SECRET = "test_secret_123"
VECTOR_ID = "whevent_abc123def456"
VECTOR_TS = "1751498975"
VECTOR_BODY = (
    b'{"timestamp":"2025-04-23T20:21:48.037943Z","type":"task_run.status","data":{"run_id":'
    b'"trun_9907962f83aa4d9d98fd7f4bf745d654","interaction_id":"trun_9907962f83aa4d9d98fd7f4bf'
    b'745d654","status":"completed","is_active":false,"warnings":null,"error":null,"processor":'
    b'"core","metadata":{"key":"value"},"taskgroup_id":null,"created_at":"2025-04-23T20:21:48.'
    b'037943Z","modified_at":"2025-04-23T20:21:48.037943Z"}}'
)
VECTOR_SIGNATURE = "v1,U4LX2UcpjoUv23j1f29U+IkoBLrPQYMPfu9UrH9lz8A="


def vector_headers(signature: str = VECTOR_SIGNATURE) -> dict[str, str]:
    return {"webhook-id": VECTOR_ID, "webhook-timestamp": VECTOR_TS,
            "webhook-signature": signature}


def test_parallel_signature_matches_the_documented_test_vector():
    assert parallel_signature(VECTOR_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIGNATURE
    verify_parallel_webhook(VECTOR_SECRET, vector_headers(), VECTOR_BODY, now=int(VECTOR_TS) + 299)


def test_any_entry_of_a_rotating_signature_header_may_match():
    header = f"v1,bm90LXRoaXMtb25l {VECTOR_SIGNATURE}"
    verify_parallel_webhook(VECTOR_SECRET, vector_headers(header), VECTOR_BODY, now=int(VECTOR_TS))


@pytest.mark.parametrize(
    ("secret", "headers", "body", "now"),
    [
        (VECTOR_SECRET, vector_headers(), VECTOR_BODY, int(VECTOR_TS) + 301),  # stale
        (VECTOR_SECRET, vector_headers(), VECTOR_BODY, int(VECTOR_TS) - 301),  # from the future
        ("another_secret", vector_headers(), VECTOR_BODY, int(VECTOR_TS)),
        (VECTOR_SECRET, vector_headers(), VECTOR_BODY + b" ", int(VECTOR_TS)),  # body changed
        (VECTOR_SECRET, vector_headers("v2," + VECTOR_SIGNATURE[3:]), VECTOR_BODY, int(VECTOR_TS)),
        (VECTOR_SECRET, {"webhook-id": VECTOR_ID}, VECTOR_BODY, int(VECTOR_TS)),
        (None, vector_headers(), VECTOR_BODY, int(VECTOR_TS)),  # push mode not configured
    ],
)
def test_bad_parallel_signatures_are_refused(secret, headers, body, now):
    with pytest.raises(InvalidSignature):
        verify_parallel_webhook(secret, headers, body, now=now)


def test_our_signatures_verify_with_standardwebhooks_under_either_secret():
    old = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    new = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
    body = '{"type":"turn.completed","timestamp":"2026-01-01T00:00:00Z","data":{}}'
    headers = signed_headers([new, old], "msg_1", body)
    assert len(headers["webhook-signature"].split()) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers)["type"] == "turn.completed"
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB").verify(body, headers)


def test_signature_header_is_the_standard_one():
    at = datetime.fromtimestamp(1_700_000_000, UTC)
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    assert signature_header([secret], "msg_x", at, "{}") == Webhook(secret).sign("msg_x", at, "{}")
    assert abs(int(signed_headers([secret], "msg_x", "{}")["webhook-timestamp"]) - time.time()) < 5


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.0.1", "169.254.169.254", "0.0.0.0",
    "100.64.0.1", "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fd00:ec2::254",
    "fc00::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "2002:0a00:0001::1", "ff02::1",
    "100.100.100.200",
])
def test_non_public_addresses_are_forbidden(address):
    assert is_forbidden(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address):
    assert not is_forbidden(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "url", ["ftp://example.com/x", "file:///etc/passwd", "http://", "http://h:99999/"]
)
def test_only_http_urls_with_a_host_are_accepted(url):
    with pytest.raises(UnsafeWebhookUrl):
        split_url(url)


def test_the_retry_schedule_then_failure():
    schedule = [5.0, 30.0, 120.0]
    assert next_step(True, 0, schedule) == ("delivered", None)
    assert [next_step(False, n, schedule) for n in range(4)] == [
        ("pending", 5.0), ("pending", 30.0), ("pending", 120.0), ("failed", None)]


def test_default_schedule_spans_about_a_day_and_push_mode_polls_less():
    settings = Settings(database_url="x", redis_url="y", parallel_api_key="k")
    assert 20 * 3600 < sum(settings.webhook_retry_schedule_s) < 30 * 3600
    assert settings.webhook_timeout_s == 10
    assert poll_cap(settings) == settings.poll_max_s
    push = Settings(database_url="x", redis_url="y", parallel_api_key="k",
                    public_base_url="https://research.example.com")
    assert poll_cap(push) == push.push_poll_max_s > settings.poll_max_s


async def test_a_vetted_address_is_pinned_keeping_host_and_tls_name():
    sender = WebhookSender(timeout_s=1)
    try:
        pinned = sender._request("https://hooks.example.com:8443/in?x=1", "{}", {},
                                 ipaddress.ip_address("93.184.215.14"))
        assert str(pinned.url) == "https://93.184.215.14:8443/in?x=1"
        assert pinned.headers["host"] == "hooks.example.com:8443"
        assert pinned.extensions["sni_hostname"] == "hooks.example.com"
        v6 = sender._request("http://hooks.example.com/in", "{}", {},
                             ipaddress.ip_address("2606:4700:4700::1111"))
        assert str(v6.url) == "http://[2606:4700:4700::1111]/in"
        assert v6.headers["host"] == "hooks.example.com"
    finally:
        await sender.close()
