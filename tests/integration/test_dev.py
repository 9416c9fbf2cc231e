"""A newcomer's first hour: `research-service dev` (`make run`) as a process, and what they do next.

The README's curl session runs as pasted (bash, curl and jq only), `keys` and `chat` find the
running stack through `.data/dev-stack.json` with nothing exported, push mode works against the
stack's own sandbox, a busy port is one line, and a dead worker is restarted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.devstack import free_port
from tests.processes import CHAT_QUESTIONS, healthy, stop_process_group
from tests.servers import clone_template, drop_database

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SANDBOX_SECRET = "a-secret-of-this-sandbox"  # not the default: dev must pass it on itself


@dataclass
class Dev:
    folder: Path  # where the newcomer types commands; `.data/` is in it
    env: dict[str, str]  # a newcomer's environment: no DATABASE_URL, no RESEARCH_*
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.folder / ".data" / "dev-stack.json").read_text())

    @property
    def key(self) -> str:
        return (self.folder / ".data" / "dev-api-key").read_text().strip()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never came; dev printed:\n{self.output()}")
            time.sleep(0.1)

    def run(self, *args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
        """`research-service ARGS` typed in another terminal of the same folder."""
        return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=self.folder,
                              env=self.env, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)


def newcomer_env() -> dict[str, str]:
    """This environment minus everything that would tell the service where things are."""
    drop = ("DATABASE_URL", "REDIS_URL", "PARALLEL_", "RESEARCH_", "PUBLIC_BASE_URL", "SANDBOX_",
            "WORKER_METRICS_PORT", "API", "KEY")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def start_dev(folder: Path, *args: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = folder / f"dev-{secrets.token_hex(3)}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "dev", *args], cwd=folder,
            env={**newcomer_env(), "LOG_FORMAT": "console", **env},
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return process, log


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str,
        redis_url: str) -> Iterator[Dev]:
    """`research-service dev` on free ports, on the tests' Postgres and Redis (so it starts
    quickly): the newcomer's commands get neither URL, only the folder."""
    folder = tmp_path_factory.mktemp("newcomer")
    name = f"research_dev_{secrets.token_hex(6)}"
    database_url = asyncio.run(clone_template(pg_admin_url, name))
    port = free_port()
    process, log = start_dev(
        folder, "--port", str(port), "--sandbox-port", str(free_port()),
        "--metrics-port", str(free_port()), DATABASE_URL=database_url, REDIS_URL=redis_url,
        QUEUE_NAME=f"dev:{secrets.token_hex(6)}", FOLLOWER_IDLE_S="0.1",
        SANDBOX_WEBHOOK_SECRET=SANDBOX_SECRET)
    stack = Dev(folder, newcomer_env(), process, log)
    try:
        deadline = time.monotonic() + 60
        while not healthy(f"http://127.0.0.1:{port}"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"research-service dev did not start:\n{stack.output()}")
            time.sleep(0.1)
        yield stack
    finally:
        stop_process_group(process)
        asyncio.run(drop_database(pg_admin_url, name))


def readme_session() -> str:
    return readme_blocks()[0]


def readme_blocks() -> list[str]:
    """The ```sh blocks of README.md's curl session, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A session with curl"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert blocks, "README.md's curl session has no ```sh block"
    return blocks


def json_values(text: str) -> list[Any]:
    """Every JSON value jq printed, in order (one-line and indented ones alike)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while (at := next((i for i in range(at, len(text)) if text[i] in "{["), -1)) >= 0:
        value, at = decoder.raw_decode(text, at)
        values.append(value)
    return values


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq") and shutil.which("bash")),
                    reason="the README's session needs bash, curl and jq")
def test_the_readme_curl_session_runs_as_pasted(dev: Dev) -> None:
    session = readme_session()
    assert "uuidgen" not in session and not re.search(r"<\w+>", session), "not pasteable"
    done = subprocess.run(["bash", "-e", "-c", session], cwd=dev.folder, env=dev.env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and not done.stderr, done.stdout + done.stderr
    conversation = re.match(r"conversation (conv_\w+)\n", done.stdout)
    assert conversation, done.stdout
    (posted, last, turns, events, branch, structured, cancelled, sources, transcript, busy,
     interrupted, instead, reseeded) = _split(json_values(done.stdout))
    assert [(t["seq"], t["status"]) for t in posted] == [(1, "queued"), (2, "queued"),
                                                         (3, "queued")]
    assert last["status"] == "completed" and last["sources"], last
    assert last["answer"].startswith(f'Answer to "{CHAT_QUESTIONS[2]}"')
    assert all(f'"{q}"' in last["answer"].split("Context:")[1] for q in CHAT_QUESTIONS[:2])
    assert [t["status"] for t in turns] == ["completed"] * 3
    assert turns[0]["previous_interaction_id"] is None  # each chained to the one before
    for earlier, later in itertools.pairwise(turns):
        assert later["previous_interaction_id"] == earlier["interaction_id"]
    completed = [e["turn_id"] for e in events if e["type"] == "turn.completed"]
    assert completed == [t["id"] for t in posted], events
    assert branch["seq"] == 4 and branch["parent_turn_id"] == posted[0]["id"]
    assert branch["status"] == "completed" and branch["answer"].endswith(
        f'Context: "{CHAT_QUESTIONS[0]}".')
    assert structured["status"] == "completed"
    countries = structured["content"]["countries"]
    assert isinstance(countries, list) and all(isinstance(c, str) for c in countries)
    assert cancelled["status"] == "cancelled"
    # The 5 completed turns' sources (the branch asked a new question: a new page), and the
    # branch's transcript: turn 1, then the branch, in JSON and in markdown.
    assert [s["turn_ids"] for s in sources[:3]] == [[t["id"]] for t in posted], sources
    later = [s["turn_ids"] for s in sources[3:]]  # the branch's page, then the JSON answer's
    assert len(later) == 2 and all(len(ids) == 1 for ids in later), sources
    assert len({ids[0] for ids in later} | {t["id"] for t in posted}) == 5, sources
    assert transcript["seqs"] == [1, 4] and transcript["turn_id"] == later[0][0]
    assert (f"# Winter Olympics\n## Turn 1\n> {CHAT_QUESTIONS[0]}\n## Turn 4\n> And in 2022?\n"
            in done.stdout), done.stdout[-2000:]
    assert busy == {"status": 409, "type": "/problems/conversation-busy"}
    assert interrupted["status"] == "cancelled"  # upstream_may_continue: whether it had started
    assert instead["status"] == "completed", instead
    assert instead["answer"].startswith('Answer to "Which came fifth?"')
    # Chained past the two cancelled turns to the structured one, the nearest completed.
    assert instead["previous_interaction_id"] is not None
    assert '"Top 3 countries by golds"' in instead["answer"].split("Context:")[1]
    assert reseeded == {"status": "completed", "context": "reseeded",
                        "previous_interaction_id": None}

    # Push mode out of the box: the 5 completed runs' webhooks reached this API, accepted (its
    # secret is not the default one, so dev passed the sandbox's own secret on).
    hooks = httpx.get(f"{dev.state['parallel_base_url']}/_sandbox/webhooks").json()["data"]
    assert len(hooks) >= 5 and {h["status_code"] for h in hooks} == {204}, hooks
    assert {h["url"] for h in hooks} == {f"{dev.state['api_url']}/v1/hooks/parallel"}
    assert "push mode: Parallel's webhooks come to" in dev.output()


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq") and shutil.which("bash")),
                    reason="the README's session needs bash, curl and jq")
def test_the_readme_filter_and_retention_block_runs_as_pasted(dev: Dev) -> None:
    first, block = readme_blocks()[:2]
    # The block runs in the session's terminal: its address and key lines come first.
    setup = [line for line in first.splitlines() if line.startswith(("API=", "auth=("))]
    assert len(setup) == 2, first
    done = subprocess.run(["bash", "-e", "-c", "\n".join([*setup, block])], cwd=dev.folder,
                          env=dev.env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and not done.stderr, done.stdout + done.stderr
    created, found, active, kept = json_values(done.stdout)
    assert created["ttl_seconds"] == 2592000 and created["expires_at"], created
    assert found == [{"title": "Case 4711", "metadata": {"customer": "c_42", "case": "4711"},
                      "status": "idle"}]
    assert isinstance(active["ids"], list) and "next_cursor" in active
    assert kept == {"ttl_seconds": None, "expires_at": None}


def _split(values: list[Any]) -> tuple[Any, ...]:
    """The session's outputs: 3 posted turns, the long-polled last one, 3 turns, the events
    (however many were logged by then), the branch, the structured turn, the cancelled one, the
    sources and the branch's transcript, the busy conversation's 409, the interrupted turn, the
    one asked instead and the reseeded one."""
    posted, last, turns = values[:3], values[3], values[4:7]
    events = values[7:-9]
    return posted, last, turns, events, *values[-9:]


def test_keys_and_chat_find_the_running_stack_without_exports(dev: Dev) -> None:
    created = dev.run("keys", "create", "--tenant", "x")
    assert created.returncode == 0, created.stdout + created.stderr
    key = created.stdout.strip().splitlines()[-1]
    answer = httpx.get(f"{dev.state['api_url']}/v1/conversations",
                       headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 200, "the key was made in the stack's own database"
    listed = dev.run("keys", "list")
    assert "\tx\t" in listed.stdout and "\tdev\t" in listed.stdout, listed.stdout + listed.stderr

    chat = dev.run("chat", stdin="\n".join([CHAT_QUESTIONS[0], "exit"]) + "\n")
    assert chat.returncode == 0, chat.stdout + chat.stderr
    assert f'Answer to "{CHAT_QUESTIONS[0]}" (processor lite).' in chat.stdout
    assert "[completed · turn 1 · " in chat.stdout and "Traceback" not in chat.stderr


def test_without_a_running_stack_keys_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / ".data").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a state file left by a dev that is gone does not count
    (tmp_path / ".data" / "dev-stack.json").write_text(json.dumps(
        {"pid": dead.pid, "database_url": "postgresql://nobody@127.0.0.1:1/gone"}))
    done = subprocess.run([sys.executable, "-m", "service.cli", "keys", "list"], cwd=tmp_path,
                          env=newcomer_env(), capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "DATABASE_URL is not set, and no `make run`" in done.stderr, done.stderr


def test_a_second_dev_on_the_same_data_is_one_line(dev: Dev) -> None:
    process, log = start_dev(dev.folder, "--port", str(free_port()), "--sandbox-port",
                             str(free_port()), "--metrics-port", "0")
    assert process.wait(timeout=30) == 1
    assert log.read_text().strip().splitlines() == [
        f"[dev] error: a dev stack already runs on {dev.folder / '.data'} (pid "
        f"{dev.process.pid}, API at {dev.state['api_url']}): stop it first or set "
        "RESEARCH_DATA_DIR"]


@pytest.mark.parametrize("busy", ["PORT", "SANDBOX_PORT", "WORKER_METRICS_PORT"])
def test_a_busy_port_is_one_line_before_anything_starts(tmp_path: Path, busy: str) -> None:
    ports = {"PORT": free_port(), "SANDBOX_PORT": free_port(), "WORKER_METRICS_PORT": free_port()}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[busy]))
        holder.listen()
        process, log = start_dev(
            tmp_path, "--port", str(ports["PORT"]), "--sandbox-port", str(ports["SANDBOX_PORT"]),
            "--metrics-port", str(ports["WORKER_METRICS_PORT"]),
            DATABASE_URL="postgresql://nobody@127.0.0.1:1/never-reached")
        assert process.wait(timeout=30) == 1
    [line] = log.read_text().strip().splitlines()  # no URL printed first, no traceback
    assert line.startswith(f"[dev] error: port {ports[busy]} (") and "already in use" in line
    assert line.endswith(f"make run {busy}=…"), line
    assert not (tmp_path / ".data" / "dev-stack.json").exists()


def test_a_wrong_webhook_secret_for_the_sandbox_is_reported_at_start_up(
        tmp_path: Path, pg_admin_url: str, redis_url: str) -> None:
    name = f"research_dev_{secrets.token_hex(6)}"
    database_url = asyncio.run(clone_template(pg_admin_url, name))
    process, log = start_dev(
        tmp_path, "--port", str(free_port()), "--sandbox-port", str(free_port()),
        "--metrics-port", "0", DATABASE_URL=database_url, REDIS_URL=redis_url,
        QUEUE_NAME=f"dev:{secrets.token_hex(6)}", PARALLEL_WEBHOOK_SECRET="not-the-sandboxs")
    try:
        deadline = time.monotonic() + 60
        while "[dev] API key:" not in (output := log.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, output
            time.sleep(0.1)
        assert ("[dev] WARNING: PARALLEL_WEBHOOK_SECRET is not the sandbox's webhook secret "
                "(SANDBOX_WEBHOOK_SECRET, docs/sandbox.md): every Parallel webhook will be "
                "refused with 401") in output
        assert "push mode: Parallel's webhooks come to" not in output
    finally:
        stop_process_group(process)
        asyncio.run(drop_database(pg_admin_url, name))


def test_a_dead_worker_is_restarted_and_dev_says_so(dev: Dev) -> None:
    # Last in this module: it kills the shared stack's worker.
    worker = dev.state["worker_pid"]
    os.kill(worker, signal.SIGKILL)
    dev.wait_for(f"[dev] worker (pid {worker}) was killed by SIGKILL after ")
    dev.wait_for("[dev] worker restarted (pid ")
    assert dev.state["worker_pid"] != worker
    os.kill(dev.state["worker_pid"], 0)  # raises unless the restarted worker is alive
    chat = dev.run("chat", stdin="After the restart?\nexit\n")
    assert '[completed · turn 1 · ' in chat.stdout, chat.stdout + chat.stderr


def test_the_default_ports_are_probed_without_settings(monkeypatch) -> None:
    # `make run` with no port given: the worker's metrics port is Settings' default (9102),
    # which may be free or taken on this machine; either way the answer is a socket or one line.
    from service.dev import DevError, _probe_ports

    port = free_port()
    try:
        sock = _probe_ports("127.0.0.1", port, {})
    except DevError as exc:
        assert str(exc).startswith("port 9102 (the worker's metrics) is already in use"), exc
    else:
        assert sock.getsockname() == ("127.0.0.1", port)
        sock.close()


def test_a_wrong_secret_for_a_sandbox_elsewhere_is_reported(sandbox, capsys) -> None:
    # PARALLEL_BASE_URL pointing at a sandbox started alone: its secret is read from /_sandbox.
    from service.dev import check_webhook_secret

    env = {"PUBLIC_BASE_URL": "http://127.0.0.1:1", "PARALLEL_BASE_URL": sandbox.url,
           "PARALLEL_WEBHOOK_SECRET": "not-the-sandboxs"}
    check_webhook_secret(env, None)
    assert "WARNING: PARALLEL_WEBHOOK_SECRET is not the sandbox's" in capsys.readouterr().out
    check_webhook_secret({**env, "PARALLEL_WEBHOOK_SECRET": sandbox.config.webhook_secret}, None)
    assert "push mode: Parallel's webhooks come to" in capsys.readouterr().out
    check_webhook_secret({**env, "PARALLEL_WEBHOOK_SECRET": ""}, None)
    assert "but PARALLEL_WEBHOOK_SECRET is not" in capsys.readouterr().out
