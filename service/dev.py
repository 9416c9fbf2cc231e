"""`research-service dev`: the whole service on one machine, for `make run`.

Embedded PostgreSQL and Redis when DATABASE_URL / REDIS_URL are unset, the sandbox when
PARALLEL_API_KEY is unset (in push mode: its webhooks come to this API, signed with its secret);
then migrations, a dev API key, the worker (a child process, restarted when it dies) and the API.
Where everything runs goes to `.data/dev-stack.json` (service.devstack.state) for `make chat`,
`make keys` and the README's curl session in another terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec

from sandbox.server import PortBusy, bind
from service.config import Settings
from service.db import keys
from service.db.migrate import migrate
from service.devstack.state import data_dir, read_state, remove_state, write_state
from service.devstack.supervise import Supervisor
from service.logs import configure_logging

DEFAULT_METRICS_PORT = next(
    int(f.default) for f in msgspec.structs.fields(Settings) if f.name == "worker_metrics_port")


class DevError(Exception):
    """Why `dev` cannot start, in one line (a busy port, another dev stack on the same data)."""


def _say(message: str) -> None:
    print(f"[dev] {message}", flush=True)


def _bind(host: str, port: int, what: str, knob: str, keep: bool = True) -> socket.socket | None:
    """Listen-ready socket on host:port (SO_REUSEADDR, as uvicorn), or DevError in one line."""
    try:
        sock = bind(host, port)
    except PortBusy:
        where = "" if host == "0.0.0.0" else f" on {host}"
        raise DevError(f"port {port} ({what}) is already in use{where}: stop what holds it "
                       f"(another `make run`?) or choose another: make run {knob}=…") from None
    except OSError as exc:
        raise DevError(f"cannot listen on {host}:{port} ({what}): {exc.strerror}") from None
    if keep:
        return sock
    sock.close()
    return None


async def _dev_key(database_url: str, key_file: Path) -> str:
    """The dev tenant's key: reused from key_file while it still works, else a new one."""
    import asyncpg

    saved = await asyncio.to_thread(_read_key, key_file)
    conn = await asyncpg.connect(database_url)
    try:
        if saved and await keys.authenticate_key(conn, saved):
            return saved
        _, key = await keys.create_key(conn, "dev")
    finally:
        await conn.close()
    await asyncio.to_thread(_write_key, key_file, key)
    return key


def _read_key(key_file: Path) -> str | None:
    return key_file.read_text().strip() if key_file.exists() else None


def _write_key(key_file: Path, key: str) -> None:
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)


def _databases(env: dict[str, str], folder: Path, stack: contextlib.ExitStack) -> None:
    if not env.get("DATABASE_URL"):
        from service.devstack import EmbeddedPostgres

        pg = EmbeddedPostgres(folder / "postgres")
        env["DATABASE_URL"] = pg.start()
        stack.callback(pg.stop)
        _say(f"DATABASE_URL unset: embedded PostgreSQL at {env['DATABASE_URL']}")
    if not env.get("REDIS_URL"):
        from service.devstack import EmbeddedRedis

        redis = EmbeddedRedis(folder / "redis")
        env["REDIS_URL"] = redis.start()
        stack.callback(redis.stop)
        _say(f"REDIS_URL unset: embedded Redis at {env['REDIS_URL']}")


def _sandbox(env: dict[str, str], port: int, host: str) -> Any:
    """The sandbox (bound, not started) when PARALLEL_API_KEY is unset, configured by SANDBOX_*
    exactly as `research-service sandbox` is; else None."""
    if env.get("PARALLEL_API_KEY"):
        return None
    from sandbox.config import SandboxConfig
    from sandbox.server import PortBusy, SandboxServer

    try:
        return SandboxServer(SandboxConfig.from_env(), host=host, port=port)
    except PortBusy:
        raise DevError(f"port {port} (the sandbox) is already in use on {host}: stop what holds "
                       "it (another `make run`?) or choose another: make run SANDBOX_PORT=…"
                       ) from None


def _use_sandbox(env: dict[str, str], sandbox: Any, api_url: str) -> None:
    """Point the service at the sandbox, in push mode: this dev knows both ends of the hook."""
    env["PARALLEL_API_KEY"] = "sandbox-key"
    env["PARALLEL_BASE_URL"] = sandbox.url
    if not env.get("PUBLIC_BASE_URL"):
        env["PUBLIC_BASE_URL"] = api_url
    if not env.get("PARALLEL_WEBHOOK_SECRET"):
        env["PARALLEL_WEBHOOK_SECRET"] = sandbox.config.webhook_secret
    from sandbox.server import banner

    _say("PARALLEL_API_KEY unset: using the local sandbox (answers are canned; no real research, "
         "no cost)")
    print(banner(sandbox.config, sandbox.url), flush=True)


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _sandbox_secret_sha256(base_url: str | None) -> str | None:
    """The SHA-256 of a sandbox's webhook secret from its control API (which never shows the
    secret itself), if PARALLEL_BASE_URL is a sandbox."""
    if not base_url:
        return None
    try:
        answer = httpx.get(f"{base_url.rstrip('/')}/_sandbox/config", timeout=2, trust_env=False)
        secret = answer.json().get("webhook_secret_sha256") if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return secret if isinstance(secret, str) else None


def check_webhook_secret(env: dict[str, str], sandbox: Any) -> None:
    """Say at start-up what push mode will do, and warn when its secret cannot work."""
    public = env.get("PUBLIC_BASE_URL")
    if not public:
        return
    secret = env.get("PARALLEL_WEBHOOK_SECRET")
    expected = _sha256(sandbox.config.webhook_secret) if sandbox is not None else (
        _sandbox_secret_sha256(env.get("PARALLEL_BASE_URL")))
    consequence = ("every Parallel webhook will be refused with 401 and turns will end only at "
                   "the safety-net polls (PUSH_POLL_INITIAL_S)")
    if not secret:
        _say(f"WARNING: PUBLIC_BASE_URL is set (push mode) but PARALLEL_WEBHOOK_SECRET is not: "
             f"{consequence}")
    elif expected is not None and _sha256(secret) != expected:
        _say(f"WARNING: PARALLEL_WEBHOOK_SECRET is not the sandbox's webhook secret "
             f"(SANDBOX_WEBHOOK_SECRET, docs/sandbox.md): {consequence}")
    else:
        _say(f"push mode: Parallel's webhooks come to {public.rstrip('/')}/v1/hooks/parallel")


def _probe_ports(host: str, port: int, env: dict[str, str]) -> socket.socket:
    """Every port `dev` will listen on, checked before anything starts; the API's is kept."""
    metrics = int(env.get("WORKER_METRICS_PORT") or DEFAULT_METRICS_PORT)
    if metrics > 0:  # the worker binds every interface (prometheus_client's default)
        _bind("0.0.0.0", metrics, "the worker's metrics", "WORKER_METRICS_PORT", keep=False)
    sock = _bind(host, port, "the API", "PORT")
    assert sock is not None
    sock.listen(2048)  # connections wait in the backlog until the API accepts: no refusals
    return sock


def run_dev(host: str = "127.0.0.1", port: int = 8000, sandbox_port: int | None = None,
            metrics_port: int | None = None) -> None:
    # SIGTERM (also the one uvicorn re-raises once drained) exits through SystemExit, so the
    # ExitStack stops the worker and the embedded servers rather than orphan them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    folder = data_dir().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if running := read_state(folder):
        raise DevError(f"a dev stack already runs on {folder} (pid {running.get('pid')}, API at "
                       f"{running.get('api_url')}): stop it first or set RESEARCH_DATA_DIR")
    env = dict(os.environ)
    env.setdefault("LOG_FORMAT", "console")
    env.setdefault("WEBHOOK_ALLOW_PRIVATE", "true")
    if metrics_port is not None:
        env["WORKER_METRICS_PORT"] = str(metrics_port)
    sandbox_port = sandbox_port if sandbox_port is not None else int(env.get("SANDBOX_PORT")
                                                                     or 8700)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    api_url = f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"
    api_sock = _probe_ports(host, port, env)
    with contextlib.ExitStack() as stack:
        stack.callback(api_sock.close)
        sandbox = _sandbox(env, sandbox_port, "127.0.0.1")
        _databases(env, folder, stack)
        if sandbox is not None:
            stack.enter_context(sandbox)
            _use_sandbox(env, sandbox, api_url)
        check_webhook_secret(env, sandbox)
        settings = Settings.from_env(env)
        configure_logging(settings.log_format)
        applied = asyncio.run(migrate(settings.database_url))
        _say(f"migrations: {len(applied)} applied")
        key = asyncio.run(_dev_key(settings.database_url, folder / "dev-api-key"))
        state = {"pid": os.getpid(), "api_url": api_url, "database_url": settings.database_url,
                 "redis_url": settings.redis_url, "parallel_base_url": settings.parallel_base_url,
                 "sandbox": sandbox is not None, "public_base_url": settings.public_base_url,
                 "worker_metrics_port": settings.worker_metrics_port,
                 "api_key_file": str(folder / "dev-api-key"), "started_at": time.time()}
        stack.callback(remove_state, folder)
        _start_worker(env, folder, state, stack)
        _say(f"API:     {api_url}   (OpenAPI at {api_url}/schema)")
        _say(f"API key: {key}   (in {folder / 'dev-api-key'})")
        _say("in another terminal: `make chat` (ask questions), `make keys TENANT=acme` (a key "
             "for another tenant), or README.md's curl session")
        _serve(settings, api_sock, env)


def _start_worker(env: dict[str, str], folder: Path, state: dict[str, Any],
                  stack: contextlib.ExitStack) -> None:
    """The worker, restarted whenever it dies; the state file names its current pid."""

    def started(pid: int) -> None:
        write_state(folder, {**state, "worker_pid": pid})

    worker = Supervisor("worker", [sys.executable, "-m", "service.cli", "worker"], env, _say,
                        on_start=started)
    stack.callback(worker.stop)
    worker.start()


def _serve(settings: Settings, sock: socket.socket, env: dict[str, str]) -> None:
    import uvicorn

    from service.app import create_app

    os.environ.update({k: v for k, v in env.items() if k not in os.environ})
    config = uvicorn.Config(create_app(settings), log_config=None, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])  # service.http.middleware logs each request
