"""`python -m bench` (`make bench`): run the benchmarks, write bench/results.json and
bench/results.md, print the table. See docs/benchmarks.md for how to read it.

    python -m bench --size quick                    # every benchmark, about 13 minutes
    python -m bench --size full                     # the sizes the issue names (hours)
    python -m bench --only inflight --inflight push:10000:120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from bench import api, dbgrowth, e2e, idle, inflight, tenant
from bench.harness import Row, render_table
from bench.load import have_wrk

BENCHMARKS = {
    "api": api, "tenant": tenant, "inflight": inflight, "e2e": e2e, "dbgrowth": dbgrowth,
    "idle": idle,
}

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "api": {"duration_s": 3, "rounds": 3, "connections": 32, "tenants": 100},
        "tenant": {"duration_s": 3, "rounds": 3, "connections": 32},
        "inflight": {"configs": [("poll", 1000, 30.0), ("push", 1000, 30.0), ("push", 1000, 90.0),
                                 ("group", 1000, 30.0), ("group", 1000, 90.0)]},
        "e2e": {"conversations": 50, "turns": 5, "serial_turns": 10, "rounds": 3,
                "modes": ["group", "push", "poll"]},
        "dbgrowth": {"turns": 100_000, "conversations": 100_000, "duration_s": 2, "rounds": 2,
                     "connections": 4},
        "idle": {"duration_s": 60},
    },
    "full": {
        "api": {"duration_s": 10, "rounds": 3, "connections": 64, "tenants": 200},
        "tenant": {"duration_s": 10, "rounds": 3, "connections": 64},
        "inflight": {
            "configs": [
                (mode, n, length)
                for length in (120.0, 1200.0)
                for n in (1000, 10_000)
                for mode in ("group", "push", "poll")
            ] + [("group", 100_000, 1200.0)]  # issue 16's scale: one worker, 100,000 in flight
        },
        "e2e": {"conversations": 200, "turns": 5, "serial_turns": 20, "rounds": 3,
                "modes": ["group", "push", "poll"]},
        "dbgrowth": {"turns": 1_000_000, "conversations": 1_000_000, "duration_s": 5,
                     "rounds": 3, "connections": 4},
        "idle": {"duration_s": 60},
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help="comma-separated subset of: " + ", ".join(BENCHMARKS),
    )
    parser.add_argument(
        "--inflight",
        default=None,
        metavar="MODE:N:SECONDS,...",
        help="inflight configurations instead of the size's, e.g. push:10000:120",
    )
    parser.add_argument("--out", default="bench/results.json")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    return args


def inflight_configs(spec: str) -> list[tuple[str, int, float]]:
    """`push:10000:120,poll:1000:30` → [("push", 10000, 120.0), ("poll", 1000, 30.0)]."""
    configs = []
    for item in spec.split(","):
        mode, n, length = item.split(":")
        if mode not in ("group", "push", "poll"):
            raise ValueError(f"mode must be group, push or poll, not {mode!r}")
        configs.append((mode, int(n), float(length)))
    return configs


def machine() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "python": platform.python_version(),
        "git_commit": commit,
        "load_generator": "wrk" if have_wrk() else "httpx",
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = {name: dict(conf) for name, conf in SIZES[args.size].items()}
    if args.inflight:
        sizes["inflight"]["configs"] = inflight_configs(args.inflight)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    started, t0 = datetime.now(UTC), time.monotonic()
    meta = {
        "command": command.strip(),
        "size": args.size,
        "started_at": started.isoformat(),
        "machine_at_start": machine(),
    }
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    crashed = []
    for name in args.only.split(","):
        print(f"[bench] {name} …", file=sys.stderr, flush=True)
        b0 = time.monotonic()
        try:
            bench_rows, raw[name] = asyncio.run(BENCHMARKS[name].run(sizes[name]))
        except Exception as exc:
            traceback.print_exc()
            crashed.append(name)
            bench_rows, raw[name] = (
                [Row(bench=name, measure=f"failed: {exc!r}"[:120], value=math.nan, ok=False)],
                {"error": traceback.format_exc()},
            )
        rows += bench_rows
        raw[name + "_seconds"] = time.monotonic() - b0
        print(render_table(bench_rows), file=sys.stderr, flush=True)
    meta.update(duration_s=time.monotonic() - t0, load_avg_at_end=os.getloadavg())
    table = render_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            _clean({"meta": meta, "rows": [msgspec.to_builtins(r) for r in rows], "raw": raw}),
            indent=1,
            default=str,
        )
    )
    out.with_suffix(".md").write_text(
        f"Command: `{meta['command']}` ({args.size} size), {started:%Y-%m-%d %H:%M} UTC, "
        f"{meta['duration_s'] / 60:.1f} min, {os.cpu_count()} CPUs, load average at start "
        f"{meta['machine_at_start']['load_avg'][0]:.2f}, "
        f"commit {meta['machine_at_start']['git_commit']}"
        f"{' + working tree' if _dirty() else ''}.\n\n{table}\n"
    )
    print(table)
    print(
        f"\n{len(rows)} figures in {meta['duration_s'] / 60:.1f} min; wrote {out} and "
        f"{out.with_suffix('.md')}"
    )
    # Goals not met are figures to read, not a failure of the command; a crash is.
    return 1 if crashed else 0


def _dirty() -> bool:
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return bool(status.strip())


if __name__ == "__main__":
    sys.exit(main())
