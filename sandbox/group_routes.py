"""The six task-group routes of Parallel's OpenAPI (`/v1/tasks/groups…`, also `/v1beta/…` as the
docs write them), over `sandbox.groups.Groups`.

With `SandboxConfig.task_groups` off (`SANDBOX_TASK_GROUPS=off`) each answers exactly as an
unknown route does (404), the way a deployment without task groups would.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.exceptions import NotFoundException
from litestar.params import FromPath
from litestar.response import Stream

from sandbox.groups import STATUSES, Group, Groups
from sandbox.wire import ApiError, call_entry, json_response

_BASES = ("/v1/tasks/groups", "/v1beta/tasks/groups")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _paths(suffix: str) -> list[str]:
    return [base + suffix for base in _BASES]


def _groups(request: Request[Any, Any, Any]) -> Groups:
    if not request.app.state.store.config.task_groups:
        raise NotFoundException  # what Litestar raises for a route it does not have
    groups: Groups = request.app.state.groups
    return groups


def _group(request: Request[Any, Any, Any], taskgroup_id: str) -> Group:
    group = _groups(request).get(taskgroup_id)
    _note(request, taskgroup_id=taskgroup_id)
    return group


def _note(request: Request[Any, Any, Any], **fields: Any) -> None:
    """Add ids to this call's entry in /_sandbox/calls."""
    call = call_entry(request.scope)
    if call is not None:
        call.update(fields)


async def _body(request: Request[Any, Any, Any]) -> Any:
    try:
        return msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        raise ApiError(422, "Request body is not valid JSON") from exc


def _flag(request: Request[Any, Any, Any], name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ApiError(422, f"{name} must be a boolean", {name: raw})


def _cursor(request: Request[Any, Any, Any], size: int) -> int:
    """The position after which a stream resumes: 0 without `last_event_id`."""
    raw = request.query_params.get("last_event_id") or ""
    if not raw:
        return 0
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12) or int(raw) > size:
        raise ApiError(422, "Unknown last_event_id", {"last_event_id": raw})
    return int(raw)


def _timeout(request: Request[Any, Any, Any], cap: float) -> float:
    raw = request.query_params.get("timeout")
    if raw is None or raw == "":
        return cap
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ApiError(422, "timeout must be a non-negative number of seconds", {"timeout": raw})
    return min(value, cap)


def _stream(chunks: Any) -> Stream:
    return Stream(chunks, media_type="text/event-stream", headers=_SSE_HEADERS)


@post(_paths(""), status_code=200)
async def create_group(request: Request[Any, Any, Any]) -> Response[bytes]:
    groups = _groups(request)
    group = groups.create(await _body(request))
    _note(request, taskgroup_id=group.taskgroup_id)
    return json_response(group.response())


@get(_paths("/{taskgroup_id:str}"))
async def retrieve_group(
    request: Request[Any, Any, Any], taskgroup_id: FromPath[str]
) -> Response[bytes]:
    return json_response(_group(request, taskgroup_id).response())


@post(_paths("/{taskgroup_id:str}/runs"), status_code=200)
async def add_runs(request: Request[Any, Any, Any], taskgroup_id: FromPath[str]) -> Response[bytes]:
    groups = _groups(request)
    group = _group(request, taskgroup_id)
    _flag(request, "refresh_status", True)  # validated; the status is always fresh here
    betas = [b.strip() for b in request.headers.get("parallel-beta", "").split(",") if b.strip()]
    answer = groups.add_runs(group, await _body(request), betas)
    _note(request, run_ids=answer["run_ids"])
    return json_response(answer)


@get(_paths("/{taskgroup_id:str}/events"))
async def group_events(request: Request[Any, Any, Any], taskgroup_id: FromPath[str]) -> Stream:
    groups = _groups(request)
    group = _group(request, taskgroup_id)
    if (status := groups.store.faults.config.group_events_status) is not None:
        raise ApiError(status, "Group event streams are unavailable (sandbox fault)")
    after = _cursor(request, len(group.log))
    timeout = _timeout(request, groups.store.config.group_events_max_s)
    return _stream(groups.events(group, after, timeout))


@get(_paths("/{taskgroup_id:str}/runs"))
async def group_runs(request: Request[Any, Any, Any], taskgroup_id: FromPath[str]) -> Stream:
    groups = _groups(request)
    group = _group(request, taskgroup_id)
    after = _cursor(request, len(group.runs))
    status = request.query_params.get("status") or None
    if status is not None and status not in STATUSES:
        raise ApiError(422, f"status must be one of {', '.join(sorted(STATUSES))}")
    with_input = _flag(request, "include_input", False)
    with_output = _flag(request, "include_output", False)
    return _stream(groups.runs(group, after, status, with_input, with_output))


@get(_paths("/{taskgroup_id:str}/runs/{run_id:str}"))
async def group_run(
    request: Request[Any, Any, Any], taskgroup_id: FromPath[str], run_id: FromPath[str]
) -> Response[bytes]:
    groups = _groups(request)
    group = _group(request, taskgroup_id)
    _note(request, run_id=run_id)
    run = groups.store.get(run_id) if run_id in group.positions else None
    if run is None:
        raise ApiError(404, "Run id not found")
    return json_response(groups.store.task_run(run))


GROUP_ROUTES = [create_group, retrieve_group, add_runs, group_events, group_runs, group_run]
