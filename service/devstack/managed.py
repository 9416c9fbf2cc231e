"""A server process we start, watch, and always stop (also at exit)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pathlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from service.devstack.common import (
    HOST,
    _file_lock,
    _port_open,
    _proc_ctime,
    _read_json,
    _same_process,
    _signal_pid,
    _wait_pid_gone,
    _write_json,
    free_port,
)
from service.devstack.privileges import _LIBC, _RunAs

log = logging.getLogger("service.devstack")


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


