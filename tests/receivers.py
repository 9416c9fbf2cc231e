"""Real HTTP servers inside the test's event loop: the app itself (SSE needs a real server, as
httpx.ASGITransport buffers responses), a webhook receiver that records what it gets, and one
that accepts connections and never answers; and a threaded receiver for tests without a loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import uvicorn


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app on a free 127.0.0.1 port in this event loop; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(
        app, loop="none", lifespan="off", log_level="warning", access_log=False,
        timeout_graceful_shutdown=1,
    ))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        sock.close()


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    # Wall-clock time of arrival (time.time()), to compare with the service's timestamps.
    at: float = field(default_factory=time.time)


@dataclass
class Receiver:
    """A webhook receiver: records every request, answers `statuses` in turn (then `default`)."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    default: int = 200
    delay_s: float = 0.0
    requests: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests.append(Received(headers=headers, body=body))
        self.arrived.set()
        status = self.statuses.pop(0) if self.statuses else self.default
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": f"answer {status}".encode()})

    async def wait_for(self, count: int, timeout_s: float = 20.0) -> list[Received]:
        """The requests once at least `count` arrived."""
        async with asyncio.timeout(timeout_s):
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.requests


class HangingReceiver:
    """A TCP server that accepts every connection, reads what comes and never answers."""

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self._changed = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        self._writers.add(writer)
        self._changed.set()
        try:
            while await reader.read(65536):
                pass  # until the client gives up and closes
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            self._writers.discard(writer)
            self._changed.set()
            writer.close()

    async def wait_open(self, count: int, timeout_s: float = 30.0) -> None:
        """Until at least `count` connections are open at once."""
        async with asyncio.timeout(timeout_s):
            while self.open < count:
                self._changed.clear()
                await self._changed.wait()

    async def wait_accepted(self, count: int, timeout_s: float = 30.0) -> None:
        """Until at least `count` connections were accepted in all."""
        async with asyncio.timeout(timeout_s):
            while self.accepted < count:
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def hanging(receiver: HangingReceiver) -> AsyncIterator[str]:
    """Serve `receiver` on a free 127.0.0.1 port; yields its base URL."""
    server = await asyncio.start_server(receiver._handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for writer in list(receiver._writers):
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)


@dataclass
class SseMessage:
    event: str | None = None
    id: str | None = None
    data: str = ""
    comment: str | None = None


async def sse_messages(lines: AsyncIterator[str]) -> AsyncIterator[SseMessage]:
    """Parse an SSE stream (httpx `aiter_lines()`) into messages, comments included."""
    message = SseMessage()
    seen = False
    async for line in lines:
        if not line:
            if seen:
                yield message
            message, seen = SseMessage(), False
            continue
        seen = True
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            message.comment = value
        elif name == "data":
            message.data = f"{message.data}\n{value}" if message.data else value
        elif name in ("event", "id"):
            setattr(message, name, value)


class ThreadedReceiver:
    """A webhook receiver in a thread (http.server), for tests outside an event loop; answers
    `statuses` in turn, then 200."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver.arrived:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver.received.append((headers, body))
                    receiver.arrived.notify_all()
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        """Block until `count` deliveries arrived (run it with asyncio.to_thread)."""
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.received) >= count, timeout)

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    """A Receiver served in this event loop, its `url` set to its /hooks/research."""
    receiver = Receiver()
    async with serve(receiver) as url:
        receiver.url = f"{url}/hooks/research"
        yield receiver
