"""Running PostgreSQL as root: a user namespace, or an unprivileged account."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pathlib
import stat
import subprocess
import threading
from collections.abc import Callable

from service.devstack.common import _IS_LINUX, postgres_bin_dir

log = logging.getLogger("service.devstack")


# --------------------------------------------------------------------------
# Linux process tweaks (pre-resolved so the post-fork preexec does little work)
# --------------------------------------------------------------------------

_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1

if _IS_LINUX:
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _unshare_fn = _libc.unshare
        _unshare_fn.argtypes = [ctypes.c_int]
        _unshare_fn.restype = ctypes.c_int
        _prctl_fn = _libc.prctl
        _prctl_fn.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        _prctl_fn.restype = ctypes.c_int
        _LIBC: ctypes.CDLL | None = _libc
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


