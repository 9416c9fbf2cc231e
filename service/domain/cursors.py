"""Opaque page cursors: url-safe base64 of a small JSON list, refused with 400 when tampered."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any

import msgspec

from service.errors import BadRequest


def encode_cursor(*values: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(list(values))).decode().rstrip("=")


def decode_cursor(cursor: str, *types: type) -> tuple[Any, ...]:
    """Decode a cursor made by encode_cursor with values of the given types."""
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        values = msgspec.json.decode(raw, type=tuple[*types])  # type: ignore[valid-type]
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise BadRequest("The cursor is not valid: pass back a `next_cursor` unchanged.") from None
    return tuple(values)


def conversation_cursor(created_at: datetime, conversation_id: str) -> str:
    return encode_cursor(created_at, conversation_id)
