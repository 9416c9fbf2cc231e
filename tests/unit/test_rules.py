"""Pure rules: check scheduling, cursors, schema depth and input size."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from service.config import Settings
from service.domain.cursors import decode_cursor, encode_cursor
from service.domain.schedule import check_delay, poll_cap, poll_start, profile
from service.domain.validation import check_turn_request, schema_depth
from service.errors import BadRequest, InvalidInput
from service.schemas import TurnCreate


def test_checks_double_from_a_processor_scaled_start_up_to_the_cap():
    delays = [check_delay("lite", n, initial_s=1, max_s=30) for n in range(8)]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert check_delay("ultra", 0, initial_s=1, max_s=600) == 15
    # A 120 s lite run is checked about 8 times: well under 20 Parallel calls per turn.
    elapsed, checks = 0.0, 0
    while elapsed < 120:
        elapsed += check_delay("lite", checks, initial_s=1, max_s=30)
        checks += 1
    assert checks <= 10


def test_fast_processors_share_their_standard_profile():
    assert profile("core-fast") == profile("core")
    assert profile("ultra8x").usd_per_run == 2.4


def test_cursors_round_trip_and_refuse_tampering():
    now = datetime.now(UTC)
    assert decode_cursor(encode_cursor(now, "conv_1"), datetime, str) == (now, "conv_1")
    assert decode_cursor(encode_cursor(7), int) == (7,)
    for bad in ["", "!!!", encode_cursor("x"), encode_cursor(1, 2, 3)]:
        with pytest.raises(BadRequest):
            decode_cursor(bad, int)


def test_schema_depth_counts_nested_objects():
    flat = {"type": "object", "properties": {"a": {"type": "string"}}}
    nested = {"type": "object", "properties": {"a": flat}}
    in_array = {"type": "object", "properties": {"a": {"type": "array", "items": nested}}}
    assert (schema_depth(flat), schema_depth(nested), schema_depth(in_array)) == (1, 2, 3)


def settings() -> Settings:
    return Settings(database_url="postgresql://x", redis_url="redis://x", parallel_api_key="k")


def test_input_size_counts_a_json_schema_but_not_the_default_text_schema():
    check_turn_request(settings(), TurnCreate(input="x" * 25_000))
    schema = {"type": "json", "json_schema": {"type": "object", "properties": {}}}
    body = msgspec.convert({"input": "x" * 24_990, "output_schema": schema}, TurnCreate)
    with pytest.raises(InvalidInput):
        check_turn_request(settings(), body)


def test_settings_from_env_converts_strings():
    parsed = Settings.from_env({
        "DATABASE_URL": "postgresql://db", "REDIS_URL": "redis://r", "PARALLEL_API_KEY": "k",
        "DB_POOL_MAX": "20", "WEBHOOK_ALLOW_PRIVATE": "true", "PROCESSORS": "lite, core",
        "UNRELATED": "ignored",
    })
    assert parsed.db_pool_max == 20 and parsed.webhook_allow_private is True
    assert parsed.processors == ["lite", "core"]
    with pytest.raises(msgspec.ValidationError):
        Settings.from_env({"REDIS_URL": "redis://r", "PARALLEL_API_KEY": "k"})


def _checks_before(settings: Settings, seconds: float) -> int:
    elapsed, checks = 0.0, 0
    while True:
        elapsed += check_delay("lite", checks, poll_start(settings), poll_cap(settings))
        if elapsed >= seconds:
            return checks
        checks += 1


def test_push_mode_polls_only_as_a_slow_safety_net():
    poll = Settings(database_url="postgresql://x", redis_url="redis://x", parallel_api_key="k")
    push = msgspec.structs.replace(poll, public_base_url="https://api.example.com")
    assert poll_start(poll) == poll.poll_initial_s
    assert poll_start(push) == push.push_poll_initial_s
    # Calls per turn: create + these checks + the webhook's retrieve and result.
    assert 3 + _checks_before(push, 120) <= 4
    assert 3 + _checks_before(push, 1200) <= 7
    assert 2 + _checks_before(poll, 120) <= 20
