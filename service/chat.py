"""`research-service chat`: the README's interactive research loop, through this service's HTTP API.

Configured by RESEARCH_API_URL and RESEARCH_API_KEY; by default it talks to the `research-service
dev` (`make run`) running here, found through its state file and key file in `.data/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from service.models import TERMINAL_STATUSES

DEFAULT_API_URL = "http://127.0.0.1:8000"
Json = dict[str, Any]


class ApiError(Exception):
    """An error answer (shown by its problem+json `detail`), or the API cannot be reached."""


def default_api_key() -> str | None:
    if key := os.environ.get("RESEARCH_API_KEY", "").strip():
        return key
    with contextlib.suppress(OSError):
        path = Path(os.environ.get("RESEARCH_DATA_DIR", ".data")) / "dev-api-key"
        return path.read_text().strip() or None
    return None


def _problem(response: httpx.Response) -> str:
    with contextlib.suppress(ValueError):
        if isinstance(body := response.json(), dict) and (body.get("detail") or body.get("title")):
            return f"{response.status_code}: {body.get('detail') or body['title']}"
    return f"{response.status_code}: {response.text[:200] or response.reason_phrase}"


class Api:
    def __init__(self, url: str, key: str) -> None:
        self.http = httpx.Client(  # the event stream sends a heartbeat every 15 s
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(15.0, read=75.0))

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.send(method, path, **kwargs)
        return response.json() if response.content else None

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach {self.http.base_url}: {exc}") from None
        if response.status_code >= 400:
            raise ApiError(_problem(response))
        return response

    def pages(self, path: str, **params: Any) -> Iterator[Json]:
        while True:
            page = self.call("GET", path, params={**params, "limit": 100})
            yield from page.get("data") or []
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str, str | None]]:
    """(event, data, id) per server-sent event; comments (heartbeats) are skipped."""
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in event:
                yield event.get("event", "message"), event["data"], event.get("id")
            event = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data" and "data" in event:
                value = f"{event['data']}\n{value}"
            event[field] = value


def progress_text(payload: Any) -> str:
    """One line for a `turn.progress` event, read leniently: unknown shapes are just working…"""
    flat: Json = {}
    stack = [payload] if isinstance(payload, dict) else []
    while stack:  # fields may sit at the top, under `data` or under `source_stats`
        for key, value in stack.pop(0).items():
            stack.append(value) if isinstance(value, dict) else flat.setdefault(key, value)
    parts = []
    if isinstance(meter := flat.get("progress_meter"), int | float):
        parts.append(f"{meter:.0f}%")
    considered = flat.get("sources_considered", flat.get("num_sources_considered"))
    read = flat.get("sources_read", flat.get("num_sources_read"))
    if isinstance(considered, int) and considered > 0:
        parts.append(f"{read}/{considered} sources read" if isinstance(read, int)
                     else f"{considered} sources considered")
    if isinstance(message := flat.get("message"), str) and message.strip():
        parts.append(" ".join(message.split())[:100])
    return " · ".join(parts) or "working…"


def answer_text(turn: Json) -> str:
    content = (turn.get("output") or {}).get("content")
    return content if isinstance(content, str) else json.dumps(content, indent=2)


COMMANDS = "/sources (what was read), /transcript [TURN_ID] (what was said)"


class Chat:
    def __init__(self, api: Api, processor: str | None = None) -> None:
        self.api, self.base, self.last_event, self.processor = api, "", 0, processor
        self.tty, self.shown, self.line_open = sys.stdout.isatty(), "", False

    def progress(self, text: str) -> None:
        """One progress line: redrawn with \\r on a terminal, else plain lines (no repeats)."""
        if text != self.shown:
            self.shown, self.line_open = text, self.tty
            line = f"  … {text}"
            sys.stdout.write(f"\r\x1b[K{line[: shutil.get_terminal_size().columns - 1]}"
                             if self.tty else f"{line}\n")
            sys.stdout.flush()

    def clear_progress(self) -> None:
        sys.stdout.write("\r\x1b[K" if self.line_open else "")
        sys.stdout.flush()
        self.shown, self.line_open = "", False

    def open(self, conversation_id: str | None) -> None:
        """Create a conversation, or resume one: print its earlier turns, skip its old events."""
        if conversation_id is None:
            body = {"processor": self.processor} if self.processor else {}
            conversation = self.api.call("POST", "/v1/conversations", json=body)
        else:
            conversation = self.api.call("GET", f"/v1/conversations/{conversation_id}")
        self.base = f"/v1/conversations/{conversation['id']}"
        print(f"conversation {conversation['id']} (processor {conversation.get('processor')})")
        if self.processor and self.processor != conversation.get("processor"):
            print(f"  questions asked here use processor {self.processor}")
        if conversation_id is None:
            print(f"  resume it with: research-service chat --conversation {conversation['id']}")
            return
        for turn in self.api.pages(f"{self.base}/turns"):  # earlier turns, briefly
            question, error = turn.get("input"), (turn.get("error") or {}).get("message", "")
            text = (" ".join(answer_text(turn).split()) if turn.get("status") == "completed"
                    else f"[{turn.get('status')}] {error}")
            print(f"you> {question if isinstance(question, str) else json.dumps(question)}")
            print(f"  {text[:300]}{'…' if len(text) > 300 else ''}")
        for event in self.api.pages(f"{self.base}/events", after=0):
            self.last_event = max(self.last_event, int(event.get("sequence") or 0))

    def ask(self, question: str) -> None:
        body = {"input": question, **({"processor": self.processor} if self.processor else {})}
        turn = self.api.call("POST", f"{self.base}/turns", json=body)
        path = f"{self.base}/turns/{turn['id']}"
        try:
            turn = self.follow(turn, path)
        except KeyboardInterrupt:
            self.clear_progress()
            print("^C: cancelling the turn", flush=True)
            try:
                turn = self.api.call("POST", f"{path}/cancel")
            except ApiError as exc:  # 409: it ended first
                print(f"error: {exc}")
                turn = self.api.call("GET", path)
        self.show(turn)

    def follow(self, turn: Json, path: str) -> Json:
        """The turn once terminal: from the SSE stream, else by long-polling it."""
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(self.last_event)}
        mine = (None, turn["id"])
        try:
            with self.api.http.stream("GET", f"{self.base}/events", headers=headers) as response:
                if response.status_code != 200:
                    raise ApiError(f"{response.status_code} {response.reason_phrase}")
                for kind, data, ident in sse_events(response.iter_lines()):
                    if ident and ident.isdigit():
                        self.last_event = max(self.last_event, int(ident))
                    try:
                        payload = json.loads(data)
                    except ValueError:
                        payload = None
                    if kind == "turn.progress":
                        if not isinstance(payload, dict) or payload.get("turn_id") in mine:
                            self.progress(progress_text(payload))
                    elif isinstance(payload, dict) and payload.get("turn_id") == turn["id"]:
                        event_turn = payload.get("data") or {}
                        if event_turn.get("status") in TERMINAL_STATUSES:
                            return event_turn
                        self.progress(str(event_turn.get("status")))
        except (httpx.HTTPError, ApiError) as exc:
            self.clear_progress()
            print(f"  (event stream failed: {exc}; polling the turn instead)", flush=True)
        while turn["status"] not in TERMINAL_STATUSES:  # the stream failed or ended before the turn
            self.progress(turn["status"])
            turn = self.api.call("GET", path, params={"wait": 30})
        return turn

    def command(self, line: str) -> None:
        """A `/` command: /sources, /transcript [TURN_ID]."""
        name, *args = line.split()
        if name == "/sources" and not args:
            self.sources()
        elif name == "/transcript" and len(args) <= 1:
            params = {"turn_id": args[0]} if args else {}
            print(self.api.send("GET", f"{self.base}/transcript", params=params,
                                headers={"Accept": "text/markdown"}).text.rstrip("\n"))
        else:
            print(f"unknown command {line!r}; the commands are {COMMANDS}")

    def sources(self) -> None:
        """Every page the conversation's answers cited, once, with the turns (by seq) citing it."""
        sources = self.api.call("GET", f"{self.base}/sources").get("data") or []
        if not sources:
            print("(no sources yet: no completed turn cited any)")
            return
        seqs = {turn["id"]: turn.get("seq") for turn in self.api.pages(f"{self.base}/turns")}
        print(f"sources ({len(sources)}):")
        for number, source in enumerate(sources, 1):
            title = source.get("title") or ""
            print(f"  [{number}] {source['url']}" + (f" — {title}" if title else ""))
            cited = ", ".join(str(seqs.get(t, t)) for t in source.get("turn_ids") or [])
            print(f"      cited by turn{'s' if len(source.get('turn_ids') or []) > 1 else ''} "
                  f"{cited}")

    def show(self, turn: Json) -> None:
        self.clear_progress()
        status = turn.get("status")
        if status == "completed":
            print(answer_text(turn))
            cites = {c["url"]: c.get("title") or "" for field in turn.get("basis") or []
                     for c in field.get("citations") or [] if c.get("url")}
            print("citations:" if cites else "(no citations)")
            for number, (url, title) in enumerate(cites.items(), 1):
                print(f"  [{number}] {url}" + (f" — {title}" if title else ""))
        elif status == "failed":
            error = turn.get("error") or {}
            print(f"error {error.get('code', 'unknown')}: {error.get('message', '')}")
        elif status == "cancelled" and turn.get("upstream_may_continue"):
            print("(the upstream run may still finish, and be billed; its answer is dropped)")
        print(f"[{status} · turn {turn.get('seq')} · {turn.get('id')}]", flush=True)


def default_api_url() -> str:
    """RESEARCH_API_URL, else the API of the `make run` running here (its state file)."""
    if url := os.environ.get("RESEARCH_API_URL", "").strip():
        return url
    from service.devstack.state import read_state

    running = (read_state() or {}).get("api_url")
    return running if isinstance(running, str) else DEFAULT_API_URL


def run_chat(conversation_id: str | None = None, api_url: str | None = None,
             api_key: str | None = None, processor: str | None = None) -> int:
    url = api_url or default_api_url()
    if not (key := api_key or default_api_key()):
        print("no API key: set RESEARCH_API_KEY, or start `make run` (it writes .data/dev-api-key)",
              file=sys.stderr)
        return 2
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    chat = Chat(Api(url, key), processor)
    try:
        chat.open(conversation_id)
        print(f"ask a question, or {COMMANDS}")
        print("`exit`, `quit` or Ctrl-D leave; Ctrl-C cancels a running turn")
        while True:
            try:
                question = input("you> ").strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            if question.lower() in ("exit", "quit"):
                return 0
            try:
                if question.startswith("/"):
                    chat.command(question)
                elif question:
                    chat.ask(question)
            except (ApiError, KeyboardInterrupt) as exc:  # the loop goes on
                chat.clear_progress()
                print(f"error: {exc}" if isinstance(exc, ApiError) else "^C", flush=True)
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        chat.api.http.close()
