"""Python asyncio client SDK for the signalpost protocol (docs/protocol.md).

    async with SignalpostClient([edge_url], token) as client:
        joined = await client.join("room-1")
        await client.signal("room-1", {"kind": "offer", "sdp": sdp}, to=peer_session)
        event = await client.next_event(SignalEvent)

Requests get ids and await their reply (``RequestRefused`` carries an ``error`` frame's
code). Everything else arrives as typed events. When the connection drops without a clean
close, the client reconnects (to the next URL, with ``backoff``) and resumes: it sends its
resume token and the last ``epoch``/``offset`` it saw per room, and the cluster replays
what it missed. A ``Resumed`` event tells how that went. The users it watches are watched
again after every reconnect (the new edge, or a presence service that restarted meanwhile,
may not know them); a status that changed while away arrives as a ``PresenceChanged``.

Regions (docs/multi-region.md). ``urls`` may be ``{"eu": [...], "us": [...]}``: the
regions in the order to fall back in (``signalpost.edge_plan.EdgePlan``). The client moves
to a region's next URL after each failed try or drop, and to the next region when every
URL of the region failed in a row; a welcome keeps it in the region it reached; the
session resumes in another region like on any edge. ``connect`` tries every URL once. With
``nearest=True`` it first times each region (``measure_regions``) and tries the nearest
first. A string or a list is one region (``""``), as before.

Requests across a dropped connection (docs/protocol.md "Retrying a request"). An id names
one request of the session: the counter never restarts, so a resend with the same id is
the same request, which the cluster applies at most once and answers with the reply it
recorded. A drop does not fail the requests waiting for a reply; each keeps its one
deadline (``request_timeout`` from the call). After the reconnect:

- ``resumed: true``: the client sends, after the ``welcome`` and the re-watch, every
  request still waiting, with its id, in the order they were first made; then the
  requests made while reconnecting (they wait, in order, instead of failing).
- ``resumed: false`` (a new session; the old one and its rooms are gone): the requests
  that had been sent fail with ``SessionLost`` (they may or may not have been applied);
  those made while reconnecting were never sent and go out on the new session.

The cluster recognises a resend for 120 s and among the session's last 1024 requests:
``request_timeout`` keeps well within the first, and an edge lets a connection have at
most 1024 requests waiting (more are refused with ``rate_limited``).

Every request ends exactly once: its reply, ``RequestRefused``, ``RequestTimeout`` (a
reply after that is ignored, like any reply to an id not waiting), ``SessionLost``,
``ConnectionLost`` (sent, and the session will not be resumed: a final close code,
``auto_resume`` off or every reconnect attempt failed), or ``SessionClosed`` (``close()``
was called, or the session ended for good before the request was sent).

An edge that is busy refuses a connection with close 4503 and a ``retry_after_ms`` in the
reason (a connection cap, or its accept rate during a reconnect storm): ``connect`` and
the reconnect loop then wait that long plus up to as much again of jitter instead of the
backoff delay (``TryAgainLater``, ``retry_delay``); each such try counts against
``max_reconnect_attempts``. A refused resume leaves the session as it was: the next try
resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from signalpost.edge_plan import EdgePlan, Urls, probe_url, rank_regions, regions_of, summarize
from signalpost.errors import CloseCode, SignalpostError

log = logging.getLogger("signalpost.client")

#: Close codes after which reconnecting cannot help.
FINAL_CLOSE_CODES = frozenset(
    {
        CloseCode.NORMAL,
        CloseCode.ABUSE,
        CloseCode.UNAUTHORIZED,
        CloseCode.ORIGIN_REFUSED,
        CloseCode.RATE_LIMITED,
        CloseCode.REPLACED,
        CloseCode.KICKED,
    }
)
#: The close reason of a 4503 (try again later): ``retry_after_ms=<int> <kind>``.
_RETRY_AFTER = re.compile(r"^retry_after_ms=(\d+)")
#: How long to wait after a 4503 whose reason names no delay (seconds).
DEFAULT_RETRY_AFTER = 1.0

#: (room, epoch) pairs whose highest offset seen is kept past a leave (the oldest go first).
MAX_SEEN_POSITIONS = 256

_REPLY_TYPES = frozenset(
    {"welcome", "joined", "left", "ack", "watching", "unwatched", "pong", "ice-servers", "error"}
)


class ClientError(SignalpostError):
    """Base of the client SDK's errors.

    ``RequestRefused`` carries the server's error code; the others are the SDK's own and
    carry the code the browser SDK gives the same failure (``code`` below).
    """


class RequestRefused(ClientError):
    """The server answered a request with an ``error`` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RequestTimeout(ClientError, TimeoutError):
    """No reply within ``request_timeout``; a reply that comes later is ignored."""

    code = "timeout"


class ConnectionLost(ClientError):
    """The connection dropped and the session will not be resumed (a final close code,
    ``auto_resume`` off, or every reconnect attempt failed) before the reply: the request
    may or may not have been applied."""

    code = "connection_lost"


class SessionLost(ClientError):
    """A reconnect began a new session (``resumed: false``) while the request, already
    sent, waited for its reply: the old session and its rooms are gone, and the request
    may or may not have been applied."""

    code = "session_lost"


class TryAgainLater(ClientError):
    """The edge refused the connection for now (close 4503: a connection cap or the accept
    rate during a reconnect storm) and said when to come back: ``retry_after`` seconds.
    The client waits that long plus up to as much again of random jitter, then retries
    (``connect`` and every reconnect, within ``max_reconnect_attempts``)."""

    code = "try_again_later"

    def __init__(self, retry_after: float, reason: str) -> None:
        super().__init__(f"edge busy, retry after {retry_after:.3f} s ({reason})")
        self.retry_after = retry_after
        self.reason = reason


def retry_after_of(reason: str) -> float:
    """Seconds to wait from a 4503 close reason (docs/protocol.md "Close codes")."""
    match = _RETRY_AFTER.match(reason)
    return int(match.group(1)) / 1000.0 if match else DEFAULT_RETRY_AFTER


def retry_delay(retry_after: float, rng: random.Random | None = None) -> float:
    """The wait after a 4503: ``retry_after`` plus full jitter of as much again."""
    return retry_after + (rng or random).uniform(0, retry_after)


class SessionClosed(ClientError):
    """The session ended for good (closed by us, or a close code that forbids retrying).

    A request fails with it when ``close()`` is called while it waits, or when the session
    ends for good before it was sent (the browser SDK's ``closed``). ``code`` is the
    WebSocket close code."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"session closed ({code}) {reason}".strip())
        self.code = code


# --------------------------------------------------------------------------- events


class _Event(msgspec.Struct, tag_field="type", frozen=True, kw_only=True):
    pass


class Peer(msgspec.Struct, frozen=True):
    session: str
    user: str
    meta: dict[str, Any] = {}
    name: str | None = None


class Sender(msgspec.Struct, frozen=True):
    session: str
    user: str
    #: Published through the server API (session and user ``~server``; ``key``: the API
    #: key's name), not by a member (docs/server-api.md).
    server: bool = False
    key: str | None = None


class PeerJoined(_Event, tag="peer-joined", frozen=True):
    room: str
    peer: Peer
    offset: int


class PeerLeft(_Event, tag="peer-left", frozen=True):
    room: str
    peer: Peer
    reason: Literal["left", "disconnected", "timeout"]
    offset: int


class SignalEvent(_Event, tag="signal", frozen=True):
    room: str
    data: dict[str, Any]
    offset: int
    sender: Sender = msgspec.field(name="from")


class RoomClosed(_Event, tag="room-closed", frozen=True):
    """The server API closed the room: the session has left it (docs/protocol.md)."""

    room: str
    offset: int
    reason: str = ""


class PresenceChanged(_Event, tag="presence", frozen=True):
    user: str
    status: Literal["online", "offline"]
    #: The user's status version (docs/protocol.md): a frame with the status known and a
    #: version not above its own repeats what the client was told, and is dropped.
    version: int = 0


class Recovered(_Event, tag="recovered", frozen=True):
    room: str
    recovered: bool
    #: Where the session's stream in the room stands now (None: not a member).
    epoch: str | None = None
    offset: int | None = None


class Resumed(_Event, tag="resumed", frozen=True):
    """Client-side: the connection came back; ``resumed`` is the welcome's flag."""

    session: str
    resumed: bool


class Disconnected(_Event, tag="disconnected", frozen=True):
    """Client-side: the connection dropped; a resume follows unless ``final``."""

    code: int | None
    final: bool


ServerEvent = PeerJoined | PeerLeft | SignalEvent | PresenceChanged | Recovered | RoomClosed
Event = ServerEvent | Resumed | Disconnected
EventT = TypeVar("EventT", bound=_Event)


@dataclass(frozen=True, slots=True)
class RoomPosition:
    epoch: str
    offset: int


@dataclass(slots=True, eq=False)
class _Request:
    """A request waiting for its reply, with its frame as sent (id included) to resend."""

    id: int
    kind: str
    text: str
    future: asyncio.Future[dict[str, Any]]
    deadline: float  # loop time: request_timeout from the call, across reconnects
    sent: bool = False  # written to some connection: in doubt until answered


async def time_get(url: str, timeout: float, ssl: SSLContext | None = None) -> float | None:
    """Seconds a ``GET url`` took to be answered 200 (connect included); None: it failed,
    answered otherwise or took longer than ``timeout``."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=(ssl or True) if secure else None
            )
            writer.write(
                f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            status = await reader.readline()
        elapsed = loop.time() - started
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
    return elapsed if status.split(b" ")[1:2] == [b"200"] else None


def backoff(
    initial: float = 0.1,
    maximum: float = 5.0,
    factor: float = 2.0,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Reconnect delays: exponential growth capped at ``maximum``, with full jitter."""
    rng = rng or random.Random()
    for attempt in itertools.count():
        yield rng.uniform(0, min(maximum, initial * factor**attempt))


class SignalpostClient:
    """One signalpost session, kept alive across reconnects."""

    def __init__(
        self,
        urls: Urls,
        token: str | Callable[[], str],
        *,
        auto_resume: bool = True,
        request_timeout: float = 5.0,
        max_reconnect_attempts: int = 20,
        origin: str | None = None,
        ssl: SSLContext | None = None,
        nearest: bool = False,
        probe_samples: int = 3,
        probe_timeout: float = 1.0,
    ) -> None:
        #: Where to connect: a URL, a list tried in turn, or ``{region: [urls]}`` with the
        #: regions in the order to fall back in (``signalpost.edge_plan``).
        self.plan = EdgePlan(regions_of(urls))
        self.urls = self.plan.urls
        #: With ``nearest`` and two or more regions, ``connect`` first times a GET of each
        #: region's first edge's ``/healthz`` (``probe_samples`` each, ``probe_timeout``
        #: seconds at most each) and tries the nearest region first.
        self.nearest = nearest
        self.probe_samples = probe_samples
        self.probe_timeout = probe_timeout
        self.region_rtts: dict[str, float | None] = {}
        #: TLS client context for ``wss://`` URLs (None: the system's CAs, hostname checked);
        #: e.g. ``ssl.create_default_context(cafile=...)`` for an edge with a private CA.
        self.ssl = ssl
        self._token = token
        self.auto_resume = auto_resume
        self.request_timeout = request_timeout
        self.max_reconnect_attempts = max_reconnect_attempts
        self.origin = origin
        self.session: str | None = None
        self.user: str | None = None
        self.resume_token: str | None = None
        self.ice_servers: list[dict[str, Any]] = []
        self.positions: dict[str, RoomPosition] = {}
        # The highest offset seen per (room, epoch), kept past a leave: a ``joined`` answer
        # never starts a room below it (``_joined``). Room -> the epoch last known there.
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._epoch_of: OrderedDict[str, str] = OrderedDict()
        self.welcome: dict[str, Any] = {}
        self.close_code: int | None = None
        self._ws: ClientConnection | None = None
        # One counter per client, never restarted: ids stay unique within the session
        # across reconnects, so a resend with the same id is the same request.
        self._ids = itertools.count(1)
        self._pending: dict[int, _Request] = {}  # in id order: the order to resend in
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._connected = asyncio.Event()
        self.presence: dict[str, str] = {}  # watched user -> last status known
        self.presence_versions: dict[str, int] = {}  # watched user -> its status's version
        self._rewatching: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """The edge URL in use (or to be tried next)."""
        return self.plan.url

    @property
    def region(self) -> str:
        """The region of ``url`` (``""`` when the URLs were given without regions)."""
        return self.plan.region

    async def connect(self) -> dict[str, Any]:
        """Open the connection and authenticate; return the ``welcome`` frame.

        With ``nearest``, the regions are tried nearest first (``measure_regions``). An
        edge that cannot be reached gives way to the next (every URL is tried once, by
        region, before the last error is raised). An edge that answers 4503 (busy: try
        again later) is tried again after the delay it asked for plus jitter, up to
        ``max_reconnect_attempts`` times."""
        if self.nearest and len(self.plan.regions) > 1:
            await self.measure_regions()
        unreachable = 0
        for attempt in itertools.count(1):
            try:
                welcome = await self._open(resume=False)
                break
            except TryAgainLater as exc:
                if attempt >= self.max_reconnect_attempts:
                    raise
                log.info("connecting: %s", exc)
                await asyncio.sleep(retry_delay(exc.retry_after))
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                unreachable += 1
                if unreachable >= len(self.urls):
                    raise
                log.info("connecting to %s failed: %s", self.url, exc)
                self.plan.failed()
        self.plan.succeeded()
        await self._flush()  # requests made while connecting
        self._connected.set()
        self._reader = asyncio.create_task(self._read_forever(), name="signalpost-client")
        return welcome

    async def measure_regions(self) -> dict[str, float | None]:
        """Time each region's first edge (a GET of its ``/healthz``, ``probe_samples``
        times, each within ``probe_timeout``; all regions at once), then try the regions
        nearest first. Returns (and keeps in ``region_rtts``) the median round trip per
        region in seconds; None: no sample answered 200."""
        names = [name for name, _ in self.plan.regions]

        async def region_rtt(urls: list[str]) -> float | None:
            target = probe_url(urls[0])
            samples = [
                await time_get(target, self.probe_timeout, self.ssl)
                for _ in range(max(1, self.probe_samples))
            ]
            return summarize(samples)

        rtts = await asyncio.gather(*(region_rtt(urls) for _, urls in self.plan.regions))
        self.region_rtts = dict(zip(names, rtts, strict=True))
        self.plan.prefer(rank_regions(names, self.region_rtts))
        log.info("regions by round trip: %s", self.region_rtts)
        return dict(self.region_rtts)

    async def close(self) -> None:
        """End the session cleanly (close 1000: the cluster drops it at once); requests
        still waiting fail with ``SessionClosed``."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        for task in (self._reader, self._rewatching):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._fail_pending(self._ended)

    async def __aenter__(self) -> SignalpostClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _open(self, *, resume: bool) -> dict[str, Any]:
        token = self._token() if callable(self._token) else self._token
        url = self.url
        extra: dict[str, Any] = {}
        if self.ssl is not None and url.startswith("wss:"):
            extra["ssl"] = self.ssl  # websockets refuses it with a ws:// URL (lists may mix)
        ws = await connect(
            url,
            max_size=None,
            compression=None,
            origin=self.origin,  # type: ignore[arg-type]
            open_timeout=self.request_timeout,
            **extra,
        )
        hello: dict[str, Any] = {"type": "hello", "token": token}
        if resume and self.resume_token:
            hello["resume"] = self.resume_token
            hello["rooms"] = {
                room: {"epoch": p.epoch, "offset": p.offset} for room, p in self.positions.items()
            }
        try:
            await ws.send(msgspec.json.encode(hello).decode())
            raw = await asyncio.wait_for(ws.recv(), self.request_timeout)
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == CloseCode.TRY_AGAIN_LATER:
                raise TryAgainLater(retry_after_of(exc.rcvd.reason), exc.rcvd.reason) from None
            raise SessionClosed(exc.rcvd.code if exc.rcvd else None, "during hello") from None
        frame: dict[str, Any] = msgspec.json.decode(raw)
        if frame.get("type") != "welcome":
            await ws.close()
            raise RequestRefused(frame.get("code", "unknown"), frame.get("message", str(frame)))
        self._ws = ws
        self.welcome = frame
        if not frame["resumed"]:
            self.positions.clear()
            self._seen.clear()
            self._epoch_of.clear()
        self.session, self.user = frame["session"], frame["user"]
        self.resume_token = frame["resume"]
        self.ice_servers = frame.get("ice_servers", [])
        return frame

    async def _read_forever(self) -> None:
        while True:
            ws = self._ws
            assert ws is not None
            try:
                async for raw in ws:
                    self._on_frame(msgspec.json.decode(raw))
            except ConnectionClosed:
                pass
            code = ws.close_code
            self._connected.clear()  # requests made from now on wait for the resume
            final = self._closing or not self.auto_resume or code in FINAL_CLOSE_CODES
            self._events.put_nowait(Disconnected(code=code, final=final))
            if not final and await self._reconnect():
                continue
            self.close_code = code
            self._fail_pending(self._ended)
            if not final:
                self._events.put_nowait(Disconnected(code=code, final=True))
            return

    async def _reconnect(self) -> bool:
        delays = backoff()
        delay = next(delays)
        for _attempt in range(self.max_reconnect_attempts):
            await asyncio.sleep(delay)
            delay = next(delays)
            # The next edge (this one may be the one that died, or busy); when every edge
            # of the region failed in a row, the next region's: the session resumes there.
            self.plan.failed()
            try:
                welcome = await self._open(resume=True)
            except TryAgainLater as exc:  # busy (4503): wait as long as it asked, and jitter
                log.info("reconnect to %s refused for now: %s", self.url, exc)
                delay = retry_delay(exc.retry_after)
                continue
            except (OSError, InvalidHandshake, TimeoutError, ClientError) as exc:
                log.info("reconnect to %s failed: %s", self.url, exc)
                continue
            self.plan.succeeded()
            resumed: bool = welcome["resumed"]
            if resumed:
                for entry in self._pending.values():
                    entry.sent = False  # resent below with the same id: answered once
            else:
                # The old session is gone with whatever it had applied of these.
                self._fail_pending(
                    lambda entry: SessionLost(
                        f"a new session began before the {entry.kind} reply: "
                        "it may or may not have been applied"
                    ),
                    sent_only=True,
                )
            self._events.put_nowait(Resumed(session=welcome["session"], resumed=resumed))
            if self.presence:
                if self._rewatching is not None:
                    self._rewatching.cancel()  # its watch is superseded by this one
                before = dict(self.presence)
                watch = self._issue({"type": "watch", "users": list(before)})
                await self._send(watch)  # first, then the requests that waited
                self._rewatching = asyncio.create_task(
                    self._rewatch(watch, before), name="signalpost-rewatch"
                )
            await self._flush()
            self._connected.set()
            return True
        return False

    async def _rewatch(self, watch: _Request, before: dict[str, str]) -> None:
        """Take the re-watch's reply; report the statuses that changed while away."""
        try:
            reply = await self._outcome(watch)
        except ClientError as exc:  # refused or timed out: the next resume watches again
            log.info("watching again after the reconnect failed: %s", exc)
            return
        statuses: dict[str, str] = reply["presence"]
        self.presence.update(statuses)
        self._note_versions(reply)
        for user, status in statuses.items():
            if before.get(user) != status and status in ("online", "offline"):
                self._events.put_nowait(PresenceChanged(user=user, status=status))  # type: ignore[arg-type]

    def _ended(self, entry: _Request) -> ClientError:
        """The error of a request still waiting when the session ends for good."""
        if self._closing:
            return SessionClosed(
                CloseCode.NORMAL, f"closed by the client before the {entry.kind} reply"
            )
        if not entry.sent:
            return SessionClosed(self.close_code, f"the session ended before {entry.kind} was sent")
        return ConnectionLost(
            f"connection closed ({self.close_code}) and not resumed before the {entry.kind} "
            "reply: it may or may not have been applied"
        )

    def _fail_pending(
        self, error: Callable[[_Request], ClientError], *, sent_only: bool = False
    ) -> None:
        for entry in list(self._pending.values()):
            if sent_only and not entry.sent:
                continue
            del self._pending[entry.id]
            if not entry.future.done():
                entry.future.set_exception(error(entry))

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        request_id = frame.get("id")
        if kind in _REPLY_TYPES and request_id is not None:
            entry = self._pending.pop(request_id, None)
            if entry is None or entry.future.done():
                return  # not waiting (timed out, failed, or a copy of a reply): ignored
            if kind == "joined":
                self._joined(frame)
            elif kind == "left":
                self._left(frame["room"])
            elif kind == "error" and entry.kind == "leave" and frame.get("code") == "not_in_room":
                self._left(msgspec.json.decode(entry.text)["room"])  # not a member after all
            entry.future.set_result(frame)
            return
        if kind == "left":  # unasked (no id): the server's, after a room-closed
            self._left(frame["room"])
            return
        try:
            event = msgspec.convert(frame, ServerEvent)
        except msgspec.ValidationError:
            log.warning("ignoring an unexpected frame: %s", frame)
            return
        if isinstance(event, PeerJoined | PeerLeft | SignalEvent | RoomClosed):
            position = self.positions.get(event.room)
            if position is not None:
                self.positions[event.room] = RoomPosition(position.epoch, event.offset)
            else:  # its leave was answered, a join may be under way: counted in that epoch
                epoch = self._epoch_of.get(event.room)
                if epoch is not None:
                    self._saw(event.room, epoch, event.offset)
        elif isinstance(event, Recovered) and event.epoch is not None and event.offset is not None:
            # The stream goes on from here (even before a join in flight is answered: its
            # events are then counted, and the joined reply does not move back past them).
            position = self.positions.get(event.room)
            if position is None or position.epoch != event.epoch or event.offset > position.offset:
                if position is not None:
                    self._saw(event.room, position.epoch, position.offset)
                self.positions[event.room] = RoomPosition(event.epoch, event.offset)
                self._epoch_of[event.room] = event.epoch
        elif isinstance(event, PresenceChanged):
            known = self.presence_versions.get(event.user, 0)
            if (
                event.version
                and event.version <= known
                and self.presence.get(event.user) == event.status
            ):
                return  # told already (e.g. again by the node that took its watcher over)
            if event.user in self.presence:
                self.presence[event.user] = event.status
                if event.version:
                    self.presence_versions[event.user] = event.version
        self._events.put_nowait(event)

    def _joined(self, frame: dict[str, Any]) -> None:
        room, epoch, offset = frame["room"], frame["epoch"], frame["offset"]
        known = self.positions.get(room)
        if known is not None:
            if known.epoch == epoch:
                # A resent join is answered with the reply recorded when it was applied:
                # never move back past events seen since.
                offset = max(offset, known.offset)
            else:
                self._saw(room, known.epoch, known.offset)
        # Nor past what was seen in this epoch before a leave: answers to a pipelined leave
        # and join can come late, after a resume, once events of the join were written.
        offset = max(offset, self._seen.get((room, epoch), 0))
        self.positions[room] = RoomPosition(epoch, offset)
        self._epoch_of[room] = epoch
        self._epoch_of.move_to_end(room)
        if len(self._epoch_of) > MAX_SEEN_POSITIONS:
            self._epoch_of.popitem(last=False)

    def _left(self, room: str) -> None:
        """A leave was answered: the room's position goes, what it had seen stays."""
        position = self.positions.pop(room, None)
        if position is not None:
            self._saw(room, position.epoch, position.offset)

    def _saw(self, room: str, epoch: str, offset: int) -> None:
        """Remember that ``offset`` was seen in ``room``'s ``epoch`` (bounded)."""
        key = (room, epoch)
        if offset > self._seen.get(key, -1):
            self._seen[key] = offset
        self._seen.move_to_end(key)
        if len(self._seen) > MAX_SEEN_POSITIONS:
            self._seen.popitem(last=False)

    # ----------------------------------------------------------------- requests

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a request with the next id and return its reply; raise on ``error``.

        While the client reconnects the request waits and goes out after the ``welcome``,
        behind the requests made before it. It raises ``RequestRefused``,
        ``RequestTimeout`` (``request_timeout`` after this call), ``SessionLost``,
        ``ConnectionLost`` or ``SessionClosed``; see the module docstring.
        """
        if self._closing or self.close_code is not None:
            raise SessionClosed(
                self.close_code, f"cannot send {frame.get('type')}: client is closed"
            )
        entry = self._issue(frame)
        return await self._outcome(entry, send=self._connected.is_set())

    def _issue(self, frame: dict[str, Any]) -> _Request:
        """Give ``frame`` the next id and make it wait for its reply (not sent yet)."""
        loop = asyncio.get_running_loop()
        request_id = next(self._ids)
        entry = _Request(
            id=request_id,
            kind=str(frame.get("type")),
            text=msgspec.json.encode({**frame, "id": request_id}).decode(),
            future=loop.create_future(),
            deadline=loop.time() + self.request_timeout,
        )
        self._pending[request_id] = entry
        return entry

    async def _send(self, entry: _Request) -> None:
        # In doubt from the first byte on: a drop from here leaves it for the resume.
        entry.sent = True
        assert self._ws is not None
        with contextlib.suppress(ConnectionClosed):  # the reader sees the drop and resumes
            await self._ws.send(entry.text)

    async def _flush(self) -> None:
        """Send every request not sent on this connection, oldest first (before new ones:
        ``_connected`` is still clear, so requests made meanwhile queue behind these)."""
        while batch := [e for e in self._pending.values() if not e.sent and not e.future.done()]:
            for entry in batch:
                await self._send(entry)

    async def _outcome(self, entry: _Request, *, send: bool = False) -> dict[str, Any]:
        """The reply to ``entry`` (sending it first if ``send``); it stops waiting once."""
        timeout = asyncio.timeout_at(entry.deadline)
        try:
            async with timeout:
                if send:
                    await self._send(entry)
                reply = await entry.future
        except TimeoutError:
            if not timeout.expired():
                raise
            raise RequestTimeout(
                f"no reply to {entry.kind} within {self.request_timeout} s"
            ) from None
        finally:
            # Gone from the table: a late reply is ignored and a resume does not resend it.
            self._pending.pop(entry.id, None)
        if reply.get("type") == "error":
            raise RequestRefused(reply["code"], reply["message"])
        return reply

    async def send_frame(self, frame: dict[str, Any] | str) -> None:
        """Send a frame as is, without waiting for a reply (no id is added)."""
        assert self._ws is not None
        text = frame if isinstance(frame, str) else msgspec.json.encode(frame).decode()
        await self._ws.send(text)

    async def join(self, room: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Join ``room``; returns the ``joined`` frame (epoch, offset, members)."""
        frame: dict[str, Any] = {"type": "join", "room": room}
        if meta is not None:
            frame["meta"] = meta
        return await self.request(frame)

    async def leave(self, room: str) -> None:
        """Leave ``room``."""
        await self.request({"type": "leave", "room": room})

    async def signal(self, room: str, data: dict[str, Any], to: str | None = None) -> None:
        """Send ``data`` to ``to`` (or every other member); return once acked."""
        frame: dict[str, Any] = {"type": "signal", "room": room, "data": data}
        if to is not None:
            frame["to"] = to
        await self.request(frame)

    async def watch(self, users: list[str]) -> dict[str, str]:
        """Watch users (again after every reconnect); returns their current status."""
        reply = await self.request({"type": "watch", "users": users})
        presence: dict[str, str] = reply["presence"]
        self.presence.update(presence)
        self._note_versions(reply)
        return presence

    def _note_versions(self, reply: dict[str, Any]) -> None:
        """Keep the status versions of a ``watching`` reply."""
        for user, version in reply.get("versions", {}).items():
            if version > self.presence_versions.get(user, 0):
                self.presence_versions[user] = version

    async def unwatch(self, users: list[str]) -> None:
        """Stop watching users."""
        for user in users:
            self.presence.pop(user, None)
            self.presence_versions.pop(user, None)
        await self.request({"type": "unwatch", "users": users})

    async def ping(self) -> None:
        """Round trip to the edge."""
        await self.request({"type": "ping"})

    async def fresh_ice_servers(self) -> list[dict[str, Any]]:
        """ICE servers with fresh TURN credentials."""
        reply = await self.request({"type": "ice-servers"})
        servers: list[dict[str, Any]] = reply["ice_servers"]
        return servers

    # ----------------------------------------------------------------- events

    async def next_event(self, kind: type[EventT] | None = None, *, timeout: float = 5.0) -> Any:
        """The next event (of type ``kind``, skipping others); TimeoutError if none comes."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self._events.get()
                if kind is None or isinstance(event, kind):
                    return event

    def pending_events(self) -> list[Event]:
        """Events received and not yet taken, without waiting."""
        events = []
        while not self._events.empty():
            events.append(self._events.get_nowait())
        return events
