"""RoomTable: the sans-I/O core of a broker.

Theory of operation
-------------------
A broker owns a set of rooms. For each it keeps the members (session -> the edge and
connection that currently hold it, or a suspension deadline while the session is away),
and a bounded history of the room's events. Every event (peer-joined, peer-left, signal)
takes the next ``offset`` of its room and records the exact set of sessions it was meant
for, so a resume can replay, in order and without duplicates, only what that session
would have received.

Commands come in from edges (``JoinCmd`` ...); each call returns the envelopes to send,
as ``(edge id, envelope)`` pairs, in the order they must leave. The table never reads a
clock: ``now`` is passed in, and ``expire(now)`` turns lapsed suspensions into
``peer-left`` with reason ``timeout``.

Requests carry ``(conn, seq)``; the table remembers the recent replies of each connection,
so an edge that retries a request (lost reply, broker failover) gets the same answer back
and the event is not applied twice.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from msgspec import Raw

from signalpost.errors import NotInRoom, ProtocolError, RoomFull, UnknownPeer
from signalpost.wire import (
    AckFrame,
    AttachCmd,
    Deliver,
    DemoteCmd,
    DetachCmd,
    Envelope,
    ErrorFrame,
    ForgetCmd,
    JoinCmd,
    JoinedFrame,
    LeaveCmd,
    LeftFrame,
    PeerJoinedFrame,
    PeerLeftFrame,
    RecoveredFrame,
    Reply,
    RequestId,
    RestoreCmd,
    SignalCmd,
    SignalFrame,
    encode_frame,
)

Outbound = tuple[str, Envelope]
LeaveReason = Literal["left", "disconnected", "timeout"]

#: Replies remembered per connection for retried requests.
REPLY_CACHE_SIZE: Final = 64


@dataclass(slots=True)
class Member:
    """A session's seat in a room."""

    session: str
    peer: bytes  # peer object JSON
    edge: str
    conn: str
    suspended_until: float | None = None  # None while a connection holds the session


@dataclass(slots=True)
class RoomEvent:
    """One numbered event of a room, kept for replay."""

    offset: int
    at: float
    recipients: frozenset[str]
    payload: bytes


@dataclass(slots=True)
class Room:
    name: str
    epoch: str
    offset: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    history: deque[RoomEvent] = field(default_factory=deque)
    trimmed_through: int = 0  # highest offset no longer in history
    active: bool = True  # False: a passive replica of membership; emits nothing


@dataclass(slots=True)
class _ConnReplies:
    conn: str
    replies: OrderedDict[int, bytes] = field(default_factory=OrderedDict)


class RoomTable:
    """Rooms owned by one broker: membership, capacity, history, resume."""

    def __init__(
        self,
        *,
        capacity: int,
        resume_window: float,
        history_max_events: int,
        history_max_age: float,
        new_epoch: Callable[[], str],
    ) -> None:
        self.capacity = capacity
        self.resume_window = resume_window
        self.history_max_events = history_max_events
        self.history_max_age = history_max_age
        self._new_epoch = new_epoch
        self.rooms: dict[str, Room] = {}
        self._rooms_of: dict[str, set[str]] = {}  # session -> names of rooms it is in
        self._replies: dict[str, _ConnReplies] = {}  # session -> recent replies

    # ----------------------------------------------------------------- dispatch

    def handle(self, command: Envelope, now: float) -> list[Outbound]:
        """Apply one command from an edge; return what to send."""
        if isinstance(command, SignalCmd):
            return self._request(command, now)
        if isinstance(command, JoinCmd):
            return self._request(command, now)
        if isinstance(command, LeaveCmd):
            return self._request(command, now)
        if isinstance(command, AttachCmd):
            return self.attach(command)
        if isinstance(command, DetachCmd):
            return self.detach(command, now)
        if isinstance(command, RestoreCmd):
            self.restore(command)
        elif isinstance(command, ForgetCmd):
            self.forget(command)
        elif isinstance(command, DemoteCmd):
            room = self.rooms.get(command.room)
            if room is not None:
                room.active = False
        return []

    def _request(self, command: SignalCmd | JoinCmd | LeaveCmd, now: float) -> list[Outbound]:
        cache = self._replies.get(command.session)
        if cache is not None and cache.conn == command.conn and command.seq in cache.replies:
            # A retry of a request already applied: answer again, change nothing.
            payload = cache.replies[command.seq]
            return [(command.edge, Reply(command.session, command.conn, command.seq, payload))]
        out: list[Outbound] = []
        try:
            payload = self._apply(command, out, now)
        except ProtocolError as exc:
            payload = request_error(exc, command.req)
        # The ack leaves after the deliveries it acknowledges: a broker killed in between
        # has not acked, so the edge retries the request elsewhere (targets drop the copy).
        out.append((command.edge, Reply(command.session, command.conn, command.seq, payload)))
        self._remember(command.session, command.conn, command.seq, payload)
        return out

    def _apply(
        self, command: SignalCmd | JoinCmd | LeaveCmd, out: list[Outbound], now: float
    ) -> bytes:
        if isinstance(command, SignalCmd):
            return self._signal(command, out, now)
        if isinstance(command, JoinCmd):
            return self._join(command, out, now)
        return self._leave(command, out, now)

    def _remember(self, session: str, conn: str, seq: int, payload: bytes) -> None:
        cache = self._replies.get(session)
        if cache is None or cache.conn != conn:
            cache = self._replies[session] = _ConnReplies(conn)
        cache.replies[seq] = payload
        if len(cache.replies) > REPLY_CACHE_SIZE:
            cache.replies.popitem(last=False)

    # ----------------------------------------------------------------- requests

    def _join(self, command: JoinCmd, out: list[Outbound], now: float) -> bytes:
        room = self.rooms.get(command.room)
        if room is None:
            room = self.rooms[command.room] = Room(command.room, self._new_epoch())
        self._activate(room)
        member = room.members.get(command.session)
        if member is None:
            if len(room.members) >= self.capacity:
                if not room.members:
                    del self.rooms[command.room]
                raise RoomFull(f"room {command.room!r} is full ({self.capacity} members)")
            others = list(room.members.values())
            room.members[command.session] = Member(
                command.session, command.peer, command.edge, command.conn
            )
            self._rooms_of.setdefault(command.session, set()).add(command.room)
            offset = room.offset + 1
            frame = PeerJoinedFrame(room=room.name, peer=Raw(command.peer), offset=offset)
            self._record(room, others, encode_frame(frame), now, out)
        else:
            # Joining twice is a no-op success; it also re-homes a session that moved.
            member.edge, member.conn, member.suspended_until = command.edge, command.conn, None
        members = [Raw(m.peer) for s, m in room.members.items() if s != command.session]
        joined = JoinedFrame(
            room=room.name, epoch=room.epoch, offset=room.offset, members=members, id=command.req
        )
        return encode_frame(joined)

    def _leave(self, command: LeaveCmd, out: list[Outbound], now: float) -> bytes:
        room = self.rooms.get(command.room)
        if room is None or command.session not in room.members:
            raise NotInRoom(f"not a member of room {command.room!r}")
        self._activate(room)
        self._remove(room, command.session, "left", now, out)
        return encode_frame(LeftFrame(room=command.room, id=command.req))

    def _signal(self, command: SignalCmd, out: list[Outbound], now: float) -> bytes:
        room = self.rooms.get(command.room)
        if room is None or command.session not in room.members:
            raise NotInRoom(f"not a member of room {command.room!r}")
        self._activate(room)
        if command.to is None:
            targets = [m for s, m in room.members.items() if s != command.session]
        else:
            target = room.members.get(command.to)
            if target is None or command.to == command.session:
                raise UnknownPeer(f"{command.to!r} is not another member of {command.room!r}")
            targets = [target]
        frame = SignalFrame(
            room=room.name,
            data=Raw(command.data),
            offset=room.offset + 1,
            from_=Raw(command.sender),
        )
        origin = (command.conn, command.seq)
        self._record(room, targets, encode_frame(frame), now, out, origin)
        return b"" if command.req is None else encode_frame(AckFrame(id=command.req))

    # ----------------------------------------------------------------- ownership

    def restore(self, command: RestoreCmd) -> None:
        """Put back a member an edge re-announced (as owner, or as passive replica)."""
        room = self.rooms.get(command.room)
        if room is None:
            room = self.rooms[command.room] = Room(
                command.room, self._new_epoch(), active=not command.replica
            )
        elif not command.replica:
            self._activate(room)
        member = room.members.get(command.session)
        if member is None:
            room.members[command.session] = Member(
                command.session, command.peer, command.edge, command.conn
            )
            self._rooms_of.setdefault(command.session, set()).add(command.room)
        elif member.suspended_until is None or member.conn == command.conn:
            member.edge, member.conn, member.suspended_until = command.edge, command.conn, None

    def forget(self, command: ForgetCmd) -> None:
        """A replica's member left (the owner told its peers)."""
        room = self.rooms.get(command.room)
        if room is not None and not room.active and command.session in room.members:
            self._remove(room, command.session, "left", 0.0, [])

    def _activate(self, room: Room) -> None:
        if not room.active:
            # Whatever history there was died with the previous owner: a new epoch tells
            # resuming clients that they cannot recover what they missed there.
            room.active = True
            room.epoch = self._new_epoch()
            room.history.clear()
            room.trimmed_through = room.offset

    # ----------------------------------------------------------------- sessions

    def attach(self, command: AttachCmd) -> list[Outbound]:
        """A resumed session is back on ``command.edge``: re-home it, replay, report."""
        out: list[Outbound] = []
        names = self._rooms_of.get(command.session, set()) | command.positions.keys()
        for name in sorted(names):
            room = self.rooms.get(name)
            member = room.members.get(command.session) if room else None
            if room is None or member is None:
                if name in command.positions:
                    out.append(_recovered(command, name, False))
                continue
            member.edge, member.conn, member.suspended_until = command.edge, command.conn, None
            if not room.active:
                continue  # a replica: its owner reports recovery
            position = command.positions.get(name)
            complete = (
                position is not None
                and position.epoch == room.epoch
                and room.trimmed_through <= position.offset <= room.offset
            )
            if complete and position is not None:
                for event in room.history:
                    if event.offset > position.offset and command.session in event.recipients:
                        out.append(
                            (command.edge, Deliver([command.session], event.payload))
                        )
            out.append(_recovered(command, name, complete))
        return out

    def detach(self, command: DetachCmd, now: float) -> list[Outbound]:
        """The connection holding a session ended (leave all) or dropped (suspend)."""
        out: list[Outbound] = []
        for name in sorted(self._rooms_of.get(command.session, ())):
            room = self.rooms[name]
            member = room.members[command.session]
            if member.conn != command.conn:
                continue  # a stale report: the session already lives on another connection
            if command.ended:
                self._remove(room, command.session, "disconnected", now, out)
            else:
                member.suspended_until = now + self.resume_window
        if command.ended:
            self._replies.pop(command.session, None)
        return out

    def edge_lost(self, edge: str, now: float) -> list[Outbound]:
        """An edge stopped heartbeating: suspend every session it held."""
        for room in self.rooms.values():
            for member in room.members.values():
                if member.edge == edge and member.suspended_until is None:
                    member.suspended_until = now + self.resume_window
        return []

    def expire(self, now: float) -> list[Outbound]:
        """Remove members whose resume window lapsed; trim history by age."""
        out: list[Outbound] = []
        for room in list(self.rooms.values()):
            lapsed = [
                session
                for session, member in room.members.items()
                if member.suspended_until is not None and member.suspended_until <= now
            ]
            for session in lapsed:
                self._remove(room, session, "timeout", now, out)
            if room.name in self.rooms:
                self._trim(room, now)
        return out

    def next_deadline(self) -> float | None:
        """The earliest suspension deadline, for the shell's timer."""
        deadlines = [
            m.suspended_until
            for room in self.rooms.values()
            for m in room.members.values()
            if m.suspended_until is not None
        ]
        return min(deadlines, default=None)

    def sessions_on(self, edge: str) -> Iterable[str]:
        """Sessions currently held by ``edge`` (attached, not suspended)."""
        for room in self.rooms.values():
            for member in room.members.values():
                if member.edge == edge and member.suspended_until is None:
                    yield member.session

    # ----------------------------------------------------------------- internals

    def _remove(
        self, room: Room, session: str, reason: LeaveReason, now: float, out: list[Outbound]
    ) -> None:
        member = room.members.pop(session)
        rooms = self._rooms_of.get(session)
        if rooms is not None:
            rooms.discard(room.name)
            if not rooms:
                del self._rooms_of[session]
                self._replies.pop(session, None)
        if not room.members:
            del self.rooms[room.name]  # a new room of that name gets a new epoch
            return
        if not room.active:
            return
        frame = PeerLeftFrame(
            room=room.name, peer=Raw(member.peer), reason=reason, offset=room.offset + 1
        )
        self._record(room, list(room.members.values()), encode_frame(frame), now, out)

    def _record(
        self,
        room: Room,
        recipients: list[Member],
        payload: bytes,
        now: float,
        out: list[Outbound],
        origin: tuple[str, int] = ("", 0),
    ) -> None:
        """Number an event, keep it for replay, and deliver it to attached recipients."""
        room.offset += 1
        room.history.append(
            RoomEvent(room.offset, now, frozenset(m.session for m in recipients), payload)
        )
        self._trim(room, now)
        by_edge: dict[str, list[str]] = {}
        for member in recipients:
            if member.suspended_until is None:
                by_edge.setdefault(member.edge, []).append(member.session)
        for edge, sessions in by_edge.items():
            out.append((edge, Deliver(sessions, payload, *origin)))

    def _trim(self, room: Room, now: float) -> None:
        history = room.history
        oldest_allowed = now - self.history_max_age
        while history and (
            len(history) > self.history_max_events or history[0].at < oldest_allowed
        ):
            room.trimmed_through = history.popleft().offset


def _recovered(command: AttachCmd, room: str, recovered: bool) -> Outbound:
    frame = RecoveredFrame(room=room, recovered=recovered)
    return (command.edge, Deliver([command.session], encode_frame(frame)))


def request_error(exc: ProtocolError, req: RequestId | None) -> bytes:
    """Encode a refused request as the client's error frame."""
    return encode_frame(ErrorFrame(code=exc.code, message=exc.message, id=req))
