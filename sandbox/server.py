"""Run the sandbox over real HTTP: in a background thread (tests) or blocking (CLI)."""

from __future__ import annotations

import errno
import socket
import threading
import time
from types import TracebackType

import uvicorn

from sandbox.app import SandboxApp, create_app
from sandbox.config import SandboxConfig
from sandbox.store import Store


class PortBusy(Exception):
    """The port is taken (said in one line by `research-service sandbox` and `dev`)."""


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: a free one); PortBusy when something listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP
    # (a proto of 0 costs ~40 ms per request through Nagle and delayed ACKs).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortBusy(f"port {port} on {host} is already in use: stop what holds it or "
                           "choose another with --port") from None
        raise
    return sock


def _uvicorn_config(app: SandboxApp, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, lifespan="on", log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=2, backlog=4096)


class SandboxServer:
    """uvicorn in a daemon thread on a free port; `.url` is known as soon as it is constructed.

    with SandboxServer(SandboxConfig(default_latency_s=0.2)) as sandbox:
        client = AsyncParallel(api_key="k", base_url=sandbox.url)
    """

    def __init__(
        self, config: SandboxConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config or SandboxConfig()
        self.config.check_exposure(host)
        self.app: SandboxApp = create_app(self.config)
        self.host = host
        self._sock = bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"
        self._server = uvicorn.Server(_uvicorn_config(self.app, "warning"))
        self._thread: threading.Thread | None = None

    @property
    def store(self) -> Store:
        """The running app's store, for in-process inspection."""
        store: Store = self.app.state.store
        return store

    def start(self, timeout: float = 10.0) -> SandboxServer:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name=f"sandbox-{self.port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("sandbox server failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError("sandbox server did not start in time")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            self._sock.close()
            return
        loop = self.store.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.store.close)
        self._server.should_exit = True
        self._thread.join(timeout)
        self._thread = None
        self._sock.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def banner(config: SandboxConfig, url: str) -> str:
    """What a client of the sandbox needs to know, said once on start-up."""
    key = "any non-empty x-api-key" if config.api_key is None else "x-api-key SANDBOX_API_KEY"
    return (f"[sandbox] Parallel's Task API at {url} ({key}; runs take "
            f"{config.default_latency_s:g} s); control API at {url}/_sandbox/; webhooks signed "
            f"with the secret {config.webhook_secret!r} (SANDBOX_WEBHOOK_SECRET); docs/sandbox.md")


def serve(host: str = "127.0.0.1", port: int = 8700, config: SandboxConfig | None = None) -> None:
    """Serve the sandbox until interrupted (for `research-service sandbox --port N`): the same app
    and SANDBOX_* settings as inside `research-service dev`. PortBusy if the port is taken;
    ExposedWithoutToken for a non-loopback host without SANDBOX_CONTROL_TOKEN."""
    config = config or SandboxConfig.from_env()
    config.check_exposure(host)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(banner(config, f"http://{shown}:{sock.getsockname()[1]}"), flush=True)
    try:
        uvicorn.Server(_uvicorn_config(create_app(config), "info")).run(sockets=[sock])
    finally:
        sock.close()
