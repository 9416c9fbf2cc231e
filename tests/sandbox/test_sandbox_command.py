"""`research-service sandbox`: the sandbox alone, as a client's CI starts it (docs/sandbox.md).

The process is driven by the real SDK over HTTP: SANDBOX_* settings are read, `{}` output
schemas answer text, the markers fail and slow runs, webhooks are signed with
SANDBOX_WEBHOOK_SECRET, and a busy port is one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import parallel
import pytest
from parallel import Parallel
from parallel.types import TaskSpecParam, TextSchemaParam

from service.devstack import free_port
from service.domain.push import InvalidSignature, verify_parallel_webhook
from tests.receivers import ThreadedReceiver

SECRET = "ci-secret-123"


def start(port: int, log: Path, **env: str) -> subprocess.Popen[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_")}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "sandbox", "--port", str(port)],
            env={**clean, **env}, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def standalone(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port, log = free_port(), tmp_path / "sandbox.log"
    process = start(port, log, SANDBOX_LATENCY_S="0.2", SANDBOX_WEBHOOK_SECRET=SECRET,
                    SANDBOX_API_KEY="ci-key")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/_sandbox/health", timeout=1).status_code == 200:
                    break
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield url, log
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_the_standalone_sandbox_serves_parallels_api_with_its_settings(standalone) -> None:
    url, log = standalone
    banner = log.read_text().splitlines()[0]
    assert banner == (
        f"[sandbox] Parallel's Task API at {url} (x-api-key SANDBOX_API_KEY; runs take 0.2 s); "
        f"control API at {url}/_sandbox/; webhooks signed with the secret '{SECRET}' "
        "(SANDBOX_WEBHOOK_SECRET); docs/sandbox.md")
    wrong = Parallel(api_key="not-the-key", base_url=url, max_retries=0)
    with pytest.raises(parallel.AuthenticationError):
        wrong.task_run.create(input="q", processor="lite")

    client = Parallel(api_key="ci-key", base_url=url, max_retries=0)
    text = client.task_run.create(input="Who won?", processor="lite",
                                  task_spec=TaskSpecParam(output_schema=TextSchemaParam()))
    output = client.task_run.result(text.run_id, api_timeout=10).output
    assert output.type == "text" and output.content == 'Answer to "Who won?" (processor lite).'

    failing = client.task_run.create(input="Who lost? [sandbox:fail]", processor="lite")
    with pytest.raises(parallel.NotFoundError):
        client.task_run.result(failing.run_id, api_timeout=10)
    assert client.task_run.retrieve(failing.run_id).status == "failed"

    started = time.monotonic()
    slow = client.task_run.create(input="Who else? [sandbox:slow=1.5]", processor="lite")
    client.task_run.result(slow.run_id, api_timeout=10)
    assert time.monotonic() - started >= 1.4
    config = httpx.get(f"{url}/_sandbox/config").json()
    assert config["default_latency_s"] == 0.2 and "webhook_secret" not in config
    assert config["webhook_secret_sha256"] == hashlib.sha256(SECRET.encode()).hexdigest()


def test_the_standalone_sandbox_signs_webhooks_with_its_secret(standalone) -> None:
    url, _ = standalone
    receiver = ThreadedReceiver()
    receiver.thread.start()
    try:
        client = Parallel(api_key="ci-key", base_url=url, max_retries=0)
        run = client.task_run.create(
            input="q", processor="lite", webhook={"url": receiver.url},
            extra_headers={"parallel-beta": "webhook-2025-08-12"})
        assert receiver.wait_for(1, timeout=15)
        headers, body = receiver.received[0]
        verify_parallel_webhook(SECRET, headers, body)  # as this service's hook checks it
        with pytest.raises(InvalidSignature):
            verify_parallel_webhook("sandbox_webhook_secret", headers, body)
        assert receiver.payloads()[0]["data"]["run_id"] == run.run_id
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


def test_a_busy_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        process = start(port, tmp_path / "busy.log")
        assert process.wait(timeout=30) == 1
    assert (tmp_path / "busy.log").read_text().strip().splitlines() == [
        f"[sandbox] error: port {port} on 127.0.0.1 is already in use: stop what holds it or "
        "choose another with --port"]
