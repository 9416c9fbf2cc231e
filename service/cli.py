"""The `research-service` command (DESIGN.md §5)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import asyncpg

from service.config import Settings
from service.logs import configure_logging


def _db_settings() -> str:
    url = os.environ.get("DATABASE_URL")
    if not url:
        sys.exit("DATABASE_URL is not set.")
    return url


def cmd_migrate(_: argparse.Namespace) -> None:
    from service.db.migrate import migrate

    applied = asyncio.run(migrate(_db_settings()))
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))


def cmd_api(args: argparse.Namespace) -> None:
    import uvicorn

    from service.app import create_app

    settings = Settings.from_env()
    configure_logging(settings.log_format)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None,
                timeout_graceful_shutdown=30, proxy_headers=True)


def cmd_worker(_: argparse.Namespace) -> None:
    from worker.main import run

    settings = Settings.from_env()
    configure_logging(settings.log_format)
    run(settings)


async def _with_conn(fn, *args):  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(_db_settings())
    try:
        return await fn(conn, *args)
    finally:
        await conn.close()


def cmd_keys(args: argparse.Namespace) -> None:
    from service.db import keys

    if args.keys_command == "create":
        key_id, key = asyncio.run(_with_conn(keys.create_key, args.tenant))
        print(f"created key {key_id} for tenant {args.tenant!r}; it is shown once:")
        print(key)
    elif args.keys_command == "revoke":
        if not asyncio.run(_with_conn(keys.revoke_key, args.key_id)):
            sys.exit(f"no live key {args.key_id!r}")
        print(f"revoked {args.key_id}")
    else:
        for info in asyncio.run(_with_conn(keys.list_keys)):
            state = f"revoked {info.revoked_at:%Y-%m-%d}" if info.revoked_at else "live"
            print(f"{info.id}\t{info.tenant_name}\t{info.created_at:%Y-%m-%d}\t{state}")


def cmd_sandbox(args: argparse.Namespace) -> None:
    from sandbox.server import serve

    serve(host=args.host, port=args.port)


def cmd_dev(args: argparse.Namespace) -> None:
    from service.dev import run_dev

    run_dev(host=args.host, port=args.port)


def cmd_chat(args: argparse.Namespace) -> None:
    from service.chat import run_chat

    sys.exit(run_chat(conversation_id=args.conversation))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="research-service", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply pending migrations").set_defaults(fn=cmd_migrate)
    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.set_defaults(fn=cmd_api)
    sub.add_parser("worker", help="run the arq worker").set_defaults(fn=cmd_worker)
    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key (and the tenant if new)")
    create.add_argument("--tenant", required=True)
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
    dev.add_argument("--port", type=int, default=8000)
    dev.set_defaults(fn=cmd_dev)
    chat = sub.add_parser("chat", help="the interactive research loop, through this service")
    chat.add_argument("--conversation", default=None)
    chat.set_defaults(fn=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
