"""Embedded PostgreSQL / Redis (service.devstack): real servers, no Docker."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # project may not be pip-installed in the venv
    sys.path.insert(0, str(ROOT))

from service import devstack  # noqa: E402
from service.devstack import EmbeddedPostgres, EmbeddedRedis  # noqa: E402

PG_PROBLEM = devstack.embedded_postgres_unavailable_reason()
REDIS_PROBLEM = devstack.embedded_redis_unavailable_reason()
for _what, _why in (("postgres", PG_PROBLEM), ("redis", REDIS_PROBLEM)):
    if _why:
        print(f"[test_devstack] embedded {_what} cannot run here: {_why}", file=sys.stderr)

needs_pg = pytest.mark.skipif(
    PG_PROBLEM is not None, reason=f"embedded postgres cannot run here: {PG_PROBLEM}"
)
needs_redis = pytest.mark.skipif(
    REDIS_PROBLEM is not None, reason=f"embedded redis cannot run here: {REDIS_PROBLEM}"
)
pytestmark = pytest.mark.slow


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _port_from(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _run_child(code: str, timeout: float = 30) -> str:
    """Run python code in a fresh interpreter (a *different process*)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


async def _pg_query(dsn: str, query: str, setup: str = "") -> object:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        if setup:
            await conn.execute(setup)
        return await conn.fetchval(query)
    finally:
        await conn.close()


def test_free_port_is_bindable() -> None:
    port = devstack.free_port()
    assert 1024 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_docker_available_is_fast_and_boolean() -> None:
    t0 = time.monotonic()
    result = devstack.docker_available()
    assert isinstance(result, bool)
    assert time.monotonic() - t0 < 2.0


@needs_pg
def test_postgres_start_query_stop_and_reuse(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "pg"
    t0 = time.monotonic()
    with EmbeddedPostgres(data) as pg:
        first_start = time.monotonic() - t0  # includes initdb
        dsn = pg.url
        port = _port_from(dsn)
        assert dsn == f"postgresql://postgres@127.0.0.1:{port}/postgres"
        assert port not in (5432,)
        assert asyncio.run(_pg_query(dsn, "SELECT 1")) == 1
        setup = "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('hi')"
        assert asyncio.run(_pg_query(dsn, "SELECT count(*) FROM kept", setup)) == 1
    assert not _port_open(port), "postgres still listening after stop()"
    assert (data / "pgdata" / "PG_VERSION").is_file()
    assert not (data / "pgdata" / "postmaster.pid").exists()

    # Same data_dir from another process: no initdb, data survives, new port works.
    out = _run_child(
        f"""
        import asyncio, asyncpg, pathlib, time
        from service.devstack import EmbeddedPostgres
        pg = EmbeddedPostgres(pathlib.Path({str(data)!r}))
        t0 = time.monotonic(); dsn = pg.start(); t1 = time.monotonic() - t0
        async def q():
            c = await asyncpg.connect(dsn)
            try: return await c.fetchval("SELECT v FROM kept")
            finally: await c.close()
        print(asyncio.run(q()), dsn, round(t1, 2))
        pg.stop()
        """
    )
    value, dsn2, restart = out.split()
    assert value == "hi"
    assert not _port_open(_port_from(dsn2))
    print(f"postgres: first start (initdb) {first_start:.2f}s, restart in child {restart}s")
    assert first_start < 20


@needs_pg
def test_postgres_does_not_outlive_a_killed_owner(tmp_path: pathlib.Path) -> None:
    data = tmp_path / "pg"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import pathlib, sys, time
            from service.devstack import EmbeddedPostgres
            print(EmbeddedPostgres(pathlib.Path({str(data)!r})).start(), flush=True)
            time.sleep(60)
        """)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        dsn = child.stdout.readline().strip()
        port = _port_from(dsn)
        assert _port_open(port)
    finally:
        child.send_signal(signal.SIGKILL)  # no atexit: relies on PDEATHSIG / orphan reaping
        child.wait()
    deadline = time.monotonic() + 10
    while _port_open(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _port_open(port), "postgres orphaned after its owner was SIGKILLed"
    # and the data_dir is immediately reusable
    with EmbeddedPostgres(data) as pg:
        assert asyncio.run(_pg_query(pg.url, "SELECT 1")) == 1


@needs_redis
def test_redis_start_ping_stop_and_reuse(tmp_path: pathlib.Path) -> None:
    import redis

    data = tmp_path / "redis"
    t0 = time.monotonic()
    rd = EmbeddedRedis(data)
    url = rd.start()
    elapsed = time.monotonic() - t0
    port = _port_from(url)
    try:
        assert url == f"redis://127.0.0.1:{port}/0"
        assert port != 6379
        client = redis.Redis.from_url(url)
        assert client.ping() is True
        client.set("kept", "yes")
        client.close()
    finally:
        rd.stop()
    assert not _port_open(port), "redis still listening after stop()"

    out = _run_child(
        f"""
        import pathlib, redis
        from service.devstack import EmbeddedRedis
        with EmbeddedRedis(pathlib.Path({str(data)!r})) as rd:
            c = redis.Redis.from_url(rd.url)
            print(c.ping(), c.get("kept").decode(), rd.url)
            c.close()
        """
    )
    pong, value, url2 = out.split()
    assert (pong, value) == ("True", "yes")
    assert not _port_open(_port_from(url2))
    print(f"redis: start {elapsed:.2f}s")
    assert elapsed < 10


def test_supervisor_restarts_a_child_that_dies_until_stopped() -> None:
    from service.devstack.supervise import Supervisor

    said: list[str] = []
    pids: list[int] = []
    child = Supervisor("child", [sys.executable, "-c", "import time; time.sleep(60)"],
                       dict(os.environ), said.append, on_start=pids.append)
    child.start()
    try:
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(pids) == 2 and child.restarts == 1, said
        assert said[0].startswith(f"child (pid {pids[0]}) was killed by SIGKILL after ")
        assert said[1] == f"child restarted (pid {pids[1]})"
    finally:
        child.stop()
    assert child.process is not None and child.process.poll() is not None
    child._watcher.join(timeout=10)  # the watcher ends: a stopped child is not restarted
    assert not child._watcher.is_alive() and len(pids) == 2
