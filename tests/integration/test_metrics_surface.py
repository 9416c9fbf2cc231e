"""/metrics as an operational surface: the shared-state gauges cost at most one measurement per
5 s however often it is scraped, a METRICS_TOKEN is enforced, the content type is one that
Prometheus 3 negotiates, and the worker's metrics server stays on loopback unless told."""

from __future__ import annotations

import asyncio
import dataclasses
import email.message
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest

from service import metrics
from service.app import create_app
from service.config import Settings
from service.devstack import free_port
from service.resources import Resources
from tests.helpers import create_conversation, parse, post_turn, value

# The text-format versions Prometheus 3 asks for in its scrape Accept header (PrometheusText1.0.0
# and PrometheusText0.0.4); both are read by its classic text parser.
PROMETHEUS_TEXT_VERSIONS = {"0.0.4", "1.0.0"}
# What Prometheus 3's textparse.New accepts (an unparsable or other type fails the scrape unless
# the job sets a fallback_scrape_protocol).
PROMETHEUS_MEDIA_TYPES = {"text/plain", "application/openmetrics-text",
                          "application/vnd.google.protobuf"}
DEFAULTS = Settings(database_url="", redis_url="", parallel_api_key="")


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """Parse a Content-Type as Go's mime.ParseMediaType does, duplicate parameters refused."""
    message = email.message.Message()
    message["content-type"] = value
    media_type, *params = message.get_params(header="content-type") or [("", "")]
    names = [name.lower() for name, _ in params]
    if len(names) != len(set(names)):
        raise ValueError(f"mime: duplicate parameter name in {value!r}")
    if "/" not in media_type[0]:
        raise ValueError(f"mime: no media type in {value!r}")
    return media_type[0].lower(), {name.lower(): str(v) for name, v in params}


def prometheus_parser(content_type: str) -> str:
    """The parser Prometheus 3 would pick for a scrape answered with this Content-Type."""
    media_type, params = parse_media_type(content_type)
    assert media_type in PROMETHEUS_MEDIA_TYPES, f"Prometheus 3 has no parser for {media_type}"
    if media_type == "text/plain":
        assert params.get("version") in PROMETHEUS_TEXT_VERSIONS, params
        return "prometheus-text"
    return media_type


def test_the_strict_parser_refuses_what_prometheus_3_refused():
    with pytest.raises(ValueError, match="duplicate"):
        parse_media_type("text/plain; version=1.0.0; charset=utf-8; charset=utf-8")
    assert parse_media_type("text/plain; version=0.0.4") == ("text/plain", {"version": "0.0.4"})


@dataclasses.dataclass
class Scraper:
    http: httpx.AsyncClient
    app_state: object

    @property
    def cache(self) -> metrics.StateCache:
        return getattr(self.app_state, "metrics_state_cache")  # noqa: B009


@pytest.fixture
async def scraper(resources: Resources, request: pytest.FixtureRequest) -> AsyncIterator[Scraper]:
    """A client of an app with the settings the test overrides (indirect parametrization)."""
    overrides = getattr(request, "param", {})
    settings: Settings = msgspec.structs.replace(resources.settings, **overrides)
    app = create_app(settings, resources=dataclasses.replace(resources, settings=settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        yield Scraper(http, app.state)


async def test_metrics_content_type_is_one_prometheus_3_negotiates(scraper):
    response = await scraper.http.get("/metrics")
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert response.headers.get_list("content-type") == [content_type]
    assert prometheus_parser(content_type) == "prometheus-text"
    assert parse_media_type(content_type)[1] == {"version": "0.0.4", "charset": "utf-8"}
    assert value(parse(response.text), "research_state_up") == 1


@pytest.mark.parametrize("scraper", [{"metrics_state_max_age_s": 60.0}], indirect=True)
async def test_many_scrapes_measure_the_shared_state_once(scraper, api, resources):
    first, *concurrent = await asyncio.gather(*(scraper.http.get("/metrics") for _ in range(30)))
    assert value(parse(first.text), "research_queue_jobs") == 0
    # A turn queued now is not seen by the next scrapes: they read no Postgres and no Redis.
    conversation = await create_conversation(api)
    await post_turn(api, conversation["id"], "Counted later")
    for _ in range(20):
        samples = parse((await scraper.http.get("/metrics")).text)
        assert value(samples, "research_queue_jobs") == 0
        assert value(samples, "research_open_turns", status="queued", processor="lite") == 0
    assert all(r.status_code == 200 for r in concurrent)
    assert scraper.cache.refreshes == 1


async def test_the_state_is_measured_at_most_once_per_max_age(resources):
    """With the default 5 s: however many scrapes, one measurement per 5 s of the clock."""
    now = [1000.0]
    max_age = DEFAULTS.metrics_state_max_age_s
    assert max_age == 5.0
    cache = metrics.StateCache(max_age, clock=lambda: now[0])
    args = (resources.pool, resources.queue, resources.settings.queue_name)
    for step in range(50):  # 50 scrapes over 4.9 s
        now[0] = 1000.0 + step * 0.1
        await cache.families(*args)
    assert cache.refreshes == 1
    assert await resources.queue.zadd(resources.settings.queue_name, {"job:x": 1}) == 1
    now[0] = 1005.0
    families = await cache.families(*args)
    assert cache.refreshes == 2
    (jobs,) = [f for f in families if f.name == "research_queue_jobs"]
    assert jobs.samples[0].value == 1, "the second measurement is a new one"


@pytest.mark.parametrize("scraper", [{"metrics_state_max_age_s": 60.0}], indirect=True)
async def test_a_failed_measurement_is_kept_too(scraper, resources):
    """Postgres away: scrapes say research_state_up 0 without asking again each time."""
    await resources.pool.close()  # every query now fails at once
    for _ in range(10):
        samples = parse((await scraper.http.get("/metrics")).text)
        assert value(samples, "research_state_up") == 0
    assert scraper.cache.refreshes == 1


@pytest.mark.parametrize("scraper", [{"metrics_token": "scrape-s3cret"}], indirect=True)
async def test_metrics_token_is_enforced(scraper):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "scrape-s3cret"},
                    {"authorization": "Basic c2NyYXBlLXMzY3JldA=="}):
        refused = await scraper.http.get("/metrics", headers=headers)
        assert refused.status_code == 401, headers
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["status"] == 401
        assert "research_" not in refused.text
    allowed = await scraper.http.get("/metrics",
                                     headers={"authorization": "Bearer scrape-s3cret"})
    assert allowed.status_code == 200
    assert value(parse(allowed.text), "research_state_up") == 1


async def test_metrics_need_no_token_when_none_is_set(scraper):
    assert (await scraper.http.get("/metrics")).status_code == 200


def test_worker_metrics_listen_on_loopback_unless_told():
    assert DEFAULTS.worker_metrics_host == "127.0.0.1"
    port = free_port()
    server = metrics.start_worker_server(port, DEFAULTS.worker_metrics_host)
    try:
        assert server.server_address[:2] == ("127.0.0.1", port)
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
    finally:
        server.shutdown()
        server.server_close()
    port = free_port()
    server = metrics.start_worker_server(port, "0.0.0.0")
    try:
        assert server.server_address[:2] == ("0.0.0.0", port)
    finally:
        server.shutdown()
        server.server_close()
