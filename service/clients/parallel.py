"""The one place that speaks to Parallel's Task API, through the parallel-web SDK.

No SDK type or SDK exception leaves this module: responses become the Structs below and errors
become UpstreamUnavailable (retry later) or UpstreamRejected (give up), by
service.clients.parallel_errors. The hot calls (create, retrieve, result) take the SDK's raw
response (`with_raw_response`: the same request, its errors raised the same way) and decode its
body with msgspec straight into those Structs, instead of pydantic models dumped back to dicts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, Literal, TypeVar, cast

import httpx
import msgspec
import parallel
from parallel import AsyncAPIResponse, AsyncParallel

try:
    import aiohttp
except ImportError:  # the SDK falls back to httpx's own transport
    aiohttp = None  # type: ignore[assignment]  # an optional module: None when not installed

from service import metrics
from service.clients.parallel_errors import create_error, translate
from service.errors import UpstreamUnavailable
from service.models import FieldBasis

T = TypeVar("T")
WEBHOOK_BETA = "webhook-2025-08-12"
# Parallel refuses a create whose input plus task spec is longer than this (docs/parallel.md §1.2).
MAX_REQUEST_CHARS = 25_000
# Streams open at once per process (ParallelClient): one per followed group in a worker, one per
# run whose progress an API process relays. A bound, not a budget: far above what either holds.
MAX_STREAMS = 10_000

class RunError(msgspec.Struct, kw_only=True):
    message: str
    ref_id: str | None = None


class RunInfo(msgspec.Struct, kw_only=True):
    run_id: str
    interaction_id: str
    status: str
    is_active: bool
    processor: str
    error: RunError | None = None
    metadata: dict[str, Any] | None = None
    task_group_id: str | None = None  # the task group the run was added to, if any


class RunOutput(msgspec.Struct, kw_only=True):
    type: Literal["text", "json"]
    content: Any
    basis: list[FieldBasis] = []


class RunResult(msgspec.Struct, kw_only=True):
    run: RunInfo
    output: RunOutput


def _convert(data: Any, kind: type[T]) -> T:
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise translate(exc) from exc


async def _decode(raw: AsyncAPIResponse[Any], kind: type[T]) -> T:
    """A raw response's JSON body as `kind` (msgspec.DecodeError when it is not one)."""
    return msgspec.json.decode(await raw.read(), type=kind)


def default_http_client(max_connections: int) -> httpx.AsyncClient:
    """The SDK's aiohttp transport (its `aiohttp` extra): about a third of httpx's CPU per call
    (0.6 ms against 1.6 ms here), and calls are most of what following runs costs a worker
    (docs/benchmarks.md). Every connection is kept alive between checks: with the SDK's default
    of 20, a follower tick of hundreds of checks would reopen most of its connections."""
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    if aiohttp is None:
        client = parallel.DefaultAsyncHttpxClient(limits=limits)
    else:
        client = parallel.DefaultAioHttpClient(limits=limits)
    # Parallel's API sets no cookies, and the SDK sends none: httpx would still build the
    # standard library's cookie-jar adapters for every answer (2 % of a worker's samples).
    # Its `cookies` setter copies into a plain Cookies, hence the attribute.
    client._cookies = _NoCookies()
    return client


class _NoCookies(httpx.Cookies):
    """A cookie store that keeps nothing a response sets."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


def request_chars(input: str | dict[str, Any], output_schema: dict[str, Any]) -> int:
    """Characters of a create's input plus the task spec create_run sends with it, as Parallel
    counts them against MAX_REQUEST_CHARS (an object input as its JSON; the whole task spec,
    which errs on the safe side)."""
    text = input if isinstance(input, str) else msgspec.json.encode(input).decode()
    return len(text) + len(msgspec.json.encode({"output_schema": output_schema}).decode())


class ParallelClient:
    """A narrow async client for the calls the worker makes.

    Calls and streams have connection pools of their own. A stream (a followed group's events,
    a run's progress) holds its connection for as long as it stays open, up to minutes: sharing
    the calls' pool, a worker following as many groups as the pool has connections had none
    left for its calls, and every add, listing and result waited for one until it timed out
    (seen at 100 groups with 100,000 runs in flight). `http_client`, when given (tests), serves
    both."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 30.0,
        http_client: httpx.AsyncClient | None = None,
        max_connections: int = 100,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        def sdk(client: httpx.AsyncClient) -> AsyncParallel:
            # SDK retries are off: a retried POST without an idempotency key can create a
            # second, billed run, so every retry decision is the worker's (docs/design.md §2).
            return AsyncParallel(api_key=api_key, base_url=base_url,
                                 timeout=httpx.Timeout(timeout, connect=5.0), max_retries=0,
                                 http_client=client)

        self._sdk = sdk(http_client or default_http_client(max_connections))
        self._streams = self._sdk if http_client else sdk(default_http_client(max_streams))

    async def close(self) -> None:
        await self._sdk.close()
        if self._streams is not self._sdk:
            await self._streams.close()

    async def create_run(
        self,
        *,
        input: str | dict[str, Any],
        processor: str,
        output_schema: dict[str, Any],
        previous_interaction_id: str | None,
        metadata: dict[str, str],
        webhook_url: str | None = None,
        timeout_s: float = 30.0,
    ) -> RunInfo:
        """Create one run, never retried here, answered within `timeout_s` in all (connecting
        included). Raises UpstreamUnavailable or UpstreamRejected.

        UpstreamUnavailable.in_doubt is True only when a run may exist that we will never learn
        the id of: the request was sent and no answer came (in time, or the connection broke),
        or the answer could not be read. A failure to connect, or any HTTP error status, means
        no run was made (Parallel creates a run only when it answers 202).
        """
        kwargs = run_input(input=input, processor=processor, output_schema=output_schema,
                           previous_interaction_id=previous_interaction_id, metadata=metadata,
                           webhook_url=webhook_url)
        if webhook_url:
            kwargs["betas"] = [WEBHOOK_BETA]
        try:
            with metrics.parallel_call("create_run"):
                # The SDK's timeouts bound each phase (the read one restarts with every byte);
                # the outer one bounds the whole call, which must end inside the attempt's lease.
                async with asyncio.timeout(timeout_s):
                    raw = await self._sdk.task_run.with_raw_response.create(
                        **kwargs, timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s))
                    )
            return await _decode(raw, RunInfo)
        except Exception as exc:
            raise create_error(exc) from exc

    async def retrieve(self, run_id: str) -> RunInfo:
        """The run's current status. Raises UpstreamUnavailable or UpstreamRejected."""
        try:
            with metrics.parallel_call("retrieve_run"):
                raw = await self._sdk.task_run.with_raw_response.retrieve(run_id)
            return await _decode(raw, RunInfo)
        except Exception as exc:
            raise translate(exc) from exc

    async def result(self, run_id: str, *, wait_s: int = 5) -> RunResult:
        """The output of a completed run. Raises UpstreamUnavailable for a run still active
        after wait_s."""
        try:
            with metrics.parallel_call("run_result"):
                raw = await self._sdk.task_run.with_raw_response.result(
                    run_id, api_timeout=wait_s, timeout=httpx.Timeout(wait_s + 30.0, connect=5.0)
                )
            return await _decode(raw, RunResult)
        except Exception as exc:
            raise translate(exc) from exc

    async def progress(self, run_id: str) -> AsyncGenerator[dict[str, Any], None]:
        """Yield the run's progress events (Parallel's SSE stream) as plain dicts."""
        try:
            with metrics.parallel_call("run_events"):
                stream = await self._streams.task_run.events(run_id)
            async with stream:  # closes the connection when the consumer stops early
                async for event in stream:
                    yield event.model_dump(mode="json")
        except Exception as exc:
            raise translate(exc) from exc

    # task groups (docs/parallel.md §1.6) ------------------------------------------------------

    async def create_group(self, metadata: dict[str, str]) -> str:
        """Make a task group; its taskgroup_id. Raises UpstreamUnavailable or UpstreamRejected
        (404: this deployment has no task groups)."""
        try:
            with metrics.parallel_call("create_group"):
                group = await self._sdk.task_group.create(metadata=dict(metadata))
        except Exception as exc:
            raise translate(exc) from exc
        taskgroup_id = group.task_group_id
        if not isinstance(taskgroup_id, str) or not taskgroup_id:
            raise UpstreamUnavailable("Parallel answered a group without a taskgroup_id")
        return taskgroup_id

    async def add_runs(
        self, taskgroup_id: str, inputs: list[dict[str, Any]], *, timeout_s: float = 30.0
    ) -> tuple[list[str], str | None]:
        """Add runs to a group in one POST (never retried here): their run ids in input order,
        and the listing's cursor just before them. Each input is a create body (`run_input`).
        Raises what create_run raises, with the same meaning of `in_doubt` (here: for every
        input of the call)."""
        betas = [WEBHOOK_BETA] if any("webhook" in item for item in inputs) else None
        try:
            with metrics.parallel_call("add_runs"):
                async with asyncio.timeout(timeout_s):
                    answer = await self._sdk.task_group.add_runs(
                        taskgroup_id, inputs=cast(Any, inputs),
                        **cast(dict[str, Any], {"betas": betas} if betas else {}),
                        timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
                    )
            run_ids = list(answer.run_ids)
            run_cursor = answer.run_cursor
        except Exception as exc:
            raise create_error(exc) from exc
        if len(run_ids) != len(inputs) or not all(isinstance(r, str) and r for r in run_ids):
            error = UpstreamUnavailable("Parallel answered an add of runs without their ids")
            error.in_doubt = True
            raise error
        return run_ids, run_cursor if isinstance(run_cursor, str) and run_cursor else None

    async def group_runs(self, taskgroup_id: str, after: str | None = None) -> list[RunInfo]:
        """The group's runs (added after the cursor `after`, else all) with their metadata: the
        only listing Parallel has. Raises UpstreamUnavailable or UpstreamRejected."""
        found: list[RunInfo] = []
        kwargs: dict[str, Any] = {"last_event_id": after} if after else {}
        try:
            with metrics.parallel_call("group_runs"):
                stream = await self._sdk.task_group.get_runs(taskgroup_id, **kwargs)
            async with stream:
                async for event in stream:
                    data = event.model_dump(mode="json")
                    if data.get("type") == "task_run.state" and data.get("run"):
                        found.append(_convert(data["run"], RunInfo))
                    elif data.get("type") == "error":
                        raise UpstreamUnavailable(f"Parallel's run listing failed: {data}")
        except UpstreamUnavailable:
            raise
        except Exception as exc:
            raise translate(exc) from exc
        return found

    async def group_active(self, taskgroup_id: str) -> bool:
        """Whether any run of the group is still active. Raises UpstreamUnavailable or
        UpstreamRejected."""
        try:
            with metrics.parallel_call("retrieve_group"):
                group = await self._sdk.task_group.retrieve(taskgroup_id)
        except Exception as exc:
            raise translate(exc) from exc
        return bool(group.status.is_active)

    async def group_events(
        self, taskgroup_id: str, last_event_id: str | None, *, timeout_s: float
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield the group's events after `last_event_id` as plain dicts, until Parallel ends
        the stream (after `timeout_s` at most, asked of the server). The stream sends no
        keep-alives, so the read timeout is the stream's own plus a margin."""
        kwargs: dict[str, Any] = {"api_timeout": timeout_s,
                                  "timeout": httpx.Timeout(timeout_s + 30.0, connect=5.0)}
        if last_event_id:
            kwargs["last_event_id"] = last_event_id
        try:
            with metrics.parallel_call("group_events"):
                stream = await self._streams.task_group.events(taskgroup_id, **kwargs)
            async with stream:
                async for event in stream:
                    yield event.model_dump(mode="json")
        except Exception as exc:
            raise translate(exc) from exc


def run_input(
    *, input: str | dict[str, Any], processor: str, output_schema: dict[str, Any],
    previous_interaction_id: str | None, metadata: dict[str, str], webhook_url: str | None,
) -> dict[str, Any]:
    """The body of a create (a group's add takes a list of these)."""
    body: dict[str, Any] = {
        "input": input,
        "processor": processor,
        "task_spec": {"output_schema": output_schema},
        "metadata": metadata,
    }
    if previous_interaction_id:
        body["previous_interaction_id"] = previous_interaction_id
    if webhook_url:
        body["webhook"] = {"url": webhook_url, "event_types": ["task_run.status"]}
    return body
