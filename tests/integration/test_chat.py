"""`research-service chat` typed into through a pseudo-terminal, against `research-service dev`.

The dev command runs for real (migrations, sandbox, worker, API) on the tests' Postgres and Redis;
the chat client finds the API key where `dev` stored it, as it would after `make run`.
"""

from __future__ import annotations

import os
import pty
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.devstack import free_port
from tests.processes import CHAT_QUESTIONS, healthy, stop_process_group

pytestmark = pytest.mark.slow

class Terminal:
    """`research-service chat ARGS` on a pseudo-terminal (its controlling terminal, so ^C works)."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the chat client, nothing else
            os.execve(sys.executable, [sys.executable, "-m", "service.cli", "chat", *args], env)
        self.output, self.seen, self.closed = "", 0, False

    def _read(self, timeout: float) -> None:
        if self.closed or not select.select([self.fd], [], [], max(timeout, 0))[0]:
            return
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        self.closed = not data
        self.output += data.decode(errors="replace")

    def expect(self, text: str, timeout: float = 15) -> str:
        """Wait for `text` after what earlier calls saw; return the output up to its end."""
        deadline = time.monotonic() + timeout
        while (found := self.output.find(text, self.seen)) < 0:
            if self.closed or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never came; the terminal showed:\n{self.output}")
            self._read(deadline - time.monotonic())
        chunk, self.seen = self.output[self.seen: found + len(text)], found + len(text)
        return chunk

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.05)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        raise AssertionError(f"chat did not exit; the terminal showed:\n{self.output}")


@pytest.fixture
def dev(tmp_path: Path, database_url: str, redis_url: str) -> Iterator[dict[str, str]]:
    """`research-service dev` on free ports; yields the environment a chat client needs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARALLEL_", "RESEARCH_"))}
    env.update(RESEARCH_DATA_DIR=str(tmp_path), SANDBOX_PORT=str(free_port()),
               DATABASE_URL=database_url, REDIS_URL=redis_url, POLL_INITIAL_S="0.2",
               QUEUE_NAME=f"chat:{secrets.token_hex(6)}", FOLLOWER_IDLE_S="0.1",
               WORKER_METRICS_PORT="0")
    url = f"http://127.0.0.1:{free_port()}"
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "dev", "--port", url.rsplit(":", 1)[1]],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"research-service dev did not start:\n{log.read_text()}")
            time.sleep(0.1)
        chat_env = {k: v for k, v in env.items() if k != "DATABASE_URL"}
        yield {**chat_env, "RESEARCH_API_URL": url, "TERM": "dumb", "COLUMNS": "120"}
    finally:
        stop_process_group(process)


def _key(dev: dict[str, str]) -> str:
    return (Path(dev["RESEARCH_DATA_DIR"]) / "dev-api-key").read_text().strip()


def test_three_chained_questions_then_exit(dev: dict[str, str]) -> None:
    chat = Terminal(dev)
    assert "resume it with: research-service chat --conversation " in chat.expect("you> ")
    for number, question in enumerate(CHAT_QUESTIONS):
        chat.type(question + "\n")
        shown = chat.expect("you> ", timeout=20)
        assert f'Answer to "{question}"' in shown, shown
        for earlier in CHAT_QUESTIONS[:number]:  # later turns were chained to the earlier ones
            assert f'"{earlier}"' in shown.split("Answer to", 1)[1], shown
        assert "citations:\r\n  [1] https://example.org/" in shown, shown
        assert f"[completed · turn {number + 1} · " in shown, shown
    chat.type("\n")  # an empty line is ignored
    chat.expect("you> ")
    chat.type("exit\n")
    assert chat.wait() == 0
    assert "Traceback" not in chat.output


def test_resume_shows_earlier_turns_and_ctrl_d_exits(dev: dict[str, str]) -> None:
    first = Terminal(dev)
    conversation_id = first.expect("you> ").split("conversation ", 1)[1].split()[0]
    first.type(CHAT_QUESTIONS[0] + "\n")
    first.expect("[completed · turn 1")
    first.expect("you> ")
    first.type("quit\n")
    assert first.wait() == 0

    again = Terminal(dev, "--conversation", conversation_id)
    intro = again.expect("Ctrl-C cancels a running turn")  # earlier turns also start with you>
    again.expect("you> ")
    assert f"conversation {conversation_id}" in intro
    first_question, second_question = CHAT_QUESTIONS[:2]
    assert f"you> {first_question}" in intro and f'Answer to "{first_question}"' in intro, intro
    again.type(second_question + "\n")
    shown = again.expect("[completed · turn 2", timeout=20)
    assert (f'Answer to "{second_question}" (processor lite). Context: "{first_question}"'
            in shown)
    again.expect("you> ")
    again.type("\x04")  # Ctrl-D
    assert again.wait() == 0


def test_failed_turn_then_ctrl_c_cancels_a_running_turn(dev: dict[str, str]) -> None:
    chat = Terminal(dev)
    conversation_id = chat.expect("you> ").split("conversation ", 1)[1].split()[0]
    chat.type("How many medals did they win? [sandbox:fail]\n")  # the sandbox fails this run
    shown = chat.expect("you> ", timeout=20)
    assert re.search(r"(\n|\x1b\[K)error \w+: \S", shown) and "[failed · turn 1 · " in shown, shown
    chat.type("Which country came third? [sandbox:slow=20]\n")  # a run of 20 s
    chat.expect("… running", timeout=20)
    chat.type("\x03")  # Ctrl-C, through the terminal
    shown = chat.expect("you> ", timeout=10)
    assert "cancelling the turn" in shown and "[cancelled · turn 2 · " in shown, shown
    turns = httpx.get(f"{dev['RESEARCH_API_URL']}/v1/conversations/{conversation_id}/turns",
                      headers={"Authorization": f"Bearer {_key(dev)}"}).json()["data"]
    assert [turn["status"] for turn in turns] == ["failed", "cancelled"]
    chat.type("exit\n")
    assert chat.wait() == 0

    missing = Terminal(dev, "--conversation", "conv_does_not_exist")
    assert missing.wait() == 1
    assert "404" in missing.output and "not found" in missing.output.lower()


def test_processor_sources_and_transcript_commands(dev: dict[str, str]) -> None:
    chat = Terminal(dev, "--processor", "base")
    intro = chat.expect("you> ")
    assert "(processor base)" in intro and "/sources" in intro and "/transcript" in intro, intro
    conversation_id = intro.split("conversation ", 1)[1].split()[0]
    chat.type("/sources\n")
    assert "(no sources yet" in chat.expect("you> ")
    first_question, second_question = CHAT_QUESTIONS[:2]
    for number, question in enumerate((first_question, second_question), 1):
        chat.type(question + "\n")
        shown = chat.expect("you> ", timeout=20)
        assert f'Answer to "{question}" (processor base).' in shown, shown
        assert f"[completed · turn {number} · " in shown, shown
    turns = httpx.get(f"{dev['RESEARCH_API_URL']}/v1/conversations/{conversation_id}/turns",
                      headers={"Authorization": f"Bearer {_key(dev)}"}).json()["data"]
    assert [turn["processor"] for turn in turns] == ["base", "base"]
    urls = [c["url"] for turn in turns for field in turn["basis"] for c in field["citations"]]

    chat.type("/sources\n")
    shown = chat.expect("you> ")
    assert "sources (2):" in shown, shown
    assert f"[1] {urls[0]}" in shown and f"[2] {urls[1]}" in shown, shown
    assert shown.count("cited by turn ") == 2 and "cited by turn 2" in shown, shown

    chat.type("/transcript\n")
    shown = chat.expect("you> ")
    assert shown.index("## Turn 1") < shown.index(f"> {first_question}") < shown.index(
        "## Turn 2") < shown.index(f"> {second_question}"), shown
    assert f"1. [Sandbox source for {second_question}]({urls[1]})" in shown, shown
    chat.type(f"/transcript {turns[0]['id']}\n")  # the lineage of turn 1 only
    shown = chat.expect("you> ")
    assert "## Turn 1" in shown and "## Turn 2" not in shown, shown
    chat.type("/transcript turn_does_not_exist\n")
    assert "error: 404" in chat.expect("you> ")
    chat.type("/nonsense\n")
    assert "unknown command '/nonsense'" in chat.expect("you> ")
    chat.type("exit\n")
    assert chat.wait() == 0
    assert "Traceback" not in chat.output

    # Resumed with another processor: the conversation keeps its own, the questions use this.
    again = Terminal(dev, "--conversation", conversation_id, "--processor", "lite")
    assert "questions asked here use processor lite" in again.expect("Ctrl-C cancels")
    again.expect("you> ")
    again.type(CHAT_QUESTIONS[2] + "\n")
    assert f'Answer to "{CHAT_QUESTIONS[2]}" (processor lite).' in again.expect("you> ", 20)
    again.type("exit\n")
    assert again.wait() == 0
