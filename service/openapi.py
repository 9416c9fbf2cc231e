"""Write the app's OpenAPI document: `python -m service.openapi [PATH]` (`make openapi`)."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec

from service.app import create_app
from service.http.openapi_extras import finish

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


def render() -> bytes:
    """The OpenAPI document the app serves at /schema/openapi.json, as stable, indented JSON."""
    schema = finish(create_app().openapi_schema.to_schema())
    return msgspec.json.format(msgspec.json.encode(schema, order="sorted"), indent=2) + b"\n"


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PATH
    path.write_bytes(render())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
