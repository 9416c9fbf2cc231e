"""The log writer: the info lines of one event-loop pass go out in one write, in order; warnings,
lines written outside a loop and what is pending at exit go out at once."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import textwrap

import structlog

from service.logs import LineWriter, configure_logging


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_info_lines_of_one_loop_pass_go_out_in_one_write_at_its_end():
    stream = CountingStream()
    writer = LineWriter(stream, coalesce=True)
    for n in range(5):
        writer.write(f"line {n}")
    assert stream.getvalue() == ""  # not yet: the pass is not over
    await asyncio.sleep(0)
    assert stream.getvalue().splitlines() == [f"line {n}" for n in range(5)]
    assert stream.writes == 1


async def test_a_warning_goes_out_at_once_after_what_is_pending():
    stream = CountingStream()
    writer = LineWriter(stream, coalesce=True)
    writer.write("info first")
    writer.write("the warning", urgent=True)
    assert stream.getvalue().splitlines() == ["info first", "the warning"]
    await asyncio.sleep(0)  # the flush the info line scheduled finds nothing left
    assert stream.getvalue().splitlines() == ["info first", "the warning"]


def test_outside_a_running_loop_each_line_goes_out_at_once():
    stream = CountingStream()
    writer = LineWriter(stream, coalesce=True)
    writer.write("no loop here")
    assert stream.getvalue() == "no loop here\n"


async def test_without_coalescing_each_line_goes_out_at_once():
    stream = CountingStream()
    LineWriter(stream).write("at once")
    assert stream.getvalue() == "at once\n"


async def test_structlog_and_the_standard_library_share_the_writer_and_its_order():
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("json", stream=stream, cache=False, coalesce=True)
    try:
        structlog.get_logger("ours").info("first")
        logging.getLogger("theirs").info("second")
        structlog.get_logger("ours").warning("third")
        lines = stream.getvalue().splitlines()
        events = [json.loads(line)["event"] for line in lines]
        assert events == ["first", "second", "third"]
    finally:
        root.handlers[:], root.level = handlers, level


def test_lines_pending_when_the_process_exits_are_written():
    script = textwrap.dedent("""
        import asyncio, sys
        from service.logs import LineWriter
        writer = LineWriter(sys.stderr, coalesce=True)

        async def main():
            writer.write("the last words")
            # The loop stops before the flush it scheduled runs: exit writes the line.
            asyncio.get_running_loop().stop()

        loop = asyncio.new_event_loop()
        loop.create_task(main())
        loop.run_forever()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "the last words" in done.stderr
