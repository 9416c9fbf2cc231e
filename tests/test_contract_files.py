"""The checked-in contract and migrations match the code."""

from __future__ import annotations

import json

from service.db.migrate import MIGRATION_NAME, load_migrations
from service.openapi import DEFAULT_PATH, render


def test_openapi_file_is_current():
    assert DEFAULT_PATH.read_bytes() == render(), "run `make openapi` and commit the result"


def test_openapi_has_every_contract_route():
    paths = json.loads(render())["paths"]
    expected = {
        ("post", "/v1/conversations"), ("get", "/v1/conversations"),
        ("get", "/v1/conversations/{conversation_id}"),
        ("patch", "/v1/conversations/{conversation_id}"),
        ("delete", "/v1/conversations/{conversation_id}"),
        ("post", "/v1/conversations/{conversation_id}/webhook-secret/rotate"),
        ("post", "/v1/conversations/{conversation_id}/turns"),
        ("get", "/v1/conversations/{conversation_id}/turns"),
        ("get", "/v1/conversations/{conversation_id}/turns/{turn_id}"),
        ("post", "/v1/conversations/{conversation_id}/turns/{turn_id}/cancel"),
        ("get", "/v1/conversations/{conversation_id}/events"),
        ("get", "/healthz"), ("get", "/readyz"),
    }
    present = {(method, path) for path, ops in paths.items() for method in ops}
    assert expected <= present
    for ops in paths.values():
        for op in ops.values():
            assert op.get("operationId") and op.get("summary")


def test_migration_files_are_numbered_without_gaps():
    versions = [version for version, _, _ in load_migrations()]
    assert versions == list(range(1, len(versions) + 1))
    assert all(MIGRATION_NAME.match(name) for _, name, _ in load_migrations())
