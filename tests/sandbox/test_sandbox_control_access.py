"""The control API (/_sandbox/*) shows no secrets, needs SANDBOX_CONTROL_TOKEN when one is set,
answers loopback callers only without one, and the sandbox will not listen beyond loopback
without a token."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from parallel import AsyncParallel

from sandbox.app import create_app
from sandbox.config import ExposedWithoutToken, SandboxConfig
from sandbox.server import SandboxServer

SECRETS = {"api_key": "sk-sandbox-9f3a", "webhook_secret": "whsec-sandbox-71c2",
           "control_token": "ctl-sandbox-5e8d"}


def config(**overrides: object) -> SandboxConfig:
    return SandboxConfig(default_latency_s=0.1, queued_s=0.01, **{**SECRETS, **overrides})


async def test_config_never_shows_a_secret():
    with SandboxServer(config()) as server:
        auth = {"authorization": f"Bearer {SECRETS['control_token']}"}
        async with httpx.AsyncClient(base_url=server.url, headers=auth) as control:
            shown = await control.get("/_sandbox/config")
            patched = await control.patch("/_sandbox/config",
                                          json={"default_latency_s": 0.2, "api_key": "sk-new-1"})
            refused = await control.patch("/_sandbox/config", json={"control_token": "mine"})
    assert shown.status_code == patched.status_code == 200
    for answer in (shown, patched):
        assert not {"api_key", "webhook_secret", "control_token"} & set(answer.json())
        for secret in [*SECRETS.values(), "sk-new-1"]:
            assert secret not in answer.text
        assert answer.json()["api_key_required"] is True
        assert answer.json()["control_token_required"] is True
    assert patched.json()["default_latency_s"] == 0.2
    assert server.config.api_key == "sk-new-1", "secrets can still be set, just not read"
    assert refused.status_code == 422 and server.config.control_token == SECRETS["control_token"]


async def test_with_a_token_every_control_route_needs_it():
    with SandboxServer(config()) as server:
        client = AsyncParallel(api_key=SECRETS["api_key"], base_url=server.url, max_retries=0)
        run = await client.task_run.create(input="What is secret?", processor="lite")
        async with httpx.AsyncClient(base_url=server.url) as http:
            for path in ("/_sandbox/runs", f"/_sandbox/runs/{run.run_id}", "/_sandbox/config",
                         "/_sandbox/calls", "/_sandbox/webhooks", "/_sandbox/stats",
                         "/_sandbox/faults"):
                for headers in ({}, {"authorization": "Bearer wrong"},
                                {"authorization": SECRETS["control_token"]}):
                    refused = await http.get(path, headers=headers)
                    assert refused.status_code == 401, (path, headers)
                    assert "What is secret?" not in refused.text
                    assert refused.headers["www-authenticate"] == "Bearer"
            assert (await http.post("/_sandbox/reset")).status_code == 401
            expire = f"/_sandbox/interactions/{run.interaction_id}/expire"
            assert (await http.post(expire)).status_code == 401
            assert not server.store.expired
            assert (await http.post("/_sandbox/faults", json={"error_rate": 1})).status_code == 401
            assert server.store.faults.config.error_rate == 0
            assert (await http.get("/_sandbox/health")).status_code == 200
            allowed = await http.get(
                "/_sandbox/runs", headers={"authorization": f"Bearer {SECRETS['control_token']}"}
            )
        assert allowed.status_code == 200
        # The refused reset reset nothing.
        assert [r["input"] for r in allowed.json()["data"]] == ["What is secret?"]
        # Parallel's own routes are keyed by x-api-key as before, not by the control token.
        assert (await client.task_run.retrieve(run.run_id)).run_id == run.run_id


async def test_without_a_token_only_loopback_callers_get_in():
    app = create_app(SandboxConfig())
    for client, expected in ((("10.1.2.3", 40000), 403), (("192.168.0.9", 40000), 403),
                             (("127.0.0.1", 40000), 200), (("::1", 40000), 200)):
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://sandbox") as http:
            assert (await http.get("/_sandbox/runs")).status_code == expected, client
            assert (await http.get("/_sandbox/health")).status_code == 200


def test_the_sandbox_refuses_to_listen_beyond_loopback_without_a_token():
    with pytest.raises(ExposedWithoutToken, match="SANDBOX_CONTROL_TOKEN"):
        SandboxServer(SandboxConfig(), host="0.0.0.0")
    for host in ("127.0.0.1", "::1", "localhost"):
        SandboxConfig().check_exposure(host)
    with SandboxServer(config(), host="0.0.0.0") as server:
        url = f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{url}/_sandbox/runs").status_code == 401
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    cli = subprocess.run(
        [sys.executable, "-m", "service.cli", "sandbox", "--host", "0.0.0.0", "--port", "0"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert cli.returncode != 0
    assert "SANDBOX_CONTROL_TOKEN" in cli.stderr and "Traceback" not in cli.stderr


def test_the_control_token_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("SANDBOX_CONTROL_TOKEN", "from-env")
    assert SandboxConfig.from_env().control_token == "from-env"
