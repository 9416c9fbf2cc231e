"""The processes a benchmark runs: the API, the worker, the floor app and the sandbox.

Each runs as its own process (so its CPU and memory are its own), with its output in a log file.
`python -m bench.procs sandbox --port N --latency S` serves the sandbox without access logs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import psutil

from service.config import Settings
from service.devstack.processes import settings_env


class Proc:
    """A child process with a sampler for its peak RSS and a reading of its CPU seconds."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        self.popen: subprocess.Popen[bytes] | None = None
        self.peak_rss = 0
        self._cpu_at_mark = 0.0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> Proc:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _tree(self) -> list[psutil.Process]:
        assert self.popen is not None
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            try:
                rss = sum(p.memory_info().rss for p in self._tree())
            except psutil.NoSuchProcess:
                continue
            self.peak_rss = max(self.peak_rss, rss)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the process (and any children) so far."""
        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
        return total

    def mark(self) -> None:
        """Start counting CPU and peak RSS from now (after start-up)."""
        self._cpu_at_mark = self.cpu_seconds()
        self.peak_rss = 0

    def cpu_since_mark(self) -> float:
        return self.cpu_seconds() - self._cpu_at_mark

    def wait_http(self, url: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.output()[-3000:]}")
            try:
                if httpx.get(url, timeout=1.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not answer {url}:\n{self.output()[-3000:]}")

    def rss(self) -> int:
        """Resident memory of the process (and any children) now, in bytes."""
        return sum(p.memory_info().rss for p in self._tree())

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> None:
        self._stop.set()
        if self.popen is None or self.popen.poll() is not None:
            return
        # Under py-spy the worker is the child: stop it, and py-spy writes its profile and exits.
        for p in self._tree()[1:] if self.argv[0] == "py-spy" else self._tree()[:1]:
            p.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def __enter__(self) -> Proc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def wait_worker(worker: Proc, timeout_s: float = 120.0) -> None:
    """Until the arq worker says it has started."""
    deadline = time.monotonic() + timeout_s
    while "Starting worker" not in worker.output():
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker did not start:\n{worker.output()[-3000:]}")
        await asyncio.sleep(0.1)


async def push_available(api_url: str) -> bool:
    """Whether the API has Parallel's inbound webhook route (push mode)."""
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{api_url}/v1/hooks/parallel", content=b"{}")
    return r.status_code not in (404, 405)


def _profiled(name: str, argv: list[str]) -> list[str]:
    """Profiling aid: with BENCH_PYSPY_<NAME>=file (and py-spy installed), record the process's
    collapsed stacks there, for flame graphs, at BENCH_PYSPY_RATE samples a second (100)."""
    if out := os.environ.get(f"BENCH_PYSPY_{name.upper()}"):
        rate = os.environ.get("BENCH_PYSPY_RATE", "100")
        return ["py-spy", "record", "-o", out, "--format", "raw", "--rate", rate, "--", *argv]
    return argv


def _extra_args(name: str) -> list[str]:
    """BENCH_API_ARGS / BENCH_WORKER_ARGS: more arguments for that command, e.g. `--loop
    asyncio --http h11` to compare with the defaults."""
    return os.environ.get(f"BENCH_{name.upper()}_ARGS", "").split()


def api_proc(settings: Settings, port: int, *, cli: Sequence[str] = (), **env: str) -> Proc:
    argv = [sys.executable, "-m", "service.cli", "api", "--port", str(port), *cli,
            *_extra_args("api")]
    return Proc("api", _profiled("api", argv), settings_env(settings, **env))


def floor_proc(settings: Settings, port: int, tenant_id: str) -> Proc:
    return Proc(
        "floor",
        _profiled("floor", [sys.executable, "-m", "bench.floor", "--port", str(port)]),
        settings_env(settings, BENCH_TENANT_ID=tenant_id),
    )


def worker_proc(settings: Settings, *, cli: Sequence[str] = (), **env: str) -> Proc:
    argv = [sys.executable, "-m", "service.cli", "worker", *cli, *_extra_args("worker")]
    return Proc("worker", _profiled("worker", argv), settings_env(settings, **env))


def sandbox_proc(port: int, latency_s: float, webhook_secret: str = "bench_webhook_secret") -> Proc:
    argv = [
        sys.executable,
        "-m",
        "bench.procs",
        "sandbox",
        "--port",
        str(port),
        "--latency",
        str(latency_s),
        "--webhook-secret",
        webhook_secret,
    ]
    return Proc("sandbox", argv)


def _serve_sandbox(args: argparse.Namespace) -> None:
    import uvicorn

    from sandbox.app import create_app
    from sandbox.config import SandboxConfig

    config = SandboxConfig(
        default_latency_s=args.latency,
        queued_s=min(0.05, args.latency),
        webhook_secret=args.webhook_secret,
        webhook_concurrency=64,
        max_log_entries=1_000_000,
    )
    uvicorn.run(
        create_app(config),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_graceful_shutdown=2,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.procs")
    sub = parser.add_subparsers(dest="what", required=True)
    sandbox = sub.add_parser("sandbox")
    sandbox.add_argument("--port", type=int, required=True)
    sandbox.add_argument("--latency", type=float, default=0.0)
    sandbox.add_argument("--webhook-secret", default="bench_webhook_secret")
    args = parser.parse_args()
    _serve_sandbox(args)


if __name__ == "__main__":
    main()


@contextlib.contextmanager
def service_stack(
    settings: Settings, mode: str, api_port: int, sandbox_port: int, webhook_secret: str,
    **env: str,
) -> Iterator[tuple[Proc, Proc, Proc]]:
    """The sandbox, the API and one worker, each its own process, stopped on exit; in push mode
    Parallel's webhooks (the sandbox's) point at the API; in group mode runs are added to task
    groups and followed over their event streams (push and poll create runs one by one)."""
    env |= {"PARALLEL_TASK_GROUPS": "on" if mode == "group" else "off"}
    if mode == "push":
        env |= {
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{api_port}",
            "PARALLEL_WEBHOOK_SECRET": webhook_secret,
        }
    sandbox = sandbox_proc(sandbox_port, 0.0, webhook_secret).start()
    api = api_proc(settings, api_port, **env).start()
    worker = worker_proc(settings, **env).start()
    try:
        sandbox.wait_http(f"http://127.0.0.1:{sandbox_port}/_sandbox/health")
        api.wait_http(f"http://127.0.0.1:{api_port}/healthz")
        yield sandbox, api, worker
    finally:
        for proc in (worker, api, sandbox):
            proc.stop()
