"""Closed-loop HTTP load: wrk when installed (C, so the load generator is not the bottleneck),
else an asyncio httpx generator. Both cycle through a list of (path, API key) targets and report
req/s and latency percentiles in milliseconds."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TypedDict

import httpx

from bench.harness import percentile

# Each wrk thread walks the path list with a stride of the thread count, so no two requests of
# a run share a path until the list wraps around.
WRK_SCRIPT = r"""
local paths = {}
local keys = {}
local nthreads = 1
local n = 0
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function init(args)
  for line in io.lines(args[1]) do
    local path, key = line:match("^([^\t]*)\t(.*)$")
    table.insert(paths, path)
    table.insert(keys, key)
  end
  nthreads = tonumber(args[2])
  wrk.method = args[3]
  if args[4] ~= "" then wrk.body = args[4] end
  n = tid
end
function request()
  local i = (n % #paths) + 1
  n = n + nthreads
  return wrk.format(nil, paths[i], {["Authorization"] = "Bearer " .. keys[i],
                                    ["Content-Type"] = "application/json"})
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '@@{"requests":%d,"duration_s":%f,"errors":%d,"status_errors":%d,"p50":%f,"p90":%f,"p99":%f}\n',
    summary.requests, summary.duration / 1e6,
    e.connect + e.read + e.write + e.status + e.timeout, e.status,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000))
end
"""


# Each wrk thread POSTs its share of the lines (path, key, body) once, then waits on GET /healthz
# until every one of its POSTs is answered, and says so with a file of its own (wrk itself runs
# for its whole duration: post_once_wrk interrupts it then). Prints how many were answered 202
# and how many not.
WRK_ONCE_SCRIPT = r"""
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function init(args)
  local nthreads = tonumber(args[2])
  marker = args[3] .. "/done." .. tid
  mine, pos, accepted, refused, first_refusal = {}, 0, 0, 0, ""
  local i = 0
  for line in io.lines(args[1]) do
    if i % nthreads == tid then
      local path, key, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
      table.insert(mine, wrk.format("POST", path, {["Authorization"] = "Bearer " .. key,
                                    ["Content-Type"] = "application/json"}, body))
    end
    i = i + 1
  end
  idle = wrk.format("GET", "/healthz")
  -- wrk calls the first thread's request() once before it connects, to see what it returns.
  checked = tid ~= 0
end
function request()
  if not checked then
    checked = true
    return idle
  end
  pos = pos + 1
  if pos > #mine then return idle end
  return mine[pos]
end
function response(status, headers, body)
  if status == 202 then accepted = accepted + 1
  elseif status ~= 200 then
    refused = refused + 1
    if first_refusal == "" then first_refusal = status .. " " .. body:sub(1, 200) end
  end
  if accepted + refused == #mine then
    io.open(marker, "w"):close()
    wrk.thread:stop()
  end
end
function done(summary, latency, requests)
  local a, r, why = 0, 0, ""
  for _, t in ipairs(threads) do
    a = a + t:get("accepted")
    r = r + t:get("refused")
    if why == "" then why = t:get("first_refusal") end
  end
  io.write(string.format('@@{"accepted":%d,"refused":%d,"errors":%d}\n', a, r,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
  io.write("@@why " .. why .. "\n")
end
"""


def post_once_wrk(
    base_url: str, targets: list[tuple[str, str, bytes]], *, connections: int = 32,
    timeout_s: float = 3600.0,
) -> None:
    """POST each (path, key, body) once with wrk, `connections` at a time; raises unless every
    one was answered 202."""
    threads = 2
    folder = Path(tempfile.mkdtemp(prefix="bench-wrk-"))
    (folder / "posts.txt").write_text(
        "".join(f"{path}\t{key}\t{body.decode()}\n" for path, key, body in targets))
    (folder / "once.lua").write_text(WRK_ONCE_SCRIPT)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{round(timeout_s)}s", "--timeout",
            "30s", "-s", str(folder / "once.lua"), base_url, "--", str(folder / "posts.txt"),
            str(threads), str(folder)]
    deadline = time.monotonic() + timeout_s
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as wrk:
        while wrk.poll() is None and time.monotonic() < deadline:
            if all((folder / f"done.{t}").exists() for t in range(threads)):
                wrk.send_signal(signal.SIGINT)  # wrk reports and exits
                break
            time.sleep(0.2)
        out, _ = wrk.communicate(timeout=60)
    shutil.rmtree(folder, ignore_errors=True)
    line = next(ln for ln in out.splitlines() if ln.startswith("@@{"))
    counts = json.loads(line[2:])
    if counts["accepted"] != len(targets):
        why = next((ln[6:] for ln in out.splitlines() if ln.startswith("@@why ")), "")
        raise RuntimeError(f"POST turns: {counts} of {len(targets)}; first refusal: {why}")


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


Target = tuple[str, str]  # (path, API key)


class LoadStats(TypedDict):
    """One load run: throughput, latency percentiles (ms), counts, and which generator ran."""

    rps: float
    p50: float
    p90: float
    p99: float
    requests: int
    errors: int
    generator: str


def run_load(
    base_url: str,
    method: str,
    targets: list[Target],
    *,
    body: bytes = b"",
    duration_s: float,
    connections: int = 32,
) -> LoadStats:
    """Load base_url for duration_s; returns {rps, p50, p90, p99 (ms), requests, errors}."""
    if have_wrk():
        return _run_wrk(base_url, method, targets, body, duration_s, connections)
    # The benchmarks call this from their own event loop: the generator gets a loop of its own
    # in a thread (the caller has nothing to do meanwhile).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(
            asyncio.run, _run_httpx(base_url, method, targets, body, duration_s, connections)
        ).result()


def _run_wrk(
    base_url: str,
    method: str,
    targets: list[Target],
    body: bytes,
    duration_s: float,
    connections: int,
) -> LoadStats:
    threads = 2
    folder = Path(tempfile.mkdtemp(prefix="bench-wrk-"))
    (folder / "paths.txt").write_text("".join(f"{path}\t{key}\n" for path, key in targets))
    (folder / "load.lua").write_text(WRK_SCRIPT)
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(folder / "load.lua"),
    ]
    argv += [base_url, "--", str(folder / "paths.txt"), str(threads), method, body.decode()]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, check=True)
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("@@"))
    stats = json.loads(line[2:])
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "rps": stats["requests"] / stats["duration_s"],
        "p50": stats["p50"],
        "p90": stats["p90"],
        "p99": stats["p99"],
        "requests": stats["requests"],
        "errors": stats["errors"],
        "generator": "wrk",
    }


async def _run_httpx(
    base_url: str,
    method: str,
    targets: list[Target],
    body: bytes,
    duration_s: float,
    connections: int,
) -> LoadStats:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits) as client:
        deadline = time.perf_counter() + duration_s

        async def loop(start: int) -> None:
            nonlocal errors
            n = start
            while time.perf_counter() < deadline:
                path, key = targets[n % len(targets)]
                n += connections
                t0 = time.perf_counter()
                response = await client.request(
                    method, path, content=body or None, headers={"Authorization": f"Bearer {key}"}
                )
                latencies.append((time.perf_counter() - t0) * 1000)
                errors += response.status_code >= 400

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(connections)))
        elapsed = time.perf_counter() - t0
    return {
        "rps": len(latencies) / elapsed,
        "p50": percentile(latencies, 50),
        "p90": percentile(latencies, 90),
        "p99": percentile(latencies, 99),
        "requests": len(latencies),
        "errors": errors,
        "generator": "httpx",
    }
