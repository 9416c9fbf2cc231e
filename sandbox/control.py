"""Control and introspection API under /_sandbox (not logged, never faulted).

It shows every run's input and can change what the sandbox answers, so it is not open: with a
control token (SANDBOX_CONTROL_TOKEN) every route but /_sandbox/health needs
`Authorization: Bearer <token>`; without one only loopback callers get in (and the sandbox will
not listen beyond loopback, SandboxConfig.check_exposure). Secrets are never shown.
"""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
from litestar import Request, Response, delete, get, patch, post
from litestar.params import FromPath
from litestar.types import Scope

from sandbox.config import SandboxConfig, is_loopback
from sandbox.faults import FaultConfig
from sandbox.store import Store
from sandbox.wire import ApiError, json_response

OPEN_PATHS = frozenset({"/_sandbox/health"})
REFUSALS = {
    401: "Unauthorized: /_sandbox/* needs Authorization: Bearer <SANDBOX_CONTROL_TOKEN>",
    403: "Forbidden: without SANDBOX_CONTROL_TOKEN, /_sandbox/* answers loopback callers only",
}


def refusal(scope: Scope, config: SandboxConfig) -> int | None:
    """The status a control request is refused with (401, 403), or None when it may pass."""
    if scope["path"].rstrip("/") in OPEN_PATHS:
        return None
    if config.control_token is not None:
        sent = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, sent = value.partition(b" ")
                sent = sent.strip() if scheme.lower() == b"bearer" else b""
        return None if hmac.compare_digest(sent, config.control_token.encode()) else 401
    client = scope.get("client")
    # No client address: an in-process ASGI client, not the network.
    return None if client is None or is_loopback(client[0]) else 403


def _store(request: Request[Any, Any, Any]) -> Store:
    store: Store = request.app.state.store
    return store


async def _json(request: Request[Any, Any, Any]) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ApiError(422, "Request body is not valid JSON") from exc


@get("/_sandbox/health")
async def health() -> Response[bytes]:
    return json_response({"ok": True})


@get("/_sandbox/runs")
async def list_runs(request: Request[Any, Any, Any]) -> Response[bytes]:
    store = _store(request)
    wanted = request.query_params.get("status")
    records = [store.record(run) for run in list(store.runs.values())]
    if wanted:
        records = [r for r in records if r["status"] == wanted]
    return json_response({"data": records})


@get("/_sandbox/runs/{run_id:str}")
async def get_run(request: Request[Any, Any, Any], run_id: FromPath[str]) -> Response[bytes]:
    store = _store(request)
    run = store.get(run_id)
    if run is None:
        raise ApiError(404, "Run id not found")
    return json_response(store.record(run, with_output=True))


async def _finish(request: Request[Any, Any, Any], run_id: str, failed: bool) -> Response[bytes]:
    store = _store(request)
    body = await _json(request)
    run = store.get(run_id)
    if run is None:
        raise ApiError(404, "Run id not found")
    message = body.get("message") if isinstance(body, dict) else None
    if not store.finish(run, failed=failed, message=message):
        raise ApiError(409, f"Run is already {run.final}")
    return json_response(store.record(run, with_output=True))


@post("/_sandbox/runs/{run_id:str}/complete", status_code=200)
async def complete_run(request: Request[Any, Any, Any], run_id: FromPath[str]) -> Response[bytes]:
    return await _finish(request, run_id, failed=False)


@post("/_sandbox/runs/{run_id:str}/fail", status_code=200)
async def fail_run(request: Request[Any, Any, Any], run_id: FromPath[str]) -> Response[bytes]:
    return await _finish(request, run_id, failed=True)


@post("/_sandbox/interactions/{interaction_id:str}/expire", status_code=200)
async def expire_interaction(
    request: Request[Any, Any, Any], interaction_id: FromPath[str]
) -> Response[bytes]:
    """From now on a create naming this interaction as previous_interaction_id is refused."""
    run = _store(request).expire(interaction_id)
    if run is None:
        raise ApiError(404, "Interaction not found")
    return json_response({"interaction_id": interaction_id, "run_id": run.run_id,
                          "expired": True})


@get("/_sandbox/calls")
async def list_calls(request: Request[Any, Any, Any]) -> Response[bytes]:
    store = _store(request)
    return json_response({"data": list(store.calls), "total": store.calls_total})


@get("/_sandbox/webhooks")
async def list_webhooks(request: Request[Any, Any, Any]) -> Response[bytes]:
    return json_response({"data": list(_store(request).webhook_log)})


@get("/_sandbox/stats")
async def stats(request: Request[Any, Any, Any]) -> Response[bytes]:
    return json_response(_store(request).stats())


@get("/_sandbox/faults")
async def get_faults(request: Request[Any, Any, Any]) -> Response[bytes]:
    return json_response(_store(request).faults.as_dict())


@post("/_sandbox/faults", status_code=200)
async def set_faults(request: Request[Any, Any, Any]) -> Response[bytes]:
    store = _store(request)
    try:
        config = msgspec.convert(await _json(request), FaultConfig)
        store.faults.set(config)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ApiError(422, f"Invalid fault config: {exc}") from exc
    return json_response(store.faults.as_dict())


@delete("/_sandbox/faults", status_code=200)
async def clear_faults(request: Request[Any, Any, Any]) -> Response[bytes]:
    store = _store(request)
    store.faults.clear()
    return json_response(store.faults.as_dict())


@post("/_sandbox/reset", status_code=200)
async def reset(request: Request[Any, Any, Any]) -> Response[bytes]:
    _store(request).reset()
    return json_response({"ok": True})


@get("/_sandbox/config")
async def get_config(request: Request[Any, Any, Any]) -> Response[bytes]:
    return json_response(_store(request).config.public())


@patch("/_sandbox/config")
async def patch_config(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Change settings at runtime (e.g. latencies); affects runs created afterwards."""
    config = _store(request).config
    changes = await _json(request)
    if not isinstance(changes, dict):
        raise ApiError(422, "Invalid config: expected an object")
    if "control_token" in changes:
        raise ApiError(422, "Invalid config: control_token is set at start only")
    try:
        merged = msgspec.convert({**msgspec.structs.asdict(config), **changes}, SandboxConfig)
    except (msgspec.ValidationError, TypeError) as exc:
        raise ApiError(422, f"Invalid config: {exc}") from exc
    for field in msgspec.structs.fields(SandboxConfig):
        setattr(config, field.name, getattr(merged, field.name))
    return json_response(config.public())


CONTROL_ROUTES = [
    health,
    list_runs,
    get_run,
    complete_run,
    fail_run,
    expire_interaction,
    list_calls,
    list_webhooks,
    stats,
    get_faults,
    set_faults,
    clear_faults,
    reset,
    get_config,
    patch_config,
]
