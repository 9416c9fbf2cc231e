"""The sandbox ASGI app: Parallel's Task API routes under /v1 plus the /_sandbox control API.

`SandboxApp.__call__` wraps every /v1 request before Litestar sees it: it logs the call, applies
`response_delay_s`, checks `x-api-key`, and applies the configured fault. It sits outside
Litestar's own middleware so a "drop" can close the connection without any response. It also
keeps /_sandbox/* to holders of the control token (or to loopback callers: sandbox.control).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from litestar.response import Stream
from litestar.types import LifeSpanReceive, LifeSpanSend, Receive, Scope, Send

from sandbox.config import SandboxConfig
from sandbox.control import CONTROL_ROUTES, REFUSALS, refusal
from sandbox.events import stream_events
from sandbox.faults import DROP, DROP_AFTER_CREATE
from sandbox.group_routes import GROUP_ROUTES
from sandbox.groups import Groups, creates_runs
from sandbox.store import Run, Store
from sandbox.validation import validate_create
from sandbox.webhooks import WebhookSender
from sandbox.wire import (
    CALL_KEY,
    ApiError,
    call_entry,
    error_body,
    error_response,
    json_response,
    rfc3339,
)


class ConnectionDropped(Exception):
    """Raised to abort a response when the server gives no access to its transport."""


def _store(request: Request[Any, Any, Any]) -> Store:
    store: Store = request.app.state.store
    return store


def _run(request: Request[Any, Any, Any], run_id: str) -> Run:
    run = _store(request).get(run_id)
    if run is None:
        raise ApiError(404, "Run id not found")
    return run


@post("/v1/tasks/runs", status_code=202)
async def create_run(request: Request[Any, Any, Any]) -> Response[bytes]:
    store = _store(request)
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        raise ApiError(422, "Request body is not valid JSON") from exc
    betas = [b.strip() for b in request.headers.get("parallel-beta", "").split(",") if b.strip()]
    validate_create(body, betas, store.config.strict_betas)
    run = store.create(body, betas)
    call = call_entry(request.scope)
    if call is not None:
        call["run_id"] = run.run_id
    return json_response(store.task_run(run), 202)


@get("/v1/tasks/runs/{run_id:str}")
async def retrieve_run(request: Request[Any, Any, Any], run_id: FromPath[str]) -> Response[bytes]:
    return json_response(_store(request).task_run(_run(request, run_id)))


@get("/v1/tasks/runs/{run_id:str}/input")
async def run_input(request: Request[Any, Any, Any], run_id: FromPath[str]) -> Response[bytes]:
    return json_response(_store(request).run_input(_run(request, run_id)))


@get("/v1/tasks/runs/{run_id:str}/result")
async def run_result(request: Request[Any, Any, Any], run_id: FromPath[str]) -> Response[bytes]:
    store = _store(request)
    raw = request.query_params.get("timeout", "600")
    try:
        timeout = int(raw)
    except ValueError as exc:
        raise ApiError(
            422, "timeout must be an integer number of seconds", {"timeout": raw}
        ) from exc
    if timeout < 0:
        raise ApiError(422, "timeout must not be negative", {"timeout": raw})
    run = _run(request, run_id)
    await store.wait_terminal(run, min(float(timeout), store.config.max_result_timeout_s))
    if run.final == "completed":
        return json_response({"run": store.task_run(run), "output": store.output(run)})
    if run.final is not None:
        raise ApiError(404, "Run failed or run id not found")
    raise ApiError(408, "Request timed out; run still active")


@get(["/v1/tasks/runs/{run_id:str}/events", "/v1beta/tasks/runs/{run_id:str}/events"])
async def run_events(request: Request[Any, Any, Any], run_id: FromPath[str]) -> Stream:
    store = _store(request)
    run = _run(request, run_id)
    return Stream(
        stream_events(store, run),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def _api_error(_: Request[Any, Any, Any], exc: ApiError) -> Response[bytes]:
    return error_response(exc.status, exc.message, exc.detail)


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    detail = exc.extra if isinstance(exc.extra, dict) else None
    return error_response(exc.status_code, exc.detail or None, detail, headers=exc.headers)


def _server_error(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    return error_response(500, f"Internal server error: {type(exc).__name__}")


class SandboxApp(Litestar):
    async def __call__(
        self, scope: Any, receive: Receive | LifeSpanReceive, send: Send | LifeSpanSend
    ) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        # ASGI pairs an http scope with http's receive and send; the union is for lifespan.
        await self._http(scope, cast("Receive", receive), cast("Send", send))

    async def _http(self, scope: Any, receive: Receive, send: Send) -> None:
        store: Store = self.state.store
        control = scope["path"].startswith("/_sandbox")
        if control and (status := refusal(scope, store.config)) is not None:
            await _send_error(send, status, {"www-authenticate": "Bearer"}, REFUSALS[status])
            return
        if not scope["path"].startswith("/v1"):
            await super().__call__(scope, receive, send)
            return
        entry: dict[str, Any] = {
            "method": scope["method"],
            "path": scope["path"],
            "status": None,
            "at": rfc3339(time.time()),
            "run_id": _path_run_id(scope["path"]),
            "fault": None,
        }
        store.log_call(entry)
        scope[CALL_KEY] = entry

        async def logged_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
            await send(message)

        if store.faults.config.response_delay_s > 0:
            await asyncio.sleep(store.faults.config.response_delay_s)
        if not _authorized(scope, store.config.api_key):
            await _send_error(logged_send, 401)
            return
        is_create = creates_runs(scope["method"], scope["path"])  # also a group's add runs
        decision = store.faults.decide(is_create)
        if decision is None:
            if is_create and store.faults.config.create_delay_s > 0:
                await asyncio.sleep(store.faults.config.create_delay_s)
            await super().__call__(scope, receive, _answer_later(store, is_create, logged_send))
            return
        kind, status = decision
        entry["fault"] = kind if status is None else str(status)
        if status is not None:
            headers = {}
            if status == 429 and store.faults.config.retry_after_s is not None:
                headers["retry-after"] = f"{store.faults.config.retry_after_s:g}"
            await _send_error(logged_send, status, headers)
        elif kind == DROP_AFTER_CREATE:

            async def discard(message: Any) -> None:
                if message["type"] == "http.response.start":
                    entry["status"] = message["status"]

            await super().__call__(scope, receive, discard)
            await _drop(send)
        elif kind == DROP:
            await _drop(send)


def _answer_later(store: Store, is_create: bool, send: Send) -> Send:
    """`send`, holding a create's answer for `create_answer_delay_s` (its run already exists)."""
    delay = store.faults.config.create_answer_delay_s
    if not is_create or delay <= 0:
        return send

    async def delayed_send(message: Any) -> None:
        if message["type"] == "http.response.start":
            await asyncio.sleep(delay)
        await send(message)

    return delayed_send


def _path_run_id(path: str) -> str | None:
    parts = path.split("/")
    return parts[4] if len(parts) > 4 and parts[4].startswith("trun_") else None


def _authorized(scope: Scope, api_key: str | None) -> bool:
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            key = value.decode("latin-1")
            return bool(key) and (api_key is None or key == api_key)
    return False


async def _send_error(
    send: Send, status: int, headers: dict[str, str] | None = None, message: str | None = None
) -> None:
    body = error_body(status, message)
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _drop(send: Send) -> None:
    """Close the connection without a response (uvicorn), else abort mid-response."""
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        raise ConnectionDropped
    transport.abort()
    for _ in range(20):  # let connection_lost mark the cycle disconnected, so uvicorn sends no 500
        if getattr(cycle, "disconnected", True):
            return
        await asyncio.sleep(0)


def create_app(config: SandboxConfig | None = None) -> SandboxApp:
    config = config or SandboxConfig()
    store = Store(config)
    sender = WebhookSender(store)

    async def startup() -> None:
        store.loop = asyncio.get_running_loop()
        await sender.start()

    async def shutdown() -> None:
        store.close()
        await sender.stop()

    app = SandboxApp(
        route_handlers=[
            create_run,
            retrieve_run,
            run_input,
            run_result,
            run_events,
            *GROUP_ROUTES,
            *CONTROL_ROUTES,
        ],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, 500: _server_error},
        on_startup=[startup],
        on_shutdown=[shutdown],
        openapi_config=None,
        logging_config=None,
        debug=False,
    )
    app.state.config = config
    app.state.store = store
    app.state.groups = Groups(store)
    app.state.webhooks = sender
    return app
