"""Opaque page cursors: url-safe base64 of a small JSON list, refused with 400 when tampered.

What a cursor decodes to goes to Postgres as is, so its numbers are bounded to the column's
range and its strings hold no NUL: a forged cursor is a 400, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import msgspec

from service.domain.validation import INT4_MAX, INT8_MAX, UNSTORABLE
from service.errors import BadRequest

# The cursor types callers name: a turn's seq is an int4 column, an event's sequence an int8.
Seq = Annotated[int, msgspec.Meta(ge=0, le=INT4_MAX)]
BigSeq = Annotated[int, msgspec.Meta(ge=0, le=INT8_MAX)]
# A bare int or str is bounded the same way (int8, no NUL).
_BOUNDED: dict[Any, Any] = {int: BigSeq, str: Annotated[str, msgspec.Meta(max_length=256)]}
_SEQUENCE = re.compile(r"[0-9]{1,19}", re.ASCII)

T = TypeVar("T")

INVALID = "The cursor is not valid: pass back a `next_cursor` unchanged."


def encode_cursor(*values: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(list(values))).decode().rstrip("=")


def decode_cursor(cursor: str, *types: Any) -> tuple[Any, ...]:
    """Decode a cursor made by encode_cursor with values of the given types. Raises BadRequest."""
    bounded = tuple(_BOUNDED.get(t, t) for t in types)
    shape = tuple[*bounded]  # type: ignore[valid-type]  # a type made at run time: mypy can't see it
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        values = msgspec.json.decode(raw, type=shape)
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise BadRequest(INVALID) from None
    return tuple(_storable(v) for v in values)


def _storable(value: Any) -> Any:
    if isinstance(value, str) and UNSTORABLE.search(value):
        raise BadRequest(INVALID)
    if isinstance(value, datetime):
        # In UTC now: an offset at the edge of year 1 or 9999 would overflow in asyncpg.
        try:
            return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        except OverflowError:
            raise BadRequest(INVALID) from None
    return value


def parse_sequence(value: str | int) -> int:
    """An event sequence from `after`, a cursor or Last-Event-ID: ASCII digits, within int8.
    Raises BadRequest."""
    text = str(value)
    if not _SEQUENCE.fullmatch(text) or int(text) > INT8_MAX:
        raise BadRequest("Not a sequence: pass a `next_cursor` or an event's `sequence` unchanged.")
    return int(text)


def page_of(
    rows: Sequence[T], limit: int, cursor_of: Callable[[T], tuple[object, ...]]
) -> tuple[list[T], str | None]:
    """A page from `limit + 1` fetched rows: the first `limit`, and the cursor of the last one
    (encode_cursor(*cursor_of(row))) when there was one more row after it, else None."""
    page = list(rows[:limit])
    return page, encode_cursor(*cursor_of(page[-1])) if len(rows) > limit else None
