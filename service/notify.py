"""Wake-ups from Postgres LISTEN/NOTIFY: one connection per process, many waiters.

Event inserts (and conversation deletes) notify channel `research_events` on commit: the
conversation id, then (for an event that fits in a payload) a space and the event as JSON. Waiters
are keyed by what comes before the first space; one that subscribes with a `payloads` list gets
the rest of each payload appended to it ("" when there is none, or when the connection was made
again and anything may have been missed). Waiters wait with a timeout and read Postgres whenever
a payload does not tell them everything, so a lost notification (the listening connection
dropped) costs latency, never correctness; in the API the only waiter per conversation is its
feed (service.domain.feeds), which reads for all watchers.
The worker's webhook dispatcher uses the same hub on channel `webhook_deliveries`. Other
channels can be followed on the same connection with `on_channel` (the API's key cache follows
`api_keys`); `epoch` changes whenever the connection is made or lost, so a cache can tell
whether it may have missed a notification.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator

import asyncpg
import structlog

from service.db.events import NOTIFY_CHANNEL

log = structlog.get_logger(__name__)


class EventHub:
    def __init__(self, dsn: str, channel: str = NOTIFY_CHANNEL) -> None:
        self._dsn = dsn
        self._channel = channel
        # Per key: each waiter's Event, and the list its payloads go to (None: not kept).
        self._waiters: defaultdict[str, dict[asyncio.Event, list[str] | None]] = defaultdict(dict)
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._handlers: dict[str, Callable[[str], None]] = {}
        # True while the listening connection is up; epoch counts its ups and downs.
        self.connected = False
        self.epoch = 0

    def on_channel(self, channel: str, handler: Callable[[str], None]) -> None:
        """Call handler(payload) for each notification on `channel`. Register before start()."""
        self._handlers[channel] = handler

    async def start(self) -> None:
        self._task = asyncio.create_task(self._keep_listening())

    async def close(self) -> None:
        self._closed = True
        if self._task:
            self._task.cancel()
            # The task ends cancelled, or with what the connection it was using raised.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._drop_connection()

    async def _keep_listening(self) -> None:
        while not self._closed:
            try:
                self._conn = await asyncpg.connect(self._dsn)
                await self._conn.add_listener(self._channel, self._on_notify)
                for channel, handler in self._handlers.items():
                    await self._conn.add_listener(
                        channel, lambda _c, _p, _ch, payload, handler=handler: handler(str(payload))
                    )
                lost = asyncio.Event()
                self._conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                self._set_connected(True)
                self._wake_all()  # anything missed while disconnected: re-read
                await lost.wait()
            except Exception as exc:  # any failure of this connection: make another one
                log.warning("listen_connection_failed", error=repr(exc))
            finally:
                self._set_connected(False)
                await self._drop_connection()
            await asyncio.sleep(1.0)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()  # no round trip: the connection may be the broken part

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.epoch += 1

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        # asyncpg's listener protocol types the payload as object; NOTIFY's is always text.
        key, _, rest = str(payload).partition(" ")
        for event, payloads in self._waiters.get(key, {}).items():
            if payloads is not None:
                payloads.append(rest)
            event.set()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for event, payloads in waiters.items():
                if payloads is not None:
                    payloads.append("")
                event.set()

    @contextlib.contextmanager
    def subscribe(
        self, key: str, payloads: list[str] | None = None
    ) -> Iterator[asyncio.Event]:
        """An Event set at each notification for `key` (a conversation id: a new event); with
        `payloads`, the rest of each notification's payload is appended to it. Subscribe before
        reading."""
        event = asyncio.Event()
        self._waiters[key][event] = payloads
        try:
            yield event
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.pop(event, None)
                if not waiters:
                    del self._waiters[key]
