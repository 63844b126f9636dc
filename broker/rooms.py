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

Replication: when ``replica_for(room)`` names a runner-up broker, every batch of events a
command records is sent there (``ReplicateCmd``) and the batch's deliveries and reply wait
in the room's ``pending`` queue until ``replica_acked``. The runner-up keeps the room as a
passive replica (membership from the edges, history and reply cache from the owner); when
it takes the room over it keeps the epoch and offsets, so resumes still recover, and a
retried request finds its reply and re-delivers its event (edges drop the copy).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec
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
    ReplicaAck,
    ReplicateCmd,
    ReplicatedEvent,
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


class RoomEvent(msgspec.Struct, gc=False, frozen=True):
    """One numbered event of a room, kept for replay.

    Not tracked by the cyclic GC (it only holds strings, bytes and numbers): full histories
    would otherwise make every full collection walk them, a pause of 100+ ms per
    collection under load (docs/performance.md, broker routing).
    """

    offset: int
    at: float
    recipients: tuple[str, ...]
    payload: bytes
    origin: tuple[str, int] = ("", 0)  # the request (conn, seq) that caused it, if any


@dataclass(slots=True)
class _Batch:
    """Outbound held back until the runner-up confirms the events it depends on."""

    number: int | None  # None: holds no events, waits only for the batches before it
    out: list[Outbound]
    replicate: ReplicateCmd | None = None
    target: str | None = None
    confirmed: bool = False


@dataclass(slots=True)
class Room:
    name: str
    epoch: str
    offset: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    history: deque[RoomEvent] = field(default_factory=deque)
    trimmed_through: int = 0  # highest offset no longer in history
    active: bool = True  # False: a passive replica of membership; emits nothing
    replicated: bool = False  # a passive room whose history the owner replicates here
    pending: deque[_Batch] = field(default_factory=deque)
    next_batch: int = 0


@dataclass(slots=True)
class _ConnReplies:
    conn: str
    # seq -> (reply payload, room, offset of the event the request recorded or 0)
    replies: OrderedDict[int, tuple[bytes, str, int]] = field(default_factory=OrderedDict)


def _no_replica(room: str) -> str | None:
    return None


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
        node_id: str = "",
        replica_for: Callable[[str], str | None] = _no_replica,
    ) -> None:
        self.node_id = node_id
        self.replica_for = replica_for
        self._replicating = replica_for is not _no_replica  # else no call per event to ask
        self.capacity = capacity
        self.resume_window = resume_window
        self.history_max_events = history_max_events
        self.history_max_age = history_max_age
        self._new_epoch = new_epoch
        self.rooms: dict[str, Room] = {}
        self._rooms_of: dict[str, set[str]] = {}  # session -> names of rooms it is in
        self._replies: dict[str, _ConnReplies] = {}  # session -> recent replies
        # Scratch of the command being applied: room -> (events, their deliveries).
        self._parked: dict[str, tuple[Room, list[RoomEvent], list[Outbound]]] = {}
        self._last_offset = 0  # offset of the last event recorded by this command

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
        if isinstance(command, ReplicateCmd):
            return self.replicate(command, now)
        if isinstance(command, ReplicaAck):
            return self.replica_acked(command.room, command.batch)
        if isinstance(command, RestoreCmd):
            self.restore(command)
        elif isinstance(command, ForgetCmd):
            self.forget(command)
        elif isinstance(command, DemoteCmd):
            return self.demote(command.room)
        return []

    def _request(self, command: SignalCmd | JoinCmd | LeaveCmd, now: float) -> list[Outbound]:
        out: list[Outbound] = []
        cache = self._replies.get(command.session)
        if cache is not None and cache.conn == command.conn and command.seq in cache.replies:
            # A retry of a request already applied: answer again, change nothing, but
            # deliver its event again in case the broker that applied it died first.
            payload, room_name, offset = cache.replies[command.seq]
            room = self.rooms.get(room_name)
            held: list[Outbound] = []
            if room is not None and room.active and offset:
                for event in room.history:
                    if event.offset == offset:
                        held.extend(self._deliveries(room, event))
            held.append((command.edge, Reply(command.session, command.conn, command.seq, payload)))
            if room is not None and room.pending:
                room.pending.append(_Batch(None, held, confirmed=True))
            else:
                out.extend(held)
            return out
        self._last_offset = 0
        try:
            # Ordered by frequency: signals dominate a call's traffic.
            if isinstance(command, SignalCmd):
                payload = self._signal(command, out, now)
            elif isinstance(command, JoinCmd):
                payload = self._join(command, out, now)
            else:
                payload = self._leave(command, out, now)
        except ProtocolError as exc:
            payload = request_error(exc, command.req)
        offset = self._last_offset
        self._remember(command.session, command.conn, command.seq, (payload, command.room, offset))
        # The ack leaves after the deliveries it acknowledges (and after the runner-up has
        # the events): a broker killed before that has not acked, so the edge retries.
        reply = (command.edge, Reply(command.session, command.conn, command.seq, payload))
        # What _seal does when nothing was held back, without the call (once per request):
        if not self._parked:  # the reply goes out unless the room still waits on its replica
            room = self.rooms.get(command.room)
            if room is None or not room.pending:
                out.append(reply)
                return out
        self._seal(out, command, reply, payload)
        return out

    def _remember(self, session: str, conn: str, seq: int, entry: tuple[bytes, str, int]) -> None:
        cache = self._replies.get(session)
        if cache is None or cache.conn != conn:
            cache = self._replies[session] = _ConnReplies(conn)
        cache.replies[seq] = entry
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
            # With its origin, a copy re-sent for a retried join is dropped by the edges.
            origin = (command.conn, command.seq)
            self._record(room, others, encode_frame(frame), now, out, origin)
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
        self._remove(room, command.session, "left", now, out, (command.conn, command.seq))
        return encode_frame(LeftFrame(room=command.room, id=command.req))

    def _signal(self, command: SignalCmd, out: list[Outbound], now: float) -> bytes:
        room = self.rooms.get(command.room)
        if room is None or command.session not in room.members:
            raise NotInRoom(f"not a member of room {command.room!r}")
        if not room.active:
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
        if room.active:
            return
        room.active = True
        if not room.replicated:
            # Whatever history there was died with the previous owner: a new epoch tells
            # resuming clients that they cannot recover what they missed there.
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
                        out.append((command.edge, Deliver([command.session], event.payload)))
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
        cache = self._replies.get(command.session)
        if command.ended and cache is not None and cache.conn == command.conn:
            # Only the connection the cache belongs to may drop it: a late report from an
            # older connection must not make the live one's retries apply twice.
            del self._replies[command.session]
        self._seal(out)
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
        self._seal(out)
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
        self,
        room: Room,
        session: str,
        reason: LeaveReason,
        now: float,
        out: list[Outbound],
        origin: tuple[str, int] = ("", 0),
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
            while room.pending:  # nobody is left to need the replica's confirmation
                out.extend(room.pending.popleft().out)
            return
        if not room.active:
            return
        frame = PeerLeftFrame(
            room=room.name, peer=Raw(member.peer), reason=reason, offset=room.offset + 1
        )
        self._record(room, list(room.members.values()), encode_frame(frame), now, out, origin)

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
        sessions = (
            (recipients[0].session,)
            if len(recipients) == 1
            else tuple([m.session for m in recipients])
        )
        event = RoomEvent(room.offset, now, sessions, payload, origin)
        history = room.history
        history.append(event)
        if len(history) > self.history_max_events or history[0].at < now - self.history_max_age:
            self._trim(room, now)
        self._last_offset = room.offset
        deliveries = self._deliveries(room, event, recipients)
        if not room.pending and (not self._replicating or self.replica_for(room.name) is None):
            out.extend(deliveries)
            return
        parked = self._parked.get(room.name)
        if parked is None:
            parked = self._parked[room.name] = (room, [], [])
        parked[1].append(event)
        parked[2].extend(deliveries)

    @staticmethod
    def _deliveries(
        room: Room, event: RoomEvent, recipients: list[Member] | None = None
    ) -> list[Outbound]:
        """One Deliver per edge holding attached recipients of ``event``."""
        if recipients is None:
            recipients = [room.members[s] for s in event.recipients if s in room.members]
        elif len(recipients) == 1:  # a signal to one peer: most of the traffic
            member = recipients[0]
            if member.suspended_until is not None:
                return []
            return [(member.edge, Deliver([member.session], event.payload, *event.origin))]
        by_edge: dict[str, list[str]] = {}
        for member in recipients:
            if member.suspended_until is None:
                by_edge.setdefault(member.edge, []).append(member.session)
        return [
            (edge, Deliver(sessions, event.payload, *event.origin))
            for edge, sessions in by_edge.items()
        ]

    def _seal(
        self,
        out: list[Outbound],
        request: SignalCmd | JoinCmd | LeaveCmd | None = None,
        reply: Outbound | None = None,
        reply_payload: bytes = b"",
    ) -> None:
        """End a command: replicate what it recorded, hold or release its output."""
        parked = self._parked
        if parked:
            self._parked = {}
        for name, (room, events, deliveries) in parked.items():
            held = list(deliveries)
            carries_reply = request is not None and reply is not None and name == request.room
            if carries_reply:
                assert reply is not None
                held.append(reply)
                reply = None
            replica = self.replica_for(name)
            if self.rooms.get(name) is not room or replica is None:
                # Gone (its last member left) or nobody to replicate to: let it out,
                # behind whatever the room still holds.
                room.pending.append(_Batch(None, held, confirmed=True))
                self._release(room, out)
                continue
            number = room.next_batch
            room.next_batch += 1
            replicate = ReplicateCmd(
                self.node_id,
                name,
                room.epoch,
                number,
                [
                    ReplicatedEvent(e.offset, sorted(e.recipients), e.payload, *e.origin)
                    for e in events
                ],
            )
            if carries_reply and request is not None:
                # The runner-up learns the answer too: a retry after takeover gets it.
                replicate = msgspec.structs.replace(
                    replicate,
                    reply_session=request.session,
                    reply_conn=request.conn,
                    reply_seq=request.seq,
                    reply_payload=reply_payload,
                )
            room.pending.append(_Batch(number, held, replicate, replica))
            out.append((replica, replicate))
        if reply is not None:
            room_of_reply = self.rooms.get(request.room) if request is not None else None
            if room_of_reply is not None and room_of_reply.pending:
                room_of_reply.pending.append(_Batch(None, [reply], confirmed=True))
            else:
                out.append(reply)

    @staticmethod
    def _release(room: Room, out: list[Outbound]) -> None:
        while room.pending and room.pending[0].confirmed:
            out.extend(room.pending.popleft().out)

    # ----------------------------------------------------------------- replication

    def replica_acked(self, name: str, batch: int) -> list[Outbound]:
        """The runner-up has batch ``batch`` of ``name``: release what waited for it."""
        out: list[Outbound] = []
        room = self.rooms.get(name)
        if room is None:
            return out
        for held in room.pending:
            if held.number == batch:
                held.confirmed = True
        self._release(room, out)
        return out

    def replicas_changed(self) -> list[Outbound]:
        """The runner-ups may have changed: resend unconfirmed batches (or stop waiting)."""
        out: list[Outbound] = []
        for room in list(self.rooms.values()):
            if not room.pending:
                continue
            replica = self.replica_for(room.name)
            for held in room.pending:
                if held.confirmed or held.replicate is None:
                    continue
                if replica is None:
                    held.confirmed = True
                elif held.target != replica:
                    held.target = replica
                    out.append((replica, held.replicate))
            self._release(room, out)
        return out

    def replicate(self, command: ReplicateCmd, now: float) -> list[Outbound]:
        """Runner-up side: keep the owner's events (and reply) for a takeover."""
        room = self.rooms.get(command.room)
        if room is None:
            room = self.rooms[command.room] = Room(command.room, command.epoch, active=False)
        if not room.active:
            if not room.replicated or room.epoch != command.epoch:
                room.epoch = command.epoch
                room.history.clear()
                first = command.events[0].offset if command.events else room.offset + 1
                room.offset = room.trimmed_through = first - 1
                room.replicated = True
            for replicated in command.events:
                if replicated.offset <= room.offset:
                    continue  # a batch resent after a runner-up change
                room.offset = replicated.offset
                room.history.append(
                    RoomEvent(
                        replicated.offset,
                        now,
                        tuple(replicated.recipients),
                        replicated.payload,
                        (replicated.origin_conn, replicated.origin_seq),
                    )
                )
            self._trim(room, now)
            if command.reply_seq:
                offset = command.events[-1].offset if command.events else 0
                self._remember(
                    command.reply_session,
                    command.reply_conn,
                    command.reply_seq,
                    (command.reply_payload, command.room, offset),
                )
        return [(command.owner, ReplicaAck(command.room, command.batch))]

    def demote(self, name: str) -> list[Outbound]:
        """Another broker owns ``name`` now: keep its membership passively, drop history."""
        out: list[Outbound] = []
        room = self.rooms.get(name)
        if room is None:
            return out
        while room.pending:
            out.extend(room.pending.popleft().out)
        room.active = False
        room.replicated = False
        room.history.clear()
        return out

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
