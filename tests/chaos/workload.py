"""ChaosClient: a client of the chaos run, on raw WebSockets so every connection is visible.

It behaves like the SDKs (docs/protocol.md, ``signalpost/client.py``): ``hello``, joins,
requests with ids, resumes with its resume token and the last ``epoch``/``offset`` it saw
per room on the next edge when its connection drops, and, like the SDK after a resume,
resends the requests still pending with the same ids. Unlike the SDK it writes everything
to the run's ``Journal`` (connections, signals, receptions, ``recovered`` frames), and the
faults can make it drop its connection on purpose:

- ``drop(half_open=False)``: abort the TCP connection (no close frame), then resume on the
  other edge;
- ``drop(half_open=True)``: keep the old connection open and reading, as after a network
  path that died only for the client, and resume on the other edge: the cluster must close
  the old one (4409) and never write to it again.

With regions (each ``Endpoint`` names its region), a client belongs to its home edge's
region. Like the SDKs' per-region URL lists (``signalpost/edge_plan.py``), a resume tries
the other edges of its own region first (its home edge first), then the edge it lost, and
only when all of those failed the other regions' edges; a fault moves it home later.

Every signal's ``data`` is ``{"chaos": [sender, room, seq], ...}``, with ``seq`` counting
the sender's signals in that room from 1, so the checker can tell each one apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.chaos.checker import (
    ConnectionLog,
    DepartureLog,
    Journal,
    Reception,
    RecoveryLog,
    RejoinLog,
    SentSignal,
)
from tests.helpers import token

log = logging.getLogger("signalpost.chaos")

Clock = Callable[[], float]

#: Joins a client tries when the cluster said it is no member of a room any more.
REJOIN_TRIES = 10

#: Reconnect delays: the first attempt is at once, then doubling up to the cap.
RECONNECT_FIRST = 0.05
RECONNECT_CAP = 1.0
#: Attempts before a client gives up on resuming (about 30 s of tries at the cap).
RECONNECT_ATTEMPTS = 40
#: Seconds to open a WebSocket and get the welcome.
OPEN_TIMEOUT = 3.0

_REPLIES = frozenset({"welcome", "joined", "left", "ack", "error", "pong", "watching"})


class HelloRefused(Exception):
    """The edge answered ``hello`` with something other than ``welcome``."""


@dataclass(slots=True, eq=False)
class _Link:
    """One WebSocket of the client and its journal entry."""

    log: ConnectionLog
    ws: ClientConnection
    reader: asyncio.Task[None] | None = None


@dataclass(slots=True, eq=False)
class _Pending:
    """A request waiting for its reply; resent with the same id after a resume."""

    request_id: int
    text: str
    future: asyncio.Future[dict[str, Any]]
    signal: SentSignal | None
    sent_on: int | None = None  # the connection number it was last sent on


@dataclass(slots=True, frozen=True)
class Endpoint:
    """An edge as the clients dial it."""

    edge: str
    url: str
    region: str = ""


@dataclass(eq=False)
class ChaosClient:
    """One session of the run: its rooms, its connections, its signals."""

    name: str
    rooms: tuple[str, ...]
    edges: Sequence[Endpoint]
    home: int
    journal: Journal
    clock: Clock
    request_timeout: float = 10.0
    session: str | None = None
    lost: bool = False  # a resume came back resumed: false; the client stopped
    positions: dict[str, tuple[str, int]] = field(default_factory=dict)
    _resume: str | None = None
    _edge_index: int = 0
    _current: _Link | None = None
    _up: asyncio.Event = field(default_factory=asyncio.Event)  # welcomed, pending resent
    _links: list[_Link] = field(default_factory=list)
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _pending: dict[int, _Pending] = field(default_factory=dict)
    _signal_of: dict[int, SentSignal] = field(default_factory=dict)  # request id -> signal
    _seqs: dict[str, int] = field(default_factory=dict)
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _reconnecting: asyncio.Task[None] | None = None
    _rejoining: set[str] = field(default_factory=set)
    _rejoin_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    stopping: bool = False  # the run is over: no reconnects, no notes

    # ----------------------------------------------------------------- lifecycle

    @property
    def ready(self) -> bool:
        """Connected and welcomed, pending requests resent."""
        return self._up.is_set() and self._current is not None

    @property
    def edge(self) -> str | None:
        """The edge of the current connection."""
        return self._current.log.edge if self._current is not None else None

    @property
    def home_edge(self) -> str:
        return self.edges[self.home].edge

    async def wait_ready(self, timeout: float) -> bool:
        """Wait (bounded) until the client is ready again, or lost; return ``ready``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout)
        return self.ready

    async def connect(self, attempts: int = 10) -> None:
        """Open the first connection (a new session) on the home edge."""
        self._edge_index = self.home
        for attempt in range(attempts):
            try:
                link = await self._open(resume=False)
            except (OSError, InvalidHandshake, TimeoutError, ConnectionClosed, HelloRefused):
                await asyncio.sleep(0.1 * (attempt + 1))
                continue
            self.session = link.log.session
            self._up.set()
            return
        raise RuntimeError(f"{self.name} could not connect to {self.edges[self.home].url}")

    async def close(self) -> None:
        """End the session (close 1000) and close every connection still open."""
        self.stopping = True
        for task in list(self._rejoin_tasks):
            task.cancel()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnecting
        for link in self._links:
            if link.log.closed_at is None:
                link.log.closed_by_client = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(link.ws.close(), 2.0)
                link.ws.transport.abort()
        for link in self._links:
            if link.reader is not None:
                link.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await link.reader
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.cancel()

    async def _open(self, *, resume: bool) -> _Link:
        endpoint = self.edges[self._edge_index % len(self.edges)]
        hello: dict[str, Any] = {"type": "hello", "token": token(self.name)}
        if resume:
            assert self._resume is not None
            hello["resume"] = self._resume
            hello["rooms"] = {
                room: {"epoch": epoch, "offset": offset}
                for room, (epoch, offset) in self.positions.items()
            }
        opened_at = self.clock()
        ws = await connect(
            endpoint.url,
            open_timeout=OPEN_TIMEOUT,
            max_size=None,
            compression=None,
            ping_interval=None,  # liveness is the faults' business, not the client's
            close_timeout=1.0,
        )
        record = ConnectionLog(self.name, next(self._numbers), endpoint.edge, opened_at)
        if resume:
            record.positions = {room: offset for room, (_epoch, offset) in self.positions.items()}
        self.journal.connections.append(record)
        link = _Link(record, ws)
        self._links.append(link)
        try:
            await ws.send(json.dumps(hello))
            async with asyncio.timeout(OPEN_TIMEOUT):
                frame = json.loads(await ws.recv())
        except BaseException:
            record.closed_at, record.closed_by_client = self.clock(), True
            ws.transport.abort()
            raise
        if frame.get("type") != "welcome":
            record.closed_at, record.closed_by_client = self.clock(), True
            ws.transport.abort()
            raise HelloRefused(str(frame))
        record.welcome_at = self.clock()
        record.resumed = bool(frame["resumed"])
        record.session = frame["session"]
        self._resume = frame["resume"]
        self._current = link
        link.reader = asyncio.create_task(self._read(link), name=f"chaos-{self.name}")
        return link

    async def _read(self, link: _Link) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in link.ws:
                try:
                    self._on_frame(link, raw)
                except Exception as exc:  # a frame we cannot read must not stop the reader
                    self.journal.note(self.clock(), self.name, f"unreadable frame {raw!r}: {exc!r}")
        link.log.closed_at = self.clock()
        link.log.close_code = link.ws.close_code
        if link is self._current and not self.stopping and not self.lost:
            self._current = None
            self._up.clear()
            link.log.abandoned_at = link.log.closed_at
            self._start_reconnect()

    def _start_reconnect(self) -> None:
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.create_task(self._reconnect())

    @property
    def region(self) -> str:
        return self.edges[self.home].region

    def resume_order(self) -> list[int]:
        """Edge indexes to try, in order, after losing the current connection: the other
        edges of the client's region (home first), then the lost one, then other regions'."""
        current = self._edge_index % len(self.edges)
        own = [i for i, e in enumerate(self.edges) if e.region == self.region]
        others = [i for i in own if i != current]
        others.sort(key=lambda i: i != self.home)
        lost = [current] if current in own else []
        away = [i for i, e in enumerate(self.edges) if e.region != self.region]
        return others + lost + away

    async def _reconnect(self) -> None:
        delay = RECONNECT_FIRST
        order = self.resume_order()
        for attempt in range(RECONNECT_ATTEMPTS):
            # The other edges first: this one may be the one that died.
            self._edge_index = order[attempt % len(order)]
            try:
                link = await self._open(resume=True)
            except Exception as exc:  # whatever failed, the next attempt may work
                log.info("%s: resume failed: %r", self.name, exc)
                await asyncio.sleep(delay)
                delay = min(RECONNECT_CAP, delay * 2)
                continue
            if not link.log.resumed:
                self._give_up(link)
                return
            if link is not self._current:
                continue  # dropped again before we got here: try again
            self._up.set()
            await self._send_pending()
            if link is self._current:
                return
            # Dropped while resending: its reader found this task running; go on here.
        self.journal.note(self.clock(), self.name, "gave up resuming")
        self.lost = True

    def _give_up(self, link: _Link) -> None:
        """The session is gone (resumed: false): stop; the checker reports it."""
        self.lost = True
        self._current = None
        self._up.set()  # wakes whoever waits for this client; ``ready`` stays false
        self.journal.note(self.clock(), self.name, "resume refused: new session; client stops")
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(ConnectionError("session lost"))
        link.log.closed_by_client = True
        link.ws.transport.abort()

    async def drop(self, *, half_open: bool) -> bool:
        """Drop the current connection (see the module docstring); False if there is none."""
        link = self._current
        if link is None or not self.ready or self.lost:
            return False
        self._current = None
        self._up.clear()
        link.log.abandoned_at = self.clock()
        if not half_open:
            link.log.closed_by_client = True
            link.ws.transport.abort()  # no close frame: the session is suspended
        self._start_reconnect()
        return True

    # ----------------------------------------------------------------- frames

    def _on_frame(self, link: _Link, raw: str | bytes) -> None:
        now = self.clock()
        frame: dict[str, Any] = json.loads(raw)
        kind = frame.get("type", "?")
        counted = link is self._current
        if not counted:
            link.log.after_abandon.append((now, str(kind)))
        if kind == "signal":
            self._on_signal(link, frame, now, counted)
            return
        if not counted:
            return
        if kind in ("peer-joined", "peer-left"):
            self._advance(frame["room"], frame["offset"])
            if kind == "peer-left" and not self.stopping:
                self.journal.departures.append(
                    DepartureLog(
                        self.name,
                        frame["room"],
                        str(frame["peer"].get("user")),
                        str(frame["reason"]),
                        now,
                        link.log.number,
                    )
                )
        elif kind == "recovered":
            member = "epoch" in frame
            self.journal.recoveries.append(
                RecoveryLog(
                    self.name,
                    frame["room"],
                    now,
                    bool(frame["recovered"]),
                    link.log.number,
                    member,
                )
            )
            room = frame["room"]
            if not member and room in self.rooms and not self.stopping:
                # Its room was lost with every broker that held it: join it again.
                self.positions.pop(room, None)
                if room not in self._rejoining:
                    self._rejoining.add(room)
                    task = asyncio.create_task(self._rejoin(room), name=f"rejoin-{self.name}")
                    self._rejoin_tasks.add(task)
                    task.add_done_callback(self._rejoin_tasks.discard)
        elif kind in _REPLIES and "id" in frame:
            self._on_reply(frame, now)
        elif kind == "error":
            self.journal.note(now, self.name, f"error without id: {frame}")

    def _on_signal(self, link: _Link, frame: dict[str, Any], now: float, counted: bool) -> None:
        data = frame.get("data", {})
        sender, _room, seq = data.get("chaos", ("?", "?", 0))
        self.journal.receptions.append(
            Reception(
                self.name,
                frame["room"],
                str(sender),
                int(seq),
                int(frame["offset"]),
                now,
                link.log.number,
                counted,
            )
        )
        if counted:
            self._advance(frame["room"], frame["offset"])

    def _advance(self, room: str, offset: int) -> None:
        position = self.positions.get(room)
        if position is not None:
            self.positions[room] = (position[0], offset)

    def _on_reply(self, frame: dict[str, Any], now: float) -> None:
        request_id = frame["id"]
        signal = self._signal_of.get(request_id)
        if signal is not None:
            if frame["type"] == "ack" and signal.acked_at is None:
                signal.acked_at = now  # a late ack (after giving up) still means accepted
            elif frame["type"] == "error":
                signal.refused = frame.get("code", "?")
        pending = self._pending.pop(request_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_result(frame)

    # ----------------------------------------------------------------- requests

    async def request(
        self, frame: dict[str, Any], signal: SentSignal | None = None
    ) -> dict[str, Any] | None:
        """Send a request and return its reply, or None when it was not answered in time."""
        if self.lost:
            return None
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        pending = _Pending(request_id, json.dumps({**frame, "id": request_id}), future, signal)
        if signal is not None:
            signal.request_id = request_id
            self._signal_of[request_id] = signal
        self._pending[request_id] = pending
        try:
            await self._send_pending()
            return await asyncio.wait_for(future, self.request_timeout)
        except (TimeoutError, ConnectionError):
            if signal is not None and signal.acked_at is None:
                signal.gave_up_at = self.clock()
            return None
        finally:
            self._pending.pop(request_id, None)

    async def _send_pending(self) -> None:
        """Send, in id order, every pending request not yet sent on the current connection."""
        async with self._send_lock:
            while True:
                link = self._current
                if link is None or not self._up.is_set():
                    return
                number = link.log.number
                unsent = sorted(
                    (p for p in self._pending.values() if p.sent_on != number),
                    key=lambda p: p.request_id,
                )
                if not unsent:
                    return
                for pending in unsent:
                    if link is not self._current:
                        break
                    pending.sent_on = number
                    if pending.signal is not None:
                        pending.signal.sent_on.append(number)
                    try:
                        await link.ws.send(pending.text)
                    except ConnectionClosed:
                        return  # the reader starts the resume, which resends

    async def _rejoin(self, room: str) -> None:
        """Join ``room`` again (the cluster said the session is no member of it any more),
        trying for up to ``REJOIN_TRIES`` request timeouts."""
        try:
            for _ in range(REJOIN_TRIES):
                reply = await self.request({"type": "join", "room": room})
                if reply is not None and reply.get("type") == "joined":
                    self.positions[room] = (reply["epoch"], reply["offset"])
                    self.journal.rejoins.append(RejoinLog(self.name, room, self.clock()))
                    return
                if self.lost or self.stopping:
                    return
                await asyncio.sleep(0.5)
            self.journal.note(self.clock(), self.name, f"could not join {room} again")
        finally:
            self._rejoining.discard(room)

    async def join_rooms(self, first_of: str | None = None) -> None:
        """Join every room of the client (not joined yet; ``first_of``: only the rooms
        named after that region, ``<region>-room-N``); remember each room's position."""
        for room in self.rooms:
            if room in self.positions:
                continue
            if first_of is not None and not room.startswith(f"{first_of}-"):
                continue
            reply = await self.request({"type": "join", "room": room})
            if reply is None or reply.get("type") != "joined":
                raise RuntimeError(f"{self.name} could not join {room}: {reply}")
            self.positions[room] = (reply["epoch"], reply["offset"])

    async def send_signal(
        self, room: str, to: ChaosClient | None, peers: Sequence[ChaosClient], marker: bool = False
    ) -> SentSignal:
        """Send one numbered signal to ``to`` (or the whole room) and wait for its outcome."""
        seq = self._seqs.get(room, 0) + 1
        self._seqs[room] = seq
        targets = (to.name,) if to is not None else tuple(p.name for p in peers)
        record = SentSignal(
            self.name, room, seq, to.name if to else None, targets, 0, self.clock(), marker
        )
        self.journal.signals.append(record)
        data = {"chaos": [self.name, room, seq], "session": self.session, "marker": marker}
        frame: dict[str, Any] = {"type": "signal", "room": room, "data": data}
        if to is not None:
            frame["to"] = to.session
        await self.request(frame, record)
        return record

    async def run_room(
        self,
        room: str,
        peers: Sequence[ChaosClient],
        stop: asyncio.Event,
        rng: random.Random,
        *,
        interval: tuple[float, float],
        depth: int,
    ) -> None:
        """Send signals to ``room`` until ``stop``: at most ``depth`` unanswered at once."""
        inflight: set[asyncio.Task[SentSignal]] = set()
        try:
            while not stop.is_set() and not self.lost:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), rng.uniform(*interval))
                if stop.is_set():
                    break
                if len(inflight) >= depth:
                    _done, inflight = await asyncio.wait(
                        inflight, return_when=asyncio.FIRST_COMPLETED
                    )
                live = [p for p in peers if not p.lost and p.session is not None]
                to = rng.choice(live) if live and rng.random() < 0.5 else None
                inflight.add(asyncio.create_task(self.send_signal(room, to, peers)))
            if inflight:
                await asyncio.wait(inflight)
        finally:
            for task in inflight:
                task.cancel()
