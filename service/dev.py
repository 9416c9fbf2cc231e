"""`research-service dev`: the whole service on one machine, for `make run`.

Embedded PostgreSQL and Redis when DATABASE_URL / REDIS_URL are unset, the sandbox when
PARALLEL_API_KEY is unset; then migrations, a dev API key, the worker (a child process) and the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from service.config import Settings
from service.db import keys
from service.db.migrate import migrate
from service.logs import configure_logging


def _say(message: str) -> None:
    print(f"[dev] {message}", flush=True)


async def _dev_key(database_url: str, key_file: Path) -> str:
    """The dev tenant's key: reused from key_file while it still works, else a new one."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        if key_file.exists():
            key = key_file.read_text().strip()
            if await keys.tenant_for_key(conn, key):
                return key
        _, key = await keys.create_key(conn, "dev")
    finally:
        await conn.close()
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    return key


def run_dev(host: str = "127.0.0.1", port: int = 8000) -> None:
    data_dir = Path(os.environ.get("RESEARCH_DATA_DIR", ".data")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("LOG_FORMAT", "console")
    env.setdefault("WEBHOOK_ALLOW_PRIVATE", "true")
    with contextlib.ExitStack() as stack:
        if not env.get("DATABASE_URL"):
            from service.devstack import EmbeddedPostgres

            pg = EmbeddedPostgres(data_dir / "postgres")
            env["DATABASE_URL"] = pg.start()
            stack.callback(pg.stop)
            _say(f"DATABASE_URL unset: embedded PostgreSQL at {env['DATABASE_URL']}")
        if not env.get("REDIS_URL"):
            from service.devstack import EmbeddedRedis

            redis = EmbeddedRedis(data_dir / "redis")
            env["REDIS_URL"] = redis.start()
            stack.callback(redis.stop)
            _say(f"REDIS_URL unset: embedded Redis at {env['REDIS_URL']}")
        if not env.get("PARALLEL_API_KEY"):
            from sandbox.server import SandboxServer

            sandbox = stack.enter_context(SandboxServer(port=int(env.get("SANDBOX_PORT", "8700"))))
            env["PARALLEL_API_KEY"] = "sandbox-key"
            env["PARALLEL_BASE_URL"] = sandbox.url
            _say(f"PARALLEL_API_KEY unset: using the local sandbox at {sandbox.url} "
                 "(answers are canned; no real research, no cost)")
        settings = Settings.from_env(env)
        configure_logging(settings.log_format)
        applied = asyncio.run(migrate(settings.database_url))
        _say(f"migrations: {len(applied)} applied")
        key = asyncio.run(_dev_key(settings.database_url, data_dir / "dev-api-key"))
        worker = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=env)
        stack.callback(_stop, worker)
        url = f"http://{host}:{port}"
        _say(f"API:     {url}   (OpenAPI at {url}/schema)")
        _say(f"API key: {key}")
        _say(f'try:     curl -s -H "Authorization: Bearer {key}" -X POST {url}/v1/conversations '
             "-H 'content-type: application/json' -d '{}'")
        import uvicorn

        # uvicorn re-raises SIGTERM once drained; exiting through SystemExit instead lets the
        # ExitStack stop the worker and the embedded servers rather than orphan them.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

        from service.app import create_app

        os.environ.update({k: v for k, v in env.items() if k not in os.environ})
        uvicorn.run(create_app(settings), host=host, port=port, log_config=None,
                    access_log=False)  # service.http.middleware logs each request


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
