"""The checked-in contract and migrations match the code."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
from openapi_spec_validator import validate

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
        ("get", "/v1/conversations/{conversation_id}/webhook-deliveries"),
        ("post", "/v1/webhook-deliveries/{delivery_id}/redeliver"),
        ("post", "/v1/hooks/parallel"),
        ("get", "/v1/usage"), ("get", "/healthz"), ("get", "/readyz"),
    }
    present = {(method, path) for path, ops in paths.items() for method in ops}
    assert expected <= present
    for ops in paths.values():
        for op in ops.values():
            assert op.get("operationId") and op.get("summary")


def test_openapi_file_is_valid_openapi_3_1():
    document = json.loads(DEFAULT_PATH.read_bytes())
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises OpenAPIValidationError with the offending path


def _examples(media: dict[str, Any]) -> list[Any]:
    """A media type's examples: its own (`examples`, `example`) or its schema's."""
    found = [e["value"] for e in media.get("examples", {}).values() if "value" in e]
    if "example" in media:
        found.append(media["example"])
    return found + list(media.get("schema", {}).get("examples", []))


def _check(document: dict[str, Any], media: dict[str, Any], where: str) -> None:
    examples = _examples(media)
    assert examples, f"{where}: no example"
    schema = {**media["schema"], "components": document["components"]}
    for value in examples:
        jsonschema.Draft202012Validator(schema).validate(value)


def test_every_operation_has_examples_and_documents_its_errors():
    """Each operation: request and response examples that match their schemas, and at least one
    4xx answer, documented as problem+json."""
    document = json.loads(render())
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            where = f"{method.upper()} {path}"
            for media_type, media in op.get("requestBody", {}).get("content", {}).items():
                _check(document, media, f"{where} request {media_type}")
            responses = op["responses"]
            client_errors = [status for status in responses if status.startswith("4")]
            assert client_errors, f"{where}: no 4xx answer documented"
            for status, response in responses.items():
                assert response.get("description"), f"{where} {status}: no description"
                for media_type, media in (response.get("content") or {}).items():
                    _check(document, media, f"{where} {status} {media_type}")
                    if status[0] in "45":
                        assert media_type == "application/problem+json", f"{where} {status}"


def test_migration_files_are_numbered_without_gaps():
    versions = [version for version, _, _ in load_migrations()]
    assert versions == list(range(1, len(versions) + 1))
    assert all(MIGRATION_NAME.match(name) for _, name, _ in load_migrations())


# --- the repo carries its own design (docs/design.md, docs/parallel.md) -----------------------

ROOT = Path(__file__).resolve().parent.parent
# Documents outside the repository that no file may point at; spelled so this file matches none.
OUTSIDE = re.compile(rb"DESIGN\.md|parallel-api\.md|\.\./shared")
# History notes under docs/ that may name where a text came from (none today).
HISTORY_NOTES: frozenset[str] = frozenset()
CITATION = re.compile(r"docs/(design|parallel)\.md §(\d+(?:\.\d+)?)")
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", re.MULTILINE)


def tracked_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode().split("\0")
    return [ROOT / name for name in names if name and (ROOT / name).is_file()]


def test_no_file_points_outside_the_repo():
    offenders = [
        f"{path.relative_to(ROOT)}: {match.group().decode()}"
        for path in tracked_files()
        if str(path.relative_to(ROOT)) not in HISTORY_NOTES
        for match in OUTSIDE.finditer(path.read_bytes())
    ]
    assert not offenders, "cite docs/design.md or docs/parallel.md:\n" + "\n".join(offenders)


def test_every_cited_section_exists():
    sections = {
        doc: set(HEADING.findall((ROOT / "docs" / f"{doc}.md").read_text()))
        for doc in ("design", "parallel")
    }
    missing = [
        f"{path.relative_to(ROOT)}: docs/{doc}.md §{number}"
        for path in tracked_files()
        if path.suffix in {".py", ".md", ".json", ".toml", ".yaml", ""}
        for doc, number in CITATION.findall(path.read_text(errors="replace"))
        if number not in sections[doc]
    ]
    assert not missing, "no such section:\n" + "\n".join(missing)
