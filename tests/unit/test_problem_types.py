"""README's table of problem types lists every `type` the service answers with."""

from __future__ import annotations

import re
from pathlib import Path

import service.domain.push  # noqa: F401  (defines InvalidSignature)
from service.errors import ServiceError, UpstreamError

ROOT = Path(__file__).resolve().parents[2]
# Answered by the HTTP layer itself, not by a ServiceError (service.http.problems).
HTTP_TYPES = {(405, "method-not-allowed"), (413, "request-entity-too-large")}


def error_types() -> set[tuple[int, str]]:
    """(status, type) of every ServiceError that reaches a client (not the upstream ones, which
    fail turns, nor the bare 500, which no request is meant to get)."""
    found, todo = set(), [ServiceError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls is not ServiceError and not issubclass(cls, UpstreamError):
            found.add((cls.status, cls.type_))
    return found


def readme_types() -> set[tuple[int, str]]:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("Problem types:"):].split("\n\n")[1]
    return {(int(status), name) for status, name in
            re.findall(r"^\| (\d{3}) \| `([a-z-]+)` \|", table, re.M)}


def test_every_problem_type_is_in_the_readme_table() -> None:
    assert readme_types() == error_types() | HTTP_TYPES
