"""The `research-service` command (docs/design.md §5)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, TypeVar

import asyncpg

from service.config import Settings
from service.logs import configure_logging

if TYPE_CHECKING:
    from litestar import Litestar

T = TypeVar("T")


def _db_settings() -> str:
    """DATABASE_URL, else the database of the dev stack running here (`make run`)."""
    if url := os.environ.get("DATABASE_URL"):
        return url
    from service.devstack.state import STATE_FILE, data_dir, read_state

    if (state := read_state()) and isinstance(url := state.get("database_url"), str):
        return url
    sys.exit(f"DATABASE_URL is not set, and no `make run` (research-service dev) is running here "
             f"({data_dir() / STATE_FILE} names none): start it, or set DATABASE_URL.")


def cmd_migrate(_: argparse.Namespace) -> None:
    from service.db.migrate import migrate

    applied = asyncio.run(migrate(_db_settings()))
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))


def _configure_logging(settings: Settings) -> None:
    configure_logging(settings.log_format, coalesce=True, secrets=[
        settings.parallel_api_key, settings.parallel_webhook_secret,
    ])


def app_from_env() -> Litestar:
    """The API configured from the environment: the factory each `api --workers N` process runs."""
    from service.app import create_app

    settings = Settings.from_env()
    _configure_logging(settings)
    return create_app(settings)


def _prepare_metrics_dir(processes: int) -> None:
    """PROMETHEUS_MULTIPROC_DIR, created and emptied of earlier runs' files, before anything
    imports prometheus_client; several processes get a temporary one when none is set."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder and processes > 1:
        import tempfile

        folder = tempfile.mkdtemp(prefix="research-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith(".db"):
            os.remove(os.path.join(folder, name))


def cmd_api(args: argparse.Namespace) -> None:
    # Several processes behind one port: their metrics are summed through files (service.metrics).
    _prepare_metrics_dir(args.workers)
    import uvicorn

    common = {"host": args.host, "port": args.port, "log_config": None, "access_log": False,
              "timeout_graceful_shutdown": 30, "proxy_headers": True,
              "timeout_keep_alive": Settings.from_env().http_keep_alive_s,
              "loop": args.loop, "http": args.http}
    if args.workers > 1:
        uvicorn.run("service.cli:app_from_env", factory=True, workers=args.workers, **common)
    else:
        uvicorn.run(app_from_env(), **common)


def cmd_worker(args: argparse.Namespace) -> None:
    _prepare_metrics_dir(1)
    from worker.main import run

    settings = Settings.from_env()
    _configure_logging(settings)
    run(settings, loop=args.loop)


async def _with_conn(fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    conn = await asyncpg.connect(_db_settings())
    try:
        return await fn(conn)
    finally:
        await conn.close()


def cmd_keys(args: argparse.Namespace) -> None:
    from service.db import keys

    if args.keys_command == "create":
        key_id, key = asyncio.run(_with_conn(
            lambda conn: keys.create_key(conn, args.tenant, rate_limit_per_min=args.rate_limit,
                                         monthly_budget_usd=args.monthly_budget)
        ))
        print(f"created key {key_id} for tenant {args.tenant!r}; it is shown once:")
        print(key)
    elif args.keys_command == "revoke":
        if not asyncio.run(_with_conn(lambda conn: keys.revoke_key(conn, args.key_id))):
            sys.exit(f"no live key {args.key_id!r}")
        print(f"revoked {args.key_id}")
    else:
        for info in asyncio.run(_with_conn(keys.list_keys)):
            state = f"revoked {info.revoked_at:%Y-%m-%d}" if info.revoked_at else "live"
            rate = "default" if info.rate_limit_per_min is None else (
                f"{info.rate_limit_per_min}/min" if info.rate_limit_per_min else "unlimited")
            budget = "no budget" if info.monthly_budget_usd is None else (
                f"${info.monthly_budget_usd}/month")
            print(f"{info.id}\t{info.tenant_name}\t{info.created_at:%Y-%m-%d}\t{state}"
                  f"\t{rate}\t{budget}")


def rate_limit(text: str) -> int:
    """`N/min` or `N` requests per minute; 0 means unlimited."""
    match = re.fullmatch(r"\s*(\d{1,9})\s*(?:/\s*min)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError("expected N/min, e.g. 600/min (0: unlimited)")
    return int(match.group(1))


def usd(text: str) -> Decimal:
    try:
        amount = Decimal(text.strip().removeprefix("$"))
    except InvalidOperation:
        raise argparse.ArgumentTypeError("expected an amount in USD, e.g. 50 or 12.50") from None
    if not amount.is_finite() or amount < 0 or amount >= Decimal("1e10"):
        raise argparse.ArgumentTypeError("expected an amount in USD, e.g. 50 or 12.50")
    return amount


def cmd_sandbox(args: argparse.Namespace) -> None:
    from sandbox.config import ExposedWithoutToken
    from sandbox.server import PortBusy, serve

    try:
        serve(host=args.host, port=args.port)
    except PortBusy as exc:
        sys.exit(f"[sandbox] error: {exc}")
    except ExposedWithoutToken as exc:
        sys.exit(f"[sandbox] error: {exc}")


def cmd_dev(args: argparse.Namespace) -> None:
    from service.dev import DevError, run_dev

    try:
        run_dev(host=args.host, port=args.port, sandbox_port=args.sandbox_port,
                metrics_port=args.metrics_port)
    except DevError as exc:
        sys.exit(f"[dev] error: {exc}")
    except KeyboardInterrupt:  # Ctrl-C while starting: everything started is stopped already
        print("[dev] stopped", file=sys.stderr)
        sys.exit(130)


def cmd_chat(args: argparse.Namespace) -> None:
    from service.chat import run_chat

    sys.exit(run_chat(conversation_id=args.conversation, api_url=args.api_url,
                      api_key=args.api_key, processor=args.processor))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="research-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply pending migrations").set_defaults(fn=cmd_migrate)
    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1,
                     help="server processes; above 1, metrics go through PROMETHEUS_MULTIPROC_DIR")
    # uvloop and httptools cost less CPU per request than asyncio's loop and h11
    # (docs/benchmarks.md); the others stay for comparison.
    api.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                     help="the event loop (default: uvloop)")
    api.add_argument("--http", choices=["httptools", "h11"], default="httptools",
                     help="the HTTP/1.1 parser (default: httptools)")
    api.set_defaults(fn=cmd_api)
    worker = sub.add_parser("worker", help="run the arq worker")
    worker.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="the event loop (default: uvloop)")
    worker.set_defaults(fn=cmd_worker)
    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key (and the tenant if new)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--rate-limit", type=rate_limit, default=None, metavar="N/min",
                        help="requests per minute for this key (default: RATE_LIMIT_PER_MIN; "
                             "0: unlimited)")
    create.add_argument("--monthly-budget", type=usd, default=None, metavar="USD",
                        help="the tenant's budget per calendar month (UTC), in estimated USD; "
                             "new turns past it get 402")
    revoke = keys_sub.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")
    keys_sub.add_parser("list", help="list keys")
    keys.set_defaults(fn=cmd_keys)
    sandbox = sub.add_parser("sandbox", help="run the Parallel stand-in")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8700)
    sandbox.set_defaults(fn=cmd_sandbox)
    dev = sub.add_parser("dev", help="everything on one machine")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000, help="the API's port (`make run PORT=…`)")
    dev.add_argument("--sandbox-port", type=int, default=None,
                     help="the sandbox's port (default: SANDBOX_PORT, else 8700)")
    dev.add_argument("--metrics-port", type=int, default=None,
                     help="the worker's metrics port (default: WORKER_METRICS_PORT, else 9102; "
                          "0: off)")
    dev.set_defaults(fn=cmd_dev)
    chat = sub.add_parser("chat", help="the interactive research loop, through this service")
    chat.add_argument("--conversation", default=None, metavar="ID",
                      help="resume this conversation (shows its earlier turns first)")
    chat.add_argument("--processor", default=None, metavar="NAME",
                      help="the Parallel processor for the questions asked (e.g. core); a new "
                           "conversation gets it as its own (default: DEFAULT_PROCESSOR)")
    chat.add_argument("--api-url", default=None,
                      help="the API (default: RESEARCH_API_URL, else the running `make run`'s "
                           "(.data/dev-stack.json), else http://127.0.0.1:8000)")
    chat.add_argument("--api-key", default=None,
                      help="default: RESEARCH_API_KEY, else the dev key in "
                           "$RESEARCH_DATA_DIR/dev-api-key (.data/ by default)")
    chat.set_defaults(fn=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
