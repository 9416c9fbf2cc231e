"""One Postgres read per event per watched conversation per API process, shared by every watcher.

Each conversation that someone watches (an SSE stream, a `?wait=` long-poll) has one `Feed` in
the process. Its reader task is the only one that reads the conversation's new events. Most
notifications on the event hub carry their event (service.db.events): those the feed takes as
they are, without a read. It reads when a notification does not say everything (no event in it:
too large for a payload, a conversation deleted, the hub reconnected; or a gap in the sequence),
several such notifications during a read making one more read, and every `refresh_s` in case a
notification was lost or the conversation was deleted without one.
It keeps the newest events in memory; watchers take theirs from there and wait on `tick`, so
300 watchers of one conversation cost the reads one watcher costs. A watcher further behind than
the buffer reaches (a resume from an old Last-Event-ID) catches up with reads of its own first.

A feed outlives its last watcher by `LINGER_S`, still following the notifications: a client's
loop (the answer, the follow-up's POST, its long-poll) or a stream's reconnection finds it read
and subscribed, instead of reading the conversation's newest events again. Memory stays bounded
by the conversations watched in the last few seconds, each at most BUFFER events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import msgspec
import structlog

from service.db.pool import DB_UNAVAILABLE
from service.db.streams import FeedRead, read_feed
from service.models import TERMINAL_STATUSES, Event
from service.notify import EventHub

log = structlog.get_logger(__name__)

# Events kept in memory per feed; a read asks for at most this many.
BUFFER = 256
# Seconds a feed is kept after its last watcher leaves.
LINGER_S = 5.0


class Feed:
    """What one process knows of a watched conversation's events, and a tick when that grows."""

    def __init__(self, conversation_id: str) -> None:
        self.conversation_id = conversation_id
        self.last = 0  # the highest sequence read
        self.running: tuple[str, str] | None = None  # (turn id, run id) as of `last`
        self.gone = False  # the conversation was deleted
        self.broken = False  # Postgres could not be read: watchers end, clients reconnect
        self.reads = 0
        self.ready = asyncio.Event()
        self.watchers = 0
        self._events: list[Event] = []
        self._floor = 0  # _events holds every event with a sequence above this
        self._tick = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.retire: asyncio.TimerHandle | None = None  # while it lingers unwatched

    @property
    def tick(self) -> asyncio.Event:
        """Set at the next change: take it before looking at the feed, then wait on it."""
        return self._tick

    @property
    def ended(self) -> bool:
        return self.gone or self.broken

    def after(self, sequence: int) -> list[Event] | None:
        """The events read with a higher sequence; None when the buffer no longer reaches back
        that far (read them from Postgres)."""
        if sequence >= self.last:
            return []
        if sequence < self._floor:
            return None
        return [e for e in self._events if e.sequence > sequence]

    def apply(self, read: FeedRead, *, tail: bool) -> None:
        self.reads += 1
        if not read.exists:
            self.gone = True
        else:
            if tail:
                self._floor = read.events[0].sequence - 1 if len(read.events) == BUFFER else 0
            self._append([e for e in read.events if e.sequence > self.last])
            # The state and the events come from one snapshot, so they agree.
            self.running = read.running
        self._wake()

    def take_notified(self, payloads: list[str]) -> bool:
        """Take the events these notifications carry; False (taking none) when a read must
        tell the rest: one carries no event, or they leave a gap after `last`."""
        events = []
        for payload in payloads:
            if not payload:
                return False
            try:
                events.append(_decode_event(payload))
            except msgspec.DecodeError:
                return False
        new = sorted((e for e in events if e.sequence > self.last), key=lambda e: e.sequence)
        if [e.sequence for e in new] != list(range(self.last + 1, self.last + 1 + len(new))):
            return False
        if new:
            self._append(new)
            for event in new:  # the running turn, as read_feed would find it now
                turn = event.data
                if turn.status == "running" and turn.run_id is not None:
                    self.running = (turn.id, turn.run_id)
                elif self.running is not None and self.running[0] == turn.id:
                    self.running = None
            self._wake()
        return True

    def _append(self, new: list[Event]) -> None:
        """Keep these events (each newer than `last`, in order), the newest BUFFER of all."""
        self._events.extend(new)
        if len(self._events) > BUFFER:
            dropped = self._events[: len(self._events) - BUFFER]
            self._floor = dropped[-1].sequence
            del self._events[: len(dropped)]
        if new:
            self.last = new[-1].sequence

    def fail(self) -> None:
        self.broken = True
        self._wake()

    def _wake(self) -> None:
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()


class Feeds:
    """The process's feeds, one per watched conversation (on Resources, with the event hub)."""

    def __init__(
        self, pool: asyncpg.Pool, hub: EventHub, *, refresh_s: float, linger_s: float = LINGER_S
    ) -> None:
        self._pool = pool
        self._hub = hub
        self._refresh_s = refresh_s
        self._linger_s = linger_s
        self._feeds: dict[str, Feed] = {}

    def __len__(self) -> int:
        return len(self._feeds)

    def get(self, conversation_id: str) -> Feed | None:
        return self._feeds.get(conversation_id)

    @contextlib.asynccontextmanager
    async def join(self, conversation_id: str) -> AsyncIterator[Feed]:
        """The conversation's feed, read at least once, for the duration of the block."""
        feed = self._feeds.get(conversation_id)
        if feed is None or feed.ended:
            if feed is not None and feed.retire is not None:
                feed.retire.cancel()
                self._retire(feed)  # ended while it lingered
            feed = self._feeds[conversation_id] = Feed(conversation_id)
            feed.task = asyncio.create_task(self._follow(feed), name=f"feed:{conversation_id}")
        if feed.retire is not None:
            feed.retire.cancel()
            feed.retire = None
        feed.watchers += 1
        try:
            await feed.ready.wait()
            yield feed
        finally:
            feed.watchers -= 1
            if feed.watchers == 0:
                if feed.ended or self._linger_s <= 0:
                    self._retire(feed)
                else:
                    feed.retire = asyncio.get_running_loop().call_later(
                        self._linger_s, self._retire, feed)

    def _retire(self, feed: Feed) -> None:
        """Drop a feed nobody watches (again); its reader stops."""
        feed.retire = None
        if feed.watchers:
            return
        if self._feeds.get(feed.conversation_id) is feed:
            del self._feeds[feed.conversation_id]
        if feed.task is not None:
            feed.task.cancel()

    async def close(self) -> None:
        """Stop every feed; their watchers end."""
        tasks = [f.task for f in self._feeds.values() if f.task is not None]
        for feed in self._feeds.values():
            if feed.retire is not None:
                feed.retire.cancel()
            feed.fail()
        self._feeds.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, feed: Feed) -> None:
        """The feed's reader: subscribed before its first read, so no commit goes unseen."""
        notified: list[str] = [""]  # payloads since the last look; "": read
        try:
            with self._hub.subscribe(feed.conversation_id, notified) as woken:
                tail = True
                while not feed.ended:
                    woken.clear()  # before looking: a commit after this wakes the next wait
                    payloads = notified[:]
                    notified.clear()
                    more = False
                    if tail or not feed.take_notified(payloads):
                        read = await read_feed(
                            self._pool, feed.conversation_id, None if tail else feed.last, BUFFER
                        )
                        feed.apply(read, tail=tail)
                        more = not tail and len(read.events) == BUFFER
                    feed.ready.set()
                    tail = False
                    if more:
                        notified.append("")
                        continue
                    try:
                        await asyncio.wait_for(woken.wait(), self._refresh_s)
                    except TimeoutError:
                        notified.append("")
        except DB_UNAVAILABLE as exc:
            log.warning("feed_read_failed", conversation_id=feed.conversation_id, error=repr(exc))
            feed.fail()
        except Exception:
            log.exception("feed_error", conversation_id=feed.conversation_id)
            feed.fail()
        finally:
            feed.ready.set()


_event_decoder = msgspec.json.Decoder(Event)


def _decode_event(payload: str) -> Event:
    return _event_decoder.decode(payload)


def terminal_event_of(events: list[Event], turn_id: str) -> Event | None:
    """The event among these that ended the turn, if one did."""
    for event in events:
        if event.turn_id == turn_id and event.data.status in TERMINAL_STATUSES:
            return event
    return None
