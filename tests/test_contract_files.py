"""The checked-in contract and migrations match the code."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from service.db.migrate import MIGRATION_NAME, load_migrations
from service.openapi import DEFAULT_PATH, render


def test_openapi_file_is_current():
    assert DEFAULT_PATH.read_bytes() == render(), "run `make openapi` and commit the result"


async def test_served_schema_is_the_file():
    import httpx

    from service.app import create_app

    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        served = await http.get("/schema/openapi.json")
    assert served.status_code == 200
    assert served.json() == json.loads(DEFAULT_PATH.read_bytes())


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
            assert op.get("operationId") and op.get("summary") and op.get("description")
            assert "security" in op, op["operationId"]  # [] on the public routes


def test_openapi_describes_stream_webhooks_headers_and_strict_bodies():
    document = json.loads(render())
    declared = {tag["name"] for tag in document["tags"]}
    used = {t for ops in document["paths"].values() for op in ops.values() for t in op["tags"]}
    assert used <= declared and all(tag.get("description") for tag in document["tags"])
    assert set(document["webhooks"]) == {"turn.completed", "turn.failed", "turn.cancelled"}
    hook = document["webhooks"]["turn.completed"]["post"]
    assert {p["name"] for p in hook["parameters"]} == {
        "webhook-id", "webhook-timestamp", "webhook-signature"}
    events = document["paths"]["/v1/conversations/{conversation_id}/events"]["get"]
    assert set(events["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    turns = document["paths"]["/v1/conversations/{conversation_id}/turns"]["post"]
    assert "Location" in turns["responses"]["202"]["headers"]
    assert "Retry-After" in turns["responses"]["429"]["headers"]
    for op in (events, turns):
        for response in op["responses"].values():
            assert {"X-Request-ID", "RateLimit", "RateLimit-Policy"} <= set(response["headers"])
    schemas = document["components"]["schemas"]
    for name in ("ConversationCreate", "ConversationUpdate", "TurnCreate", "TextOutputSchema",
                 "JsonOutputSchema", "AutoOutputSchema"):
        assert schemas[name]["additionalProperties"] is False, name
    metadata = schemas["Metadata"]
    assert metadata["maxProperties"] == 16
    assert metadata["propertyNames"]["minLength"] == 1
    assert metadata["propertyNames"]["maxLength"] == 16
    assert metadata["additionalProperties"]["maxLength"] == 512
    assert schemas["Turn"]["properties"]["created_at"]["format"] == "date-time"
    after = next(p for p in events["parameters"] if p["name"] == "after")
    assert after["schema"]["minimum"] == 0 and after["schema"]["maximum"] == 2**63 - 1


def test_webhook_url_examples_pass_the_servers_checks():
    """Syntax here; resolving to public addresses only is checked where DNS answers (example.com
    is IANA's, and resolves to public addresses)."""
    import asyncio
    import socket

    from service.domain.webhook_urls import check_webhook_url, split_url

    document = render().decode()
    urls = set(re.findall(r'"webhook_url": "([^"]+)"', document))
    assert urls
    for url in urls:
        split_url(url)
    try:
        socket.getaddrinfo("example.com", 443)
    except OSError:
        pytest.skip("no DNS here: the public-address check of the examples needs it")
    for url in urls:
        assert asyncio.run(check_webhook_url(url, allow_private=False))


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


def test_webhook_examples_match_their_schemas():
    document = json.loads(render())
    for name, item in document["webhooks"].items():
        _check(document, item["post"]["requestBody"]["content"]["application/json"], name)


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


async def test_request_examples_are_accepted_by_the_server(api):
    """Every request-body example of the document, sent as is (ids of the examples' own
    conversation and turns swapped for real ones), gets a success answer."""
    document = json.loads(render())
    conversation = (await api.post("/v1/conversations", json={})).json()
    first = (await api.post(f"/v1/conversations/{conversation['id']}/turns",
                            json={"input": "Which country won the most medals?"})).json()
    sent = 0
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            content = op.get("requestBody", {}).get("content", {}).get("application/json")
            if content is None or not op["security"]:
                continue
            url = path.format(conversation_id=conversation["id"], turn_id=first["id"])
            for example in _examples(content):
                body = json.loads(json.dumps(example).replace(
                    '"turn_9a31a0607ae061b9a28d34e2"', json.dumps(first["id"])))
                target = url
                if isinstance(body, dict) and body.get("if_busy") == "reject":
                    # Refused (409) while a turn is open, as the examples before it leave this
                    # conversation: it asks an idle one.
                    idle = (await api.post("/v1/conversations", json={})).json()
                    target = path.format(conversation_id=idle["id"], turn_id=first["id"])
                answer = await api.request(method.upper(), target, json=body)
                assert answer.status_code < 300, (op["operationId"], body, answer.text)
                sent += 1
    assert sent >= 7
