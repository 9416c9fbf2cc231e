"""Real processes for crash tests: the worker as a subprocess that a test can SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from service.config import Settings
from service.devstack.processes import settings_env

__all__ = ["ApiProcess", "WorkerProcess", "settings_env"]


class WorkerProcess:
    """`research-service worker` in a child process, with its output kept in a file."""

    def __init__(self, settings: Settings, **extra_env: str) -> None:
        self._env = settings_env(settings, **extra_env)
        self._log = Path(tempfile.mkstemp(prefix="worker-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self._log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "worker"],
                env=self._env, stdout=out, stderr=subprocess.STDOUT,
            )
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, like a node that vanished."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        return self._log.read_text(errors="replace")

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


class ApiProcess:
    """`research-service api` in a child process on a free port."""

    def __init__(self, settings: Settings, port: int) -> None:
        self._env = settings_env(settings)
        self.url = f"http://127.0.0.1:{port}"
        self._port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> ApiProcess:
        import time

        import httpx

        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "api", "--port", str(self._port)],
            env=self._env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the API did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


CHAT_QUESTIONS = [
    "Which country won the most Winter Olympics gold medals in 2026?",
    "How many medals did they win?",
    "How does that compare to the second place country?",
]


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM dev's process group (its worker outlives a lone SIGTERMed dev), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + 15
        while _group_alive(process) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _group_alive(process):
            break
    process.wait(timeout=5)


def _group_alive(process: subprocess.Popen[bytes]) -> bool:
    process.poll()  # reaps dev itself once it exits
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
