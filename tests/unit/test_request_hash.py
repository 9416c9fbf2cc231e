"""The digest an Idempotency-Key's body is compared by."""

from __future__ import annotations

import msgspec

from service.domain.turns import request_hash
from service.schemas import TurnCreate


def test_an_explicit_enqueue_is_the_same_body_as_none():
    # So a client that starts sending the default matches the keys it stored before, and keys
    # stored before the field existed keep matching: the digest of a body without if_busy is
    # what it was then (sha256 of its sorted JSON).
    plain = msgspec.convert({"input": "q"}, TurnCreate)
    explicit = msgspec.convert({"input": "q", "if_busy": "enqueue"}, TurnCreate)
    assert request_hash(plain) == request_hash(explicit)
    assert request_hash(plain).hex() == (
        "461b8f68a57e25f467132aac7c418e9b0c4ed553da84e4ee4d22dd1a5882b353")
    for other in ("reject", "interrupt"):
        assert request_hash(msgspec.convert({"input": "q", "if_busy": other}, TurnCreate)) \
            != request_hash(plain)
