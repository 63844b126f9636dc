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
``peer-left`` with reason ``timeout`` and resends what edges have not confirmed.

Requests are applied at most once per (session, request key): the key is the client's
``id`` when it gave one (the same on every connection of the session, so a client's
resend after a resume is the same request), else the edge's ``(conn, seq)``. A resend is
answered from the session's reply record, bounded by count (``REPLY_RECORDS_PER_SESSION``)
and age (``REPLY_RECORD_TTL``), and replicated with the room's events.

Delivery streams: the owner keeps, per member, the offset of the last event it sent that
member (``sent``) and the last one the member's edge confirmed (``confirmed``). Each
``Deliver`` carries ``prev`` (the member's ``sent`` before it), so the edge sees a gap and
a duplicate exactly (``edge.delivery``). What is unconfirmed ``resend_after`` seconds
after it went out, or on the edge's request (a gap), is sent again from the history; an
edge that re-announces a member (``RestoreCmd``) or resumes a session (``AttachCmd``)
gives its position and is replayed what came after. A member whose edge has not synced
with this owner yet (after a takeover) is sent nothing live: the history holds it until
the sync replays it.

Replication: when ``replica_for(room)`` names a runner-up broker, every batch of events a
command records is sent there (``ReplicateCmd``) and the batch waits in the room's
``pending`` queue until ``replica_acked``; only then are its events *released*: their
deliveries computed (to the members attached then) and the reply sent. Nothing a client
saw is unknown to the runner-up. The runner-up keeps the room as a passive replica
(membership from the edges, history and reply records from the owner); when it takes the
room over it keeps the epoch and offsets, so resumes still recover and a resent request
finds its reply.
"""

from __future__ import annotations

import heapq
import itertools
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec
from msgspec import Raw

from broker.hooks import RoomHooks
from signalpost.errors import (
    BadRequest,
    NotFound,
    NotInRoom,
    ProtocolError,
    RoomFull,
    UnknownPeer,
)
from signalpost.replication import Unacked, resend_late, retarget
from signalpost.tickets import SeatTickets
from signalpost.wire import (
    AckFrame,
    ApiAnswer,
    AttachCmd,
    Confirm,
    Deliver,
    DetachCmd,
    Envelope,
    ErrorFrame,
    ForgetCmd,
    HandedMember,
    HandedRecord,
    Handoff,
    HandoffRequest,
    JoinCmd,
    JoinedFrame,
    LeaveCmd,
    LeftFrame,
    PeerJoinedFrame,
    PeerLeftFrame,
    ReplicaAck,
    ReplicateCmd,
    ReplicatedEvent,
    Reply,
    RequestId,
    RestoreCmd,
    RoomClosedFrame,
    RoomQuery,
    RoomsQuery,
    SignalCmd,
    SignalFrame,
    Synced,
    conn_supersedes,
    encode_frame,
    encode_json,
    request_key,
)

Outbound = tuple[str, Envelope]
LeaveReason = Literal["left", "disconnected", "timeout"]
Request = SignalCmd | JoinCmd | LeaveCmd

#: Reply records kept per session (the oldest goes first): as many as an edge lets one
#: connection have unanswered (``edge.server.MAX_UNANSWERED``), so any resend finds its own ...
REPLY_RECORDS_PER_SESSION: Final = 1024
#: ... and for at most this long (seconds): a resend later than that is applied anew.
REPLY_RECORD_TTL: Final = 120.0
#: Sessions whose reply records are kept at once; past that the least recently active go.
MAX_RECORDED_SESSIONS: Final = 200_000

#: Seconds after which an unconfirmed delivery is sent again.
RESEND_AFTER: Final = 1.0
#: A gap reported by an edge is answered at once, but not more often than this per member.
GAP_RESEND_INTERVAL: Final = 0.1

#: Sessions whose newest connection is remembered (``RoomTable._latest``).
MAX_LATEST_CONNS: Final = 200_000

#: Members that left a room remembered per room (see ``Room.departed``).
DEPARTED_MAX: Final = 1024

#: Sessions other than its members and departed with reply records in a room (the server
#: API's pseudo-sessions, 256) tracked per room (``Room.recorders``); past that, their
#: records of the room no longer travel with its whole history to a new runner-up.
MAX_RECORDERS: Final = 1024

#: Epochs of rooms that ended here remembered (``RoomTable._ended``).
MAX_ENDED_EPOCHS: Final = 100_000

#: Seconds a broker that begins to serve with no state (it started, or came back into the
#: view), or a room rebuilt from re-announcements (created by one, or taken with no copy),
#: waits for the edges' re-announcements before it refuses a member it does not know:
#: until then a signal or leave from a session it does not know in the room (or a room it
#: does not know), or a signal naming such a member, is not answered (the edge resends it)
#: instead of refused ``not_in_room`` / ``unknown_peer``. An edge re-announces once it
#: hears the broker's new run (``room_table`` passes ``peer_expiry``).
REBUILD_GRACE: Final = 3.0

#: Seconds a broker that takes a room over waits for the broker that served it until now
#: to hand it over; then it serves the room without (a new epoch: ``recovered: false``).
HANDOFF_TIMEOUT: Final = 2.0
#: Commands parked per room while its handoff is awaited; more are dropped (resent).
MAX_PARKED: Final = 10_000

#: Requests held per (connection, room) while one before them is missing; past that a
#: later one is dropped (unanswered: the edge resends it).
MAX_HELD_REQUESTS: Final = 1024
#: Connections whose request order is tracked at once; past that the oldest is forgotten
#: (its next request restarts the order from the edge's ``rbase``).
MAX_ORDERED_CONNS: Final = 200_000


def fingerprint(command: SignalCmd | JoinCmd | LeaveCmd) -> int:
    """What a resend must repeat to be the same request (CRC-32 of its kind and content):
    an id used again for something else is refused instead of answered as a resend."""
    if isinstance(command, SignalCmd):
        crc = zlib.crc32(command.data, zlib.crc32((command.to or "").encode(), 1))
        return _server_fingerprint(command, crc) if command.server else crc
    if isinstance(command, JoinCmd):
        return zlib.crc32(command.peer, 2)
    return 3


def _server_fingerprint(command: SignalCmd, crc: int) -> int:
    """A server API publish also names its target user and whether it closes the room."""
    return zlib.crc32(f"{command.to_user}\x00{command.close}".encode(), crc)


#: Rooms a broker lists per server API page at most (``RoomsQuery.limit`` is capped).
MAX_ROOMS_PAGE: Final = 1000


@dataclass(slots=True, eq=False)
class Member:
    """A session's seat in a room, and its delivery stream from this owner."""

    session: str
    peer: bytes  # peer object JSON
    edge: str
    conn: str
    suspended_until: float | None = None  # None while a connection holds the session
    synced: bool = True  # False: the edge's position is unknown here; nothing goes live
    sent: int = 0  # offset of the last event sent to this member (its next ``prev``)
    confirmed: int = 0  # its edge has written everything through this offset
    start: int = 0  # where its stream started (joined, synced): nothing before is its
    joined: int = 0  # where this membership began (its join; 0: unknown, re-announced)
    joined_in: str = ""  # ... in which epoch (an offset of another is no bound)
    joined_by: str = ""  # the connection that joined (and is answered where it began)
    sent_at: float = 0.0  # when what is unconfirmed went out (or was last resent)
    # The ``Synced`` that (re)opened this stream, until its edge confirms a position in the
    # room's epoch: resent with what is unconfirmed (an edge with no position in the room
    # learns where its stream starts, and a ``recovered: false``, from nothing else).
    syncing: Synced | None = None


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


@dataclass(slots=True, kw_only=True)
class _Batch(Unacked):
    """Events held back until the runner-up confirms them, and what follows them.

    Its ``message`` is the ``ReplicateCmd`` of its events (None: it holds no replicated
    events and waits for the batches before it)."""

    number: int | None  # None: holds no replicated events, waits for the batches before
    events: list[RoomEvent]
    after: list[Outbound]  # replies, sent once the events are released
    # (session, request key) of the records whose replies wait here: not valid (their
    # events may never be released) until the batch is
    keys: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class Room:
    name: str
    epoch: str
    offset: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    history: deque[RoomEvent] = field(default_factory=deque)
    trimmed_through: int = 0  # highest offset no longer in history
    released: int = 0  # highest offset whose event is visible (delivered, replayable)
    active: bool = True  # False: a passive replica of membership; emits nothing
    # Active here, but this broker's view has another broker own it: it serves nothing
    # (no ack, no event) and keeps its whole state for the new owner's handoff request.
    deposed: bool = False
    replicated: bool = False  # a passive room whose history the owner replicates here
    pending: deque[_Batch] = field(default_factory=deque)
    next_batch: int = 0
    term: int = 0  # this ownership's term: higher than any earlier owner's
    # Created by a re-announcement (no state was left of it here): until then its members
    # may still be re-announced by other edges (``REBUILD_GRACE``).
    rebuilding_until: float = 0.0
    replica_target: str | None = None  # the runner-up that has the whole history
    # session -> connection of members that left: a late re-announcement from that
    # connection must not bring them back (bounded: DEPARTED_MAX, oldest first)
    departed: dict[str, str] = field(default_factory=dict)
    # ... of which those a passive copy was told of by their edge (``ForgetCmd``): that
    # edge's later re-announcement from the same connection is a join since
    forgotten: set[str] = field(default_factory=set)
    # Sessions that are neither members nor departed with reply records here (server API
    # publishes): with those two, whose records go with the whole history (``_records_of``;
    # bounded: MAX_RECORDERS)
    recorders: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Inflow:
    """A connection's requests to one room: the last applied in order, and those held."""

    applied: int
    held: dict[int, Request] = field(default_factory=dict)
    # rseq -> its answer, until the edge says it has it (``rbase`` past it): a resend
    # finds it however many requests of the session came since.
    answers: dict[int, _Record] = field(default_factory=dict)


class _Record(msgspec.Struct, gc=False, frozen=True):
    """The answer given to one request, for its resends.

    Not tracked by the cyclic GC (only bytes, strings and numbers): a broker keeps up to
    1024 per session, and full collections would walk them all. It keeps a fingerprint
    of what the request said, not the request's data: records that held every signal's
    data (a 4 KB offer, each candidate) grew a dev server under the calls load from 54 to
    126 MB; with the CRC it holds 53 MB (docs/performance.md).
    """

    #: The answer's frame; empty for an acked signal: its ack is made again from the
    #: resend's id (``_reply``), which saves most records a frame each.
    payload: bytes
    fingerprint: int  # what a resend must repeat (``fingerprint``)
    at: float
    ok: bool
    epoch: str = ""
    offset: int = 0
    member: bool = False  # a join or leave: whether the session was a member after it

    def repeats(self, command: SignalCmd | JoinCmd | LeaveCmd) -> bool:
        """Whether ``command`` is the request this answers (not another one under its id)."""
        return self.fingerprint == fingerprint(command)


_NO_RECORD: Final = _Record(b"", 0, 0.0, False)


@dataclass(slots=True)
class _Awaiting:
    """A room this broker owns now, waiting for its previous server's state."""

    source: str
    since: float
    parked: list[Envelope | tuple[AttachCmd, str]] = field(default_factory=list)
    ask_again_at: float = 0.0


def _no_replica(room: str) -> str | None:
    return None


def _ignore_refusal(sender: str, why: str, what: str) -> None:
    return None


def _owns_all(room: str) -> bool:
    return True


def _in_every_view(broker: str) -> bool:
    return True


class RoomTable:
    """Rooms owned by one broker: membership, capacity, history, resume, delivery."""

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
        confirming: bool = True,
        resend_after: float = RESEND_AFTER,
        owns: Callable[[str], bool] = _owns_all,
        handoff_from: Callable[[str], str | None] = _no_replica,
        new_term: Callable[[], int] | None = None,
        handoff_timeout: float = HANDOFF_TIMEOUT,
        handoff_fences: bool = True,
        owner_of: Callable[[str], str | None] | None = None,
        rebuild_grace: float = REBUILD_GRACE,
        in_view: Callable[[str], bool] = _in_every_view,
    ) -> None:
        self.node_id = node_id
        self.rebuild_grace = rebuild_grace
        #: Until then this broker is rebuilding what it serves (``began_serving``).
        self.rebuilding_until = 0.0
        #: Until then some room (or this broker) may be rebuilding: one compare per
        #: request on the hot path otherwise.
        self._rebuilds_until = 0.0
        #: Requests left unanswered while their room was rebuilt (the edges resend them).
        self.deferred = 0
        #: Replica acks ignored: from a broker the batch was not (last) sent to.
        self.late_acks = 0
        self.replica_for = replica_for
        self._replicating = replica_for is not _no_replica  # else no call per event to ask
        self.capacity = capacity
        self.resume_window = resume_window
        self.history_max_events = history_max_events
        self.history_max_age = history_max_age
        self._new_epoch = new_epoch
        #: Edges confirm deliveries (cluster); in one process nothing is lost in between.
        self.confirming = confirming
        self.resend_after = resend_after
        #: Whether this broker owns a room in its own view of the brokers: it serves only
        #: those (a command sent by an edge with another view is dropped and resent).
        self.owns = owns
        #: Who served a room before this broker took it, if alive (asked for a handoff).
        self.handoff_from = handoff_from
        #: Whether a broker is in this broker's view (alive; with Consul, in the view): a
        #: handoff source that left it is asked no more (``expire``).
        self.in_view = in_view
        # The term of a room created afresh: above any its earlier incarnations reached
        # (the shell passes the wall clock in ms); by default a counter.
        self._new_term = new_term if new_term is not None else itertools.count(1).__next__
        self.handoff_timeout = handoff_timeout
        #: Whether a handoff request names the asker's term, which a passive copy then
        #: keeps (refusing a deposed owner's late batch). Only where views are consistent
        #: (Consul): with views from heartbeats the asker may be the one that is wrong.
        self.handoff_fences = handoff_fences
        #: The owner of a room in this broker's view (None: none known), where the views
        #: are consistent (Consul): a peer replicates a room to this broker, or asks for
        #: its state, only as its owner. None: not checked (views from heartbeats).
        self.owner_of = owner_of
        self._awaiting: dict[str, _Awaiting] = {}  # room -> the handoff it waits for
        # Epochs of rooms that ended here (their last member left), newest last: a
        # runner-up's copy of one (it may not have heard of the end) is stale, and a
        # handoff of it must not bring its departed members back.
        self._ended: OrderedDict[str, None] = OrderedDict()
        # session -> (conn, edge) of its newest connection heard from (attach, join, leave,
        # re-announcement): an older one's late word must not bind the session to it
        self._latest: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.rooms: dict[str, Room] = {}
        self._rooms_of: dict[str, set[str]] = {}  # session -> names of rooms it is in
        # session -> request key -> record; sessions in order of their latest record
        # (A plain dict per session, in insertion order: holding only strings and untracked
        # records, CPython stops tracking it, so the GC never walks the records.)
        self._records: OrderedDict[str, dict[str, _Record]] = OrderedDict()
        self._unconfirmed: dict[Member, Room] = {}  # members with deliveries not confirmed
        # conn -> room -> request order; conns in order of their latest request
        self._inflows: OrderedDict[str, dict[str, _Inflow]] = OrderedDict()
        # Scratch of the command being applied: room -> (room, events it recorded).
        self._parked: dict[str, tuple[Room, list[RoomEvent]]] = {}
        self._now = 0.0  # time of the command being applied
        self._last_record = _NO_RECORD  # the answer of the request applied last
        #: Called with (sender, why, what) for a command refused because it names a session
        #: whose seat is on another edge (``what`` "session"), or a room its sender does
        #: not own ("room"); the shell counts and logs it.
        self.refused: Callable[[str, str, str], None] = _ignore_refusal
        #: Presence's seat tickets (``signalpost.tickets``): with them, a seat moves to
        #: another edge only on a valid ticket; None (dev, plaintext links): unchecked.
        self.tickets: SeatTickets | None = None
        #: Webhooks (``broker.hooks``): told what is released, what ends, what is taken
        #: over. None: no webhooks configured.
        self.hooks: RoomHooks | None = None

    # ----------------------------------------------------------------- dispatch

    def handle(self, command: Envelope, now: float) -> list[Outbound]:
        """Apply one command from an edge or a peer broker; return what to send."""
        self._now = now
        if type(command) is SignalCmd:  # most of the traffic: an active room needs no gate
            room = self.rooms.get(command.room)
            if room is None or not room.active or room.deposed:
                gated = self._gate(command.room, command, now)
                if gated is not None:
                    return gated
                room = self.rooms.get(command.room)
            if room is not None:
                # Only the edge holding the session's seat speaks for it (one dict lookup).
                member = room.members.get(command.session)
                if member is not None and member.edge != command.edge:
                    return self._not_theirs(command, member)
            # (``_request`` applies an unordered one, one process's, at once: one call less)
            return self._request(command, now) if command.rseq else self._apply(command, now)
        if isinstance(command, JoinCmd | LeaveCmd):
            out = self._gate(command.room, command, now)
            if out is not None:
                return out
            if type(command) is LeaveCmd:
                room = self.rooms.get(command.room)
                member = None if room is None else room.members.get(command.session)
                if member is not None and member.edge != command.edge:
                    return self._not_theirs(command, member)
            elif isinstance(command, JoinCmd) and self._moves_unticketed(command):
                return []
            return self._request(command, now)
        if isinstance(command, Confirm):
            return self.confirm(command, now)
        if isinstance(command, AttachCmd):
            return self.attach(command)
        if isinstance(command, HandoffRequest):
            return self.handoff_requested(command, now)
        if isinstance(command, Handoff):
            return self.handoff_received(command, now)
        if isinstance(command, DetachCmd):
            return self.detach(command, now)
        if isinstance(command, ReplicateCmd):
            return self.replicate(command, now)
        if isinstance(command, ReplicaAck):
            if command.refused:
                return self.fenced(command.room, command.term)
            return self.replica_acked(command.room, command.batch, now, command.replica)
        if isinstance(command, RestoreCmd):
            if not command.replica:
                out = self._gate(command.room, command, now)
                if out is not None:
                    return out
            if self._moves_unticketed(command):
                return []
            return self.restore(command, now)
        if isinstance(command, ForgetCmd):
            self.forget(command)
        elif isinstance(command, RoomsQuery):
            return self.rooms_page(command)
        elif isinstance(command, RoomQuery):
            return self.room_info(command)
        # DemoteCmd (older edges): ignored. A broker stops serving a room when its own view
        # says another broker owns it, and hands the room over when that broker asks.
        return []

    def _not_theirs(
        self, command: SignalCmd | LeaveCmd | DetachCmd | ForgetCmd, member: Member
    ) -> list[Outbound]:
        """``command`` names a session whose seat is on another edge than its sender: not
        applied, not answered (nothing is recorded for the session), reported."""
        self.refused(
            command.edge,
            f"{type(command).__name__} for session {command.session!r}, "
            f"whose seat is on {member.edge!r}",
            "session",
        )
        return []

    def _moves_unticketed(self, command: JoinCmd | RestoreCmd | AttachCmd) -> bool:
        """Whether ``command`` would bind its session to its edge while this broker knows
        the session on another edge, without presence's ticket for that: refused
        (reported). The first edge a broker hears of a session from needs none."""
        tickets = self.tickets
        if tickets is None:
            return False
        session, edge = command.session, command.edge
        latest = self._latest.get(session)
        elsewhere = None
        if latest is not None:
            if latest[1] != edge:
                elsewhere = latest[1]
        else:  # not heard from (or forgotten): its seats say where it is
            for name in self._rooms_of.get(session, ()):
                seat = self.rooms[name].members[session]
                if seat.edge != edge:
                    elsewhere = seat.edge
                    break
        if elsewhere is None or (
            command.ticket and tickets.valid(command.ticket, session, edge, command.conn)
        ):
            return False
        self.refused(
            edge,
            f"{type(command).__name__} would move session {session!r} from {elsewhere!r} "
            "without presence's ticket",
            "session",
        )
        return True

    def _gate(
        self, name: str, command: Envelope | tuple[AttachCmd, str], now: float
    ) -> list[Outbound] | None:
        """None: serve ``command`` now. Else what to send instead: nothing (another broker
        owns the room in this broker's view; the edge resends), or the handoff request of
        a room this broker takes over from a broker still alive (the command waits)."""
        room = self.rooms.get(name)
        if room is not None and room.active and not room.deposed:
            return None
        if not self.owns(name):
            return []
        awaiting = self._awaiting.get(name)
        if awaiting is None:
            source = self.handoff_from(name)
            if source is None:
                return None
            awaiting = self._awaiting[name] = _Awaiting(source, now, ask_again_at=now + 0.25)
            out: list[Outbound] = [
                (source, HandoffRequest(name, self.node_id, self._handoff_term()))
            ]
        else:
            out = []
        if len(awaiting.parked) < MAX_PARKED:
            awaiting.parked.append(command)
        return out

    def _handoff_term(self) -> int:
        return self._new_term() if self.handoff_fences else 0

    def handoff_requested(self, command: HandoffRequest, now: float) -> list[Outbound]:
        """Another broker owns ``command.room`` now: hand over what this one has of it."""
        fences = True
        if self.owner_of is not None and self.owner_of(command.room) != command.requester:
            # Not the owner in this broker's view: a view that lags (here or there), or a
            # peer after a room it does not own. It is answered as an owner would be (an
            # admitted broker may read room state), but its term fences nothing here.
            # ("Ask again" instead left two brokers whose views disagreed waiting on each
            # other until the handoff timeout, then both serving: chaos seed 21 lost 160.)
            self.refused(
                command.requester,
                f"HandoffRequest for {command.room!r}, which it does not own here "
                f"({self.owner_of(command.room)!r} does): answered, its term ignored",
                "room",
            )
            fences = False
        room = self.rooms.get(command.room)
        if room is None:
            return [(command.requester, Handoff(command.room, self.node_id, False))]
        if room.active and self.owns(command.room):
            # This broker's view still has it serve the room: ask again when views agree.
            return [(command.requester, Handoff(command.room, self.node_id, False, retry=True))]
        # Served here until now, or a passive copy (the runner-up of an owner that died,
        # e.g. the asker itself before it restarted): the most recent state there is.
        handoff = self.hand_over(command.room, now)
        if not room.active and fences:
            # The asker's ownership is newer than whatever replicates here: a deposed
            # owner's late batch must be refused, not kept behind the asker's back.
            room.term = max(room.term, command.term)
        return [(command.requester, handoff)]

    def hand_over(self, name: str, now: float) -> Handoff:
        """The whole released state of a room, and stop serving it here (if it did).

        What still waits for the runner-up goes nowhere: it was never acked, and the
        edges resend those requests to the new owner. A passive copy is handed over as it
        is (and kept): a replica's history, or only the membership.
        """
        room = self.rooms[name]
        released = room.released if room.active else room.offset
        prefix = f"{name}\x00"
        unreleased = {k for batch in room.pending for k in batch.keys}
        records = [
            _handed(session, key, r, now)
            for session, by_key in self._records.items()
            for key, r in by_key.items()
            if key.startswith(prefix) and (session, key) not in unreleased
        ]
        handoff = Handoff(
            name,
            self.node_id,
            True,
            term=room.term,
            epoch=room.epoch,
            offset=released,
            trimmed_through=room.trimmed_through,
            events=[
                ReplicatedEvent(e.offset, sorted(e.recipients), e.payload)
                for e in room.history
                if e.offset <= released
            ],
            members=_handed_members(room, now),
            records=records,
            history=room.active or room.replicated,
        )
        if room.active:
            self.demote(name)
        return handoff

    def handoff_received(self, command: Handoff, now: float) -> list[Outbound]:
        """The previous server's answer (or push): install the room, serve what waited."""
        out: list[Outbound] = []
        awaiting = self._awaiting.get(command.room)
        if self.owner_of is not None:
            # Only from the broker asked, or (a push: one stopping) the room's owner or the
            # one that served it before this one, in this broker's view.
            allowed = {self.owner_of(command.room), self.handoff_from(command.room)}
            if awaiting is not None:
                allowed.add(awaiting.source)
            if command.sender not in allowed:
                self.refused(
                    command.sender,
                    f"Handoff of {command.room!r}, which it neither owns nor served before "
                    "this broker, unasked",
                    "room",
                )
                return out
        if command.retry and awaiting is not None:
            return out  # asked again from ``expire``
        if command.present and command.epoch in self._ended:
            pass  # a copy of an incarnation that ended here: its members all left
        elif command.present:
            room = self.rooms.get(command.room)
            if room is None or self._newer_state(command, room):
                self._install(command, now, out)
            else:
                self._merge_members(room, command.members, now)
                if (
                    command.history
                    and room.replicated
                    and not room.active
                    and (command.epoch, command.term) == (room.epoch, room.term)
                ):
                    self._fill_in_handed(room, command, now)
        if awaiting is not None:
            del self._awaiting[command.room]
            out.extend(self._proceed(command.room, awaiting, now, timed_out=False))
        return out

    def _fill_in_handed(self, room: Room, handoff: Handoff, now: float) -> None:
        """A copy keeps its own state over a handoff of the same owner's term that is not
        newer (the owner handed it over with its last batch, which the copy has, still
        unacked), but takes what the handoff holds that it lacks: the history before a
        copy begun by a batch (``_fill_in``) and the reply records of the room (without
        them a resend of a request applied before that batch was applied again)."""
        self._fill_in(room, handoff.events, now)
        records_of = self._records
        lacking = [
            r
            for r in handoff.records
            if (mine := records_of.get(r.session)) is None or r.key not in mine
        ]
        self._take_records(room, lacking, now)

    @staticmethod
    def _newer_state(handoff: Handoff, room: Room) -> bool:
        """Whether a handed room is newer than what this broker has of it: a served room
        gives way only to a higher term; a replica with history only to a handoff with
        history and a higher (term, offset), or the same with more history (a copy begun
        by a batch, ``_fill_in``, handed the whole room by its owner stopping); a bare
        membership copy to anything."""
        if room.active:
            return room.term < handoff.term
        if not room.replicated:
            return True
        return handoff.history and (handoff.term, handoff.offset, -handoff.trimmed_through) > (
            room.term,
            room.offset,
            -room.trimmed_through,
        )

    def _merge_members(
        self, room: Room, members: list[HandedMember], now: float, owner: bool = False
    ) -> None:
        """Keep this broker's (newer) state, with the members only the sender knew: not
        one that left here since, from that connection (the sender's copy is stale), unless
        the sender is the room's owner (``owner``: its members are the room's). In a
        passive copy, a seat the sender knows on a newer connection is taken too: a copy
        that missed a resume (an attach sent while this broker was paused or unreachable)
        would otherwise keep the seat on the session's old edge, and refuse its signals
        after a takeover."""
        for handed in members:
            departed = room.departed.get(handed.session)
            if departed is not None:
                if owner:
                    del room.departed[handed.session]  # it joined again since
                    room.forgotten.discard(handed.session)
                elif not conn_supersedes(handed.conn, departed, True):
                    continue
            suspended = None if handed.suspended_for < 0 else now + handed.suspended_for
            member = room.members.get(handed.session)
            if member is None:
                room.members[handed.session] = Member(
                    handed.session, handed.peer, handed.edge, handed.conn, suspended, synced=False
                )
                self._rooms_of.setdefault(handed.session, set()).add(room.name)
            elif not room.active and conn_supersedes(handed.conn, member.conn, True):
                # (A served room's seats move only by the session's own edge: attach,
                # restore or join, which also re-sync its stream.)
                member.edge, member.conn, member.suspended_until = (
                    handed.edge,
                    handed.conn,
                    suspended,
                )

    def _proceed(
        self, name: str, awaiting: _Awaiting, now: float, timed_out: bool = True
    ) -> list[Outbound]:
        """Serve the room from here on (installed, or on what this broker has) and the
        commands that waited for it."""
        out: list[Outbound] = []
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name, self._new_epoch(), term=self._new_term())
            if timed_out:  # its server is gone with its state: the edges re-announce it
                room.rebuilding_until = self._rebuilds_until = now + self.rebuild_grace
        self._activate(room)
        # The view may have moved the room on while its state came: then it is kept for
        # the next owner (and what waited here is dropped by the gate; the edges resend).
        room.deposed = not self.owns(name)
        for command in awaiting.parked:
            if isinstance(command, tuple):
                self._attach_room(command[0], command[1], out)
            else:
                out.extend(self.handle(command, now))
        if not room.members and not room.pending and self.rooms.get(name) is room:
            del self.rooms[name]  # nobody joined after all
        return out

    def _install(self, command: Handoff, now: float, out: list[Outbound]) -> None:
        old = self.rooms.get(command.room)
        term = max(max(command.term, old.term if old is not None else 0) + 1, self._new_term())
        if old is not None:
            for member in old.members.values():
                self._unconfirmed.pop(member, None)
        if command.history:
            room = Room(
                command.room,
                command.epoch,
                offset=command.offset,
                trimmed_through=command.trimmed_through,
                released=command.offset,
                term=term,
            )
            room.history.extend(
                RoomEvent(e.offset, now, tuple(e.recipients), e.payload) for e in command.events
            )
        else:  # only the membership came: the offsets go on in a new epoch
            room = Room(
                command.room,
                self._new_epoch(),
                offset=command.offset,
                trimmed_through=command.offset,
                released=command.offset,
                term=max(term, self._new_term()),
            )
        self.rooms[command.room] = room
        room.deposed = not self.owns(command.room)  # pushed to a broker the view moved on from
        streaming: list[Member] = []
        for handed in command.members:
            suspended = None if handed.suspended_for < 0 else now + handed.suspended_for
            member = room.members[handed.session] = Member(
                handed.session, handed.peer, handed.edge, handed.conn, suspended, synced=False
            )
            self._rooms_of.setdefault(handed.session, set()).add(command.room)
            if suspended is None and handed.confirmed >= 0 and command.history:
                # The stream goes on from what the edge confirmed to the previous owner:
                # what it may not have is resent now (copies are dropped by the edge).
                member.synced = True
                member.confirmed, member.sent = handed.confirmed, room.released
                streaming.append(member)
        if old is not None:
            for session in old.members.keys() - room.members.keys():
                rooms = self._rooms_of.get(session)
                if rooms is not None:
                    rooms.discard(command.room)
                    if not rooms:
                        del self._rooms_of[session]
        # What this broker recorded of the room before is stale: the handed state is newer.
        prefix = f"{command.room}\x00"
        for by_key in self._records.values():
            for key in [k for k in by_key if k.startswith(prefix)]:
                del by_key[key]
        for by_room in self._inflows.values():
            by_room.pop(command.room, None)
        self._take_records(room, command.records, now)
        if self.hooks is not None and command.history and not room.deposed:
            self.hooks.taken(room, now, derive=False)
        for member in streaming if not room.deposed else ():
            if member.sent > member.confirmed:
                self._resend(room, member, now, out)
                if self.confirming:
                    self._unconfirmed[member] = room

    def began_serving(self, now: float) -> None:
        """This broker begins to serve rooms with nothing of them here (it started, or
        is back in the view): the edges' re-announcements are on their way."""
        self.rebuilding_until = self._rebuilds_until = now + self.rebuild_grace

    def _request(self, command: Request, now: float) -> list[Outbound]:
        if (
            now < self._rebuilds_until
            and type(command) is not JoinCmd
            and self._rebuilding(command, now)
        ):
            self.deferred += 1
            return []  # not answered: the edge resends it, by then the member is known
        if not command.rseq:
            return self._apply(command, now)
        # In the connection's order: a request that overtook one lost on the way waits.
        rooms = self._inflows.get(command.conn)
        if rooms is None:
            rooms = self._inflows[command.conn] = {}
            if len(self._inflows) > MAX_ORDERED_CONNS:
                self._inflows.popitem(last=False)
        else:
            self._inflows.move_to_end(command.conn)
        inflow = rooms.get(command.room)
        if inflow is None:
            inflow = rooms[command.room] = _Inflow(command.rbase - 1)
        elif command.rbase - 1 > inflow.applied:
            inflow.applied = command.rbase - 1  # answered before, e.g. by a previous owner
        answers = inflow.answers
        while answers:  # the edge has the answers below its rbase
            first = next(iter(answers))
            if first >= command.rbase:
                break
            del answers[first]
        if command.rseq <= inflow.applied:  # a resend of a request applied here
            out: list[Outbound] = []
            answer = answers.get(command.rseq)
            if answer is not None:
                self._answer_resend(command, answer, out, same_request=True)
                return out
            if command.rseq < command.rbase:
                return out  # the edge has had its answer
            return self._apply(command, now)  # applied by a previous owner: its record
        if command.rseq > inflow.applied + 1:
            if len(inflow.held) < MAX_HELD_REQUESTS:
                inflow.held[command.rseq] = command
            return []
        out = self._apply(command, now)
        answers[command.rseq] = self._last_record
        inflow.applied = command.rseq
        while inflow.held:
            following = inflow.held.pop(inflow.applied + 1, None)
            if following is None:
                break
            out.extend(self._apply(following, now))
            answers[following.rseq] = self._last_record
            inflow.applied = following.rseq
        return out

    def _rebuilding(self, command: Request, now: float) -> bool:
        """Whether ``command``'s room, or this broker, is being rebuilt from the edges'
        re-announcements and does not know a member the command needs yet (its sender,
        or the signal's target)."""
        room = self.rooms.get(command.room)
        server = type(command) is SignalCmd and command.server
        if room is None or not room.members:
            # Only this broker's own grace (it ends when it ends): a room made for the
            # request goes with it, and a grace renewed with it would never end.
            return now < self.rebuilding_until and not server
        if room.rebuilding_until <= now or not room.active or server:
            return False
        if type(command) is SignalCmd and command.to is not None and command.to not in room.members:
            return True
        return command.session not in room.members

    def _apply(self, command: Request, now: float) -> list[Outbound]:
        out: list[Outbound] = []
        if self.hooks is not None:
            self.hooks.ending.clear()
        # The same id in another room is another request: each room's owner decides alone.
        req = command.req
        if type(req) is int:  # ``request_key`` of the usual id, spelled out (hot path)
            key = f"{command.room}\x00i{req}"
        else:
            key = f"{command.room}\x00{request_key(req, command.conn, command.seq)}"
        session = command.session
        records = self._records.get(session)
        if records is not None:
            record = records.get(key)
            if record is not None and record.at > now - REPLY_RECORD_TTL:
                # What this request was answered (a resend of its rseq is answered the same)
                self._last_record = self._answer_resend(command, record, out)
                return out
        if isinstance(command, SignalCmd):  # most of the traffic: no membership to report
            try:
                payload, ok = self._signal(command, out, now), True
            except ProtocolError as exc:
                payload, ok = request_error(exc, req), False
            room = self.rooms.get(command.room)
            to = command.to  # ``fingerprint``, inline (hot path)
            crc = zlib.crc32(command.data, zlib.crc32(to.encode(), 1) if to else 1)
            epoch, offset = "", 0
            if command.server:
                crc = _server_fingerprint(command, crc)
                if ok and room is not None:
                    # The API is told where its event stands (a resend: the same place).
                    epoch, offset = room.epoch, room.offset
                    _note_recorder(room, session)
            record = _Record(b"" if ok else payload, crc, now, ok, epoch, offset)
            reply = Reply(
                session,
                command.conn,
                command.seq,
                payload,
                ok,
                epoch,
                offset,
                command.room,
                0 if room is None else room.term,
            )
        else:
            epoch, offset = "", 0
            try:
                if isinstance(command, JoinCmd):
                    payload, epoch, offset = self._join(command, out, now)
                else:
                    payload = self._leave(command, out, now)
                ok = True
            except ProtocolError as exc:
                payload, ok = request_error(exc, req), False
            room = self.rooms.get(command.room)
            member = room is not None and session in room.members
            record = _Record(payload, fingerprint(command), now, ok, epoch, offset, member)
            reply = self._reply(command, record, room, member)
        self._last_record = record
        self._remember(session, key, record)
        # The ack leaves after the deliveries it acknowledges (and after the runner-up has
        # the events): a broker killed before that has not acked, so the edge retries.
        if not self._parked and (room is None or not room.pending):
            if self.hooks is not None and self.hooks.ending:
                # This leave ended the room: its answer waits until the runner-up has the
                # room's last webhook events (nothing else records the end).
                out.extend(self.hooks.hold((command.edge, reply)))
                return out
            out.append((command.edge, reply))  # nothing to replicate, nothing held before
            return out
        self._seal(out, now, command, (command.edge, reply), key, record)
        return out

    def _answer_resend(
        self, command: Request, record: _Record, out: list[Outbound], same_request: bool = False
    ) -> _Record:
        """A resend of a request already applied: the same answer, nothing applied again.

        Its events reach their targets through their own delivery streams (confirmed,
        resent, replayed on sync), so only the reply is sent again, behind whatever the
        room still holds for its runner-up. The edge's resend of the same request (same
        ``rseq``) is told the membership that request left; a new request under an old id
        changes nothing, so it is told the membership now. Returns the record as answered
        (what a resend of this request's ``rseq`` is answered).
        """
        if not record.repeats(command):
            exc = BadRequest(f"request id {command.req!r} was already used for another request")
            refusal = _Record(request_error(exc, command.req), 0, 0.0, False)
            out.append((command.edge, _reply(command, refusal, 0)))
            return record
        room = self.rooms.get(command.room)
        if (
            type(command) is JoinCmd
            and record.ok
            and room is not None
            and not room.deposed
            and command.session not in room.members
            and command.session not in room.departed
            and record.epoch == room.epoch
        ):
            self._activate(room)  # (served here: the command passed the gate)
            self._seat_recorded_join(room, command, record, out)
        member = (
            record.member
            if same_request
            else (room is not None and command.session in room.members)
        )
        if member and not same_request and type(command) is JoinCmd:
            assert room is not None
            seat = room.members[command.session]
            joined = seat.joined if seat.joined_in == room.epoch else 0
            if record.epoch != room.epoch or record.offset < joined:
                # Recorded for an earlier membership or incarnation of the room: the edge
                # takes its position from the reply, so it gets the current stream's (as a
                # no-op join would), not one that stream never had.
                start = seat.confirmed if self.confirming else room.offset
                record = msgspec.structs.replace(record, epoch=room.epoch, offset=start)
            elif (
                joined
                and self.confirming
                and seat.conn == command.conn
                and max(joined, room.trimmed_through) <= record.offset < seat.confirmed
            ):
                # The stream was restarted past this join's start since (a resume that
                # named no position: reported lost, and that report may never arrive),
                # and an edge with no position takes the record's: resend from there.
                seat.confirmed = seat.start = record.offset
                self._resend(room, seat, self._now, out)
                self._unconfirmed[seat] = room
        if member != record.member:
            record = msgspec.structs.replace(record, member=member)
        reply = (command.edge, self._reply(command, record, room, member))
        if room is not None and room.pending:
            room.pending.append(
                _Batch(None, None, number=None, events=[], after=[reply], confirmed=True)
            )
        else:
            out.append(reply)
        return record

    def _seat_recorded_join(
        self, room: Room, command: JoinCmd, record: _Record, out: list[Outbound]
    ) -> None:
        """A resent join this broker has the record of (replicated) but no seat for: the
        owner that applied it died before answering, so its edge never re-announced the
        member to the runner-up. Seated now, its stream from the join's answer on."""
        seat = room.members[command.session] = Member(
            command.session, command.peer, command.edge, command.conn
        )
        self._rooms_of.setdefault(command.session, set()).add(room.name)
        start = max(record.offset, room.trimmed_through)
        seat.confirmed = seat.start = seat.joined = start
        seat.joined_in, seat.joined_by = room.epoch, command.conn
        seat.sent = self._replay(room, seat, start, room.released, out)
        if self.confirming and seat.sent > seat.confirmed:
            seat.sent_at = self._now
            self._unconfirmed[seat] = room

    @staticmethod
    def _reply(command: Request, record: _Record, room: Room | None, member: bool) -> Reply:
        """The answer to ``command``, with the room's term and, for a join or leave,
        whether the session is a member (``member``)."""
        if room is None:
            return _reply(command, record, 0, member)
        if type(command) is SignalCmd:
            return _reply(command, record, room.term)
        return _reply(command, record, room.term, member)

    def _remember(self, session: str, key: str, record: _Record) -> None:
        records_of = self._records
        records = records_of.get(session)
        if records is None:
            records = records_of[session] = {}
            if len(records_of) > MAX_RECORDED_SESSIONS:
                records_of.popitem(last=False)
        else:
            records_of.move_to_end(session)
            if key in records:
                del records[key]  # to the end: the newest
        records[key] = record
        if len(records) > REPLY_RECORDS_PER_SESSION:
            del records[next(iter(records))]

    def _prune_records(self, now: float) -> None:
        """Drop reply records past their age (sessions in order of their latest record)."""
        oldest_allowed = now - REPLY_RECORD_TTL
        records_of = self._records
        while records_of:
            session, records = next(iter(records_of.items()))
            newest = next(reversed(records.values()), None)
            if newest is not None and newest.at > oldest_allowed:
                break  # the others' latest records are newer still
            del records_of[session]

    # ----------------------------------------------------------------- requests

    def _heard_from(self, session: str, conn: str, edge: str) -> tuple[str, str]:
        """Note ``conn`` as the session's newest connection if it is; the newest one's
        (conn, edge)."""
        latest = self._latest.get(session)
        if latest is None or conn_supersedes(conn, latest[0]):  # of the same generation: the last
            latest = self._latest[session] = (conn, edge)
            if len(self._latest) > MAX_LATEST_CONNS:
                self._latest.popitem(last=False)
        return latest

    def _join(self, command: JoinCmd, out: list[Outbound], now: float) -> tuple[bytes, str, int]:
        conn, edge = self._heard_from(command.session, command.conn, command.edge)
        room = self.rooms.get(command.room)
        if room is None:
            room = self.rooms[command.room] = Room(
                command.room, self._new_epoch(), term=self._new_term()
            )
            # While this broker is rebuilding, the room's other members may be known only
            # once their edges re-announce them.
            room.rebuilding_until = self.rebuilding_until
        self._activate(room)
        member = room.members.get(command.session)
        if member is None:
            if len(room.members) >= self.capacity:
                if not room.members:
                    del self.rooms[command.room]
                raise RoomFull(f"room {command.room!r} is full ({self.capacity} members)")
            others = list(room.members.values())
            # On the session's newest connection: a join that was overtaken by a resume
            # (sent on the dropped connection) binds the seat to the live one.
            member = room.members[command.session] = Member(
                command.session, command.peer, edge, conn
            )
            self._rooms_of.setdefault(command.session, set()).add(command.room)
            frame = PeerJoinedFrame(room=room.name, peer=Raw(command.peer), offset=room.offset + 1)
            self._record(room, others, encode_frame(frame), now, out)
            # The stream starts at the room's offset now (its own peer-joined is not for
            # it); later events are released after this reply, so ``offset`` is what the
            # edge has written when it reads the reply.
            member.sent = member.confirmed = member.start = member.joined = room.offset
            member.joined_in, member.joined_by = room.epoch, command.conn
            room.departed.pop(command.session, None)
        elif conn_supersedes(command.conn, member.conn):
            # Joining twice is a no-op success; it also re-homes a session that moved.
            away = member.suspended_until is not None
            member.edge, member.conn, member.suspended_until = command.edge, command.conn, None
            if not member.synced:
                # The edge takes the reply's offset if it had no position; if it had one,
                # its first confirm reports a gap and is believed (``confirm``).
                member.synced = True
                member.sent = member.confirmed = member.start = room.released
            elif away and member.sent < room.released:
                # What was recorded while it was away was held back: its stream goes on
                # with it (the attach that would replay it may be lost, or come later).
                sent = self._replay(room, member, member.sent, room.released, out)
                if self.confirming and member.sent == member.confirmed < sent:
                    member.sent_at = now
                    self._unconfirmed[member] = room
                member.sent = sent
        members = [Raw(m.peer) for s, m in room.members.items() if s != command.session]
        # The joiner starts where its stream is confirmed: what came after is (re)sent to
        # it, so a join whose first answer was lost skips nothing. (Unconfirmed streams, in
        # one process, lose nothing: the room's offset.)
        start = member.confirmed if self.confirming else room.offset
        joined = JoinedFrame(
            room=room.name, epoch=room.epoch, offset=start, members=members, id=command.req
        )
        return encode_frame(joined), room.epoch, start

    def _leave(self, command: LeaveCmd, out: list[Outbound], now: float) -> bytes:
        room = self.rooms.get(command.room)
        if room is None or command.session not in room.members:
            raise NotInRoom(f"not a member of room {command.room!r}")
        self._activate(room)
        self._remove(room, command.session, "left", now, out)
        return encode_frame(LeftFrame(room=command.room, id=command.req))

    def _signal(self, command: SignalCmd, out: list[Outbound], now: float) -> bytes:
        room = self.rooms.get(command.room)
        if command.server:
            self._server_signal(command, room, out, now)
            return b""
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
        self._record(room, targets, encode_frame(frame), now, out)
        return b"" if command.req is None else encode_frame(AckFrame(id=command.req))

    def _server_signal(
        self, command: SignalCmd, room: Room | None, out: list[Outbound], now: float
    ) -> None:
        """A server API publish (or close): one event of the room, like a member's signal,
        from the API's pseudo-session (never a member: no seat to check)."""
        if room is None or not room.members:
            raise NotFound(f"room {command.room!r} has no members")
        if not room.active:
            self._activate(room)
        members = room.members
        if command.close:
            targets = list(members.values())
            reason = _reason_of(command.data)
            frame: RoomClosedFrame | SignalFrame = RoomClosedFrame(
                room=room.name, offset=room.offset + 1, reason=reason
            )
        else:
            if command.to is not None:
                target = members.get(command.to)
                if target is None:
                    raise UnknownPeer(f"{command.to!r} is not a member of {command.room!r}")
                targets = [target]
            elif command.to_user is not None:
                targets = [m for m in members.values() if _user_of(m.peer) == command.to_user]
                if not targets:
                    raise UnknownPeer(
                        f"user {command.to_user!r} has no session in {command.room!r}"
                    )
            else:
                targets = list(members.values())
            frame = SignalFrame(
                room=room.name,
                data=Raw(command.data),
                offset=room.offset + 1,
                from_=Raw(command.sender),
            )
        self._record(room, targets, encode_frame(frame), now, out)

    # ----------------------------------------------------------------- server API queries

    def _listed(self, name: str, room: Room) -> bool:
        """Whether this broker answers for ``room`` in a listing: it owns it in its view
        (a runner-up's copy, a deposed owner's state are another broker's to list)."""
        return bool(room.members) and not room.deposed and self.owns(name)

    def rooms_page(self, command: RoomsQuery) -> list[Outbound]:
        """The rooms this broker serves named after ``command.after``, in name order."""
        limit = max(1, min(command.limit, MAX_ROOMS_PAGE))
        after = command.after
        names = heapq.nsmallest(
            limit + 1,
            (n for n, r in self.rooms.items() if n > after and self._listed(n, r)),
        )
        rooms = [_summary(self.rooms[n]) for n in names[:limit]]
        body = encode_json({"rooms": rooms, "more": len(names) > limit})
        return [(command.edge, ApiAnswer(command.qid, 200, body))]

    def room_info(self, command: RoomQuery) -> list[Outbound]:
        """The room and its members, if this broker owns it; nothing while it does not
        (yet) or waits for its state (the edge asks again, then gives up: 503)."""
        name = command.room
        if not self.owns(name) or name in self._awaiting:
            return []
        room = self.rooms.get(name)
        if room is None or not self._listed(name, room):
            error = encode_json({"code": "not_found", "message": f"no room {name!r}"})
            return [(command.edge, ApiAnswer(command.qid, 404, error))]
        members = []
        for member in room.members.values():
            peer = msgspec.json.decode(member.peer)
            peer["connected"] = member.suspended_until is None
            members.append(peer)
        info = _summary(room)
        info["members"] = members
        return [(command.edge, ApiAnswer(command.qid, 200, encode_json(info)))]

    # ----------------------------------------------------------------- ownership

    def restore(self, command: RestoreCmd, now: float) -> list[Outbound]:
        """Put back a member an edge re-announced (as owner, or as passive replica).

        To the owner, the edge also says what it has written to the session in the room:
        what came after is replayed, and ``Synced`` tells the edge the stream is open.
        """
        out: list[Outbound] = []
        if not command.replica:
            latest = self._heard_from(command.session, command.conn, command.edge)
            if latest[0] != command.conn:
                return out  # from an older connection than the session's newest
        room = self.rooms.get(command.room)
        if room is None:
            # A passive room has no term of its own (0): its owner's replication sets it.
            term = 0 if command.replica else self._new_term()
            room = self.rooms[command.room] = Room(
                command.room, self._new_epoch(), active=not command.replica, term=term
            )
            if not command.replica:
                room.rebuilding_until = self._rebuilds_until = now + self.rebuild_grace
        elif not command.replica:
            self._activate(room)
        member = room.members.get(command.session)
        departed = room.departed.get(command.session)
        # To a passive copy told of the leave by the edge (``ForgetCmd``), a re-announcement
        # comes from that edge on the same link, after it: one from the same connection is
        # a join since (a session that left and joined again), not a late word. (A leave
        # the owner replicated, or applied where the room is served, came another way:
        # only a newer connection is news.)
        again = command.replica and not room.active and command.session in room.forgotten
        if (
            member is None
            and departed is not None
            and not conn_supersedes(command.conn, departed, not again)
        ):
            if not room.members:
                del self.rooms[command.room]
            return out  # it left from that connection or a newer one: a late word
        if member is not None and not conn_supersedes(command.conn, member.conn):
            return out  # from an older connection of the session than the member's
        if member is None:
            member = room.members[command.session] = Member(
                command.session, command.peer, command.edge, command.conn, synced=False
            )
            self._rooms_of.setdefault(command.session, set()).add(command.room)
        else:
            # From the member's connection or a newer one (checked above; a seat moving to
            # another edge was ticketed): the session lives there now, suspended or not. A
            # suspended seat left on a dead edge would refuse every signal of the session
            # until its window lapsed (chaos seed 21: a runner-up's copy of a moved seat).
            member.edge, member.conn, member.suspended_until = command.edge, command.conn, None
        if command.replica:
            member.synced = False  # a replica has no stream; a takeover syncs anew
        elif member.conn == command.conn and member.edge == command.edge:
            self._sync(room, member, command.epoch, command.offset, False, now, out)
        return out

    def forget(self, command: ForgetCmd) -> None:
        """A replica's member left (the owner told its peers)."""
        room = self.rooms.get(command.room)
        if room is not None and not room.active and command.session in room.members:
            member = room.members[command.session]
            if member.edge != command.edge:
                self._not_theirs(command, member)
                return
            self._remove(room, command.session, "left", 0.0, [])
            room.forgotten.add(command.session)
        elif room is not None and not room.active and command.session in room.departed:
            # Gone already by the owner's replicated peer-left: the edge's word on it came
            # too (what it re-announces from now on is a join since).
            room.forgotten.add(command.session)

    def _activate(self, room: Room) -> None:
        if room.active:
            return
        room.active = True
        if room.replicated:
            # Everything the previous owner replicated is known here: visible from now on.
            room.released = room.offset
            room.term = max(room.term + 1, self._new_term())
            if self.hooks is not None:
                self.hooks.taken(room, self._now)
        else:
            room.term = self._new_term()
            # Whatever history there was died with the previous owner: a new epoch tells
            # resuming clients that they cannot recover what they missed there.
            room.epoch = self._new_epoch()
            room.history.clear()
            room.trimmed_through = room.released = room.offset
        for member in room.members.values():
            member.synced = False  # until its edge says what it has (restore, attach)

    # ----------------------------------------------------------------- delivery streams

    def _sync(
        self,
        room: Room,
        member: Member,
        epoch: str,
        position: int,
        report: bool,
        now: float,
        out: list[Outbound],
    ) -> None:
        """Open ``member``'s stream after ``position``: replay what came after, or say so."""
        # (``joined`` bounds nothing if the member joined in an earlier incarnation.)
        joined = member.joined if member.joined_in == room.epoch else 0
        if (
            joined
            and member.joined_by == member.conn
            and (epoch != room.epoch or position < joined)
        ):
            # This connection joined: the join's answer starts its stream (whatever it
            # named is of an earlier membership, or was dropped when a leave was answered).
            epoch, position = room.epoch, min(joined, room.released)
        elif epoch == room.epoch and position < joined:
            # A position from an earlier membership (the edge's or the SDK's, named before
            # the leave and join were answered): what came before this one is not the
            # member's, and the edge resets its position to the join's when answered.
            position = min(joined, room.released)
        complete = epoch == room.epoch and room.trimmed_through <= position <= room.released
        sent = position if complete else room.released
        if complete:
            sent = self._replay(room, member, position, room.released, out)
        member.synced = True
        start = member.confirmed = member.start = position if complete else room.released
        member.sent = sent
        member.sent_at = now
        if self.confirming and member.sent > member.confirmed:
            self._unconfirmed[member] = room
        else:
            self._unconfirmed.pop(member, None)
        synced = Synced(
            member.session,
            member.conn,
            room.name,
            room.epoch,
            # Where the stream starts: the replay moves the edge on from there, and what of
            # it the edge dropped (a gap) is resent, not taken as written.
            start,
            complete,
            report or not complete,
            member.peer,
            room.term,
        )
        if self.confirming:
            member.syncing = synced
            self._unconfirmed[member] = room
        out.append((member.edge, synced))

    def confirm(self, command: Confirm, now: float) -> list[Outbound]:
        """An edge says what it has written; resend at once where it saw a gap."""
        out: list[Outbound] = []
        for name, session, epoch, offset, gap in command.positions:
            room = self.rooms.get(name)
            member = room.members.get(session) if room is not None else None
            if room is None or member is None or not room.active or not member.synced:
                continue
            if member.edge != command.edge or member.suspended_until is not None:
                continue  # a late word from an edge that no longer holds the session
            if epoch != room.epoch:
                continue  # about an earlier incarnation of the room
            # A position in this epoch: the edge had the ``Synced`` (it had none before; an
            # edge sends nothing of a connection that closed, ``EdgeCore.closed``).
            member.syncing = None
            if gap and offset < member.confirmed:
                # The edge knows best what it has written, but not below where this
                # member's stream started (that would be an earlier membership's).
                member.confirmed = max(offset, member.start)
            elif offset > member.confirmed:
                member.confirmed = offset
                member.sent_at = now  # progress: the resend timer starts over
                if offset > member.sent:
                    member.sent = offset
            if member.confirmed >= member.sent:
                self._unconfirmed.pop(member, None)
            elif gap and now - member.sent_at >= GAP_RESEND_INTERVAL:
                self._resend(room, member, now, out)
                self._unconfirmed[member] = room
            else:
                self._unconfirmed[member] = room
        return out

    def _resend(self, room: Room, member: Member, now: float, out: list[Outbound]) -> None:
        """Send ``member`` again what its edge has not confirmed, in order."""
        member.sent_at = now
        if member.confirmed < room.trimmed_through:
            # No longer in the history: the client is told it cannot recover.
            self._sync(room, member, "", 0, True, now, out)
            return
        if member.syncing is not None:
            out.append((member.edge, member.syncing))
        self._replay(room, member, member.confirmed, member.sent, out)

    @staticmethod
    def _replay(room: Room, member: Member, after: int, through: int, out: list[Outbound]) -> int:
        """Send ``member`` its events in (``after``, ``through``] from the history, each
        after the one before it (``prev``); the offset of the last one sent (or ``after``)."""
        prev = after
        for event in room.history:
            if after < event.offset <= through and member.session in event.recipients:
                deliver = Deliver(
                    [member.session],
                    event.payload,
                    room.name,
                    event.offset,
                    prev,
                    room.term,
                    room.epoch,
                )
                out.append((member.edge, deliver))
                prev = event.offset
        return prev

    def resend_unconfirmed(self, now: float) -> list[Outbound]:
        """Resend what has gone unconfirmed for ``resend_after`` seconds."""
        out: list[Outbound] = []
        late = now - self.resend_after
        for member, room in list(self._unconfirmed.items()):
            if member.sent_at <= late:
                if (
                    member.suspended_until is not None
                    or room.members.get(member.session) is not member
                ):
                    del self._unconfirmed[member]
                else:
                    self._resend(room, member, now, out)
        return out

    # ----------------------------------------------------------------- sessions

    def attach(self, command: AttachCmd) -> list[Outbound]:
        """A resumed session is back on ``command.edge``: re-home it, replay, report."""
        out: list[Outbound] = []
        if self._moves_unticketed(command):
            return out
        if self._heard_from(command.session, command.conn, command.edge)[0] != command.conn:
            return out  # a late attach of an older connection of the session
        names = self._rooms_of.get(command.session, set()) | command.positions.keys()
        for name in sorted(names):
            room = self.rooms.get(name)
            if room is None or not room.active or room.deposed:
                waiting = self._gate(name, (command, name), self._now)
                if waiting is not None:
                    room = self.rooms.get(name)
                    member = room.members.get(command.session) if room is not None else None
                    if member is not None and conn_supersedes(command.conn, member.conn, True):
                        # Re-homed at once (a replica's or one whose handoff is awaited):
                        # its owner reports recovery.
                        member.edge, member.conn = command.edge, command.conn
                        member.suspended_until, member.synced = None, False
                    out.extend(waiting)
                    continue
            self._attach_room(command, name, out)
        return out

    def _attach_room(self, command: AttachCmd, name: str, out: list[Outbound]) -> None:
        room = self.rooms.get(name)
        member = room.members.get(command.session) if room else None
        if room is None or member is None:
            if name in command.positions:
                out.append(_recovered(command, name, False))
            return
        if not conn_supersedes(command.conn, member.conn):
            return  # a late attach of an older connection: the newer one holds the seat
        member.edge, member.conn, member.suspended_until = command.edge, command.conn, None
        if not room.active:
            self._activate(room)
        position = command.positions.get(name)
        if position is None:
            self._sync(room, member, "", 0, True, self._now, out)
        else:
            self._sync(room, member, position.epoch, position.offset, True, self._now, out)

    def detach(self, command: DetachCmd, now: float) -> list[Outbound]:
        """The connection holding a session ended (leave all) or dropped (suspend)."""
        out: list[Outbound] = []
        for name in sorted(self._rooms_of.get(command.session, ())):
            room = self.rooms[name]
            member = room.members[command.session]
            if member.conn != command.conn:
                continue  # a stale report: the session already lives on another connection
            if member.edge != command.edge:
                return self._not_theirs(command, member)
            if command.ended:
                self._remove(room, command.session, "disconnected", now, out)
            else:
                member.suspended_until = now + self.resume_window
                self._unconfirmed.pop(member, None)
        if command.ended and command.session not in self._rooms_of:
            # An ended session cannot resend anything: its records can go.
            self._records.pop(command.session, None)
        # Nothing held for the connection can be answered any more (a resumed session
        # resends on its new connection).
        self._inflows.pop(command.conn, None)
        self._seal(out, now)
        return out

    def edge_lost(self, edge: str, now: float) -> list[Outbound]:
        """An edge stopped heartbeating: suspend every session it held."""
        for room in self.rooms.values():
            for member in room.members.values():
                if member.edge == edge and member.suspended_until is None:
                    member.suspended_until = now + self.resume_window
                    self._unconfirmed.pop(member, None)
        return []

    def expire(self, now: float) -> list[Outbound]:
        """Remove members whose resume window lapsed; trim history by age; resend."""
        self._now = now
        out: list[Outbound] = []
        for room in list(self.rooms.values()):
            if room.deposed:
                continue  # its new owner expires its members (handed with what is left)
            lapsed = [
                session
                for session, member in room.members.items()
                if member.suspended_until is not None and member.suspended_until <= now
            ]
            for session in lapsed:
                self._remove(room, session, "timeout", now, out)
            if room.name in self.rooms:
                self._trim(room, now)
                if room.pending:
                    self._resend_batches(room, now, out)
        self._seal(out, now)
        self._prune_records(now)
        for name, awaiting in list(self._awaiting.items()):
            if now - awaiting.since >= self.handoff_timeout:
                # The previous server does not answer: serve on what this broker has.
                del self._awaiting[name]
                out.extend(self._proceed(name, awaiting, now))
            elif now >= awaiting.ask_again_at:
                awaiting.ask_again_at = now + 0.25
                if not self.in_view(awaiting.source):
                    # Gone (stopped after handing its rooms on, or dead): the broker that
                    # comes before this one now has the room, or its copy.
                    awaiting.source = self.handoff_from(name) or awaiting.source
                out.append(
                    (awaiting.source, HandoffRequest(name, self.node_id, self._handoff_term()))
                )
        if self._unconfirmed:
            out.extend(self.resend_unconfirmed(now))
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
        self._unseat(room, session, member)
        if not room.members:
            del self.rooms[room.name]  # a new room of that name gets a new epoch
            if room.active and not room.deposed:
                self._ended[room.epoch] = None
                if len(self._ended) > MAX_ENDED_EPOCHS:
                    self._ended.popitem(last=False)
            hooks = self.hooks if room.active and not room.deposed else None
            while room.pending:  # nobody is left to need the events; replies still go
                batch = room.pending.popleft()
                if hooks is not None:  # (their replies say they happened)
                    for event in batch.events:
                        hooks.released(room, event, now)
                out.extend(batch.after)
            if hooks is not None:
                hooks.ended(room, member, reason, now)
            return
        if not room.active or room.deposed:
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
    ) -> None:
        """Number an event, keep it for replay, and release it now or after replication."""
        room.offset += 1
        sessions = (
            (recipients[0].session,)
            if len(recipients) == 1
            else tuple([m.session for m in recipients])
        )
        event = RoomEvent(room.offset, now, sessions, payload)
        history = room.history
        history.append(event)
        if len(history) > self.history_max_events or history[0].at < now - self.history_max_age:
            self._trim(room, now)
        if not room.pending and (not self._replicating or self.replica_for(room.name) is None):
            room.released = event.offset
            self._deliver(room, event, recipients, now, out)
            if self.hooks is not None:
                self.hooks.released(room, event, now)
            return
        parked = self._parked.get(room.name)
        if parked is None:
            parked = self._parked[room.name] = (room, [])
        parked[1].append(event)

    def _deliver(
        self,
        room: Room,
        event: RoomEvent,
        recipients: list[Member] | None,
        now: float,
        out: list[Outbound],
    ) -> None:
        """Send a released event to its attached, synced recipients (one Deliver per edge
        and ``prev``)."""
        if recipients is None:
            members = room.members
            recipients = [m for s in event.recipients if (m := members.get(s)) is not None]
        offset = event.offset
        if len(recipients) == 1:  # a signal to one peer: most of the traffic
            member = recipients[0]
            if member.suspended_until is not None or not member.synced or member.sent >= offset:
                return
            prev = member.sent
            member.sent = offset
            if self.confirming and prev == member.confirmed:
                member.sent_at = now
                self._unconfirmed[member] = room
            out.append(
                (
                    member.edge,
                    Deliver(
                        [member.session],
                        event.payload,
                        room.name,
                        offset,
                        prev,
                        room.term,
                        room.epoch,
                    ),
                )
            )
            return
        groups: dict[tuple[str, int], list[str]] = {}
        for member in recipients:
            if member.suspended_until is not None or not member.synced or member.sent >= offset:
                continue
            prev = member.sent
            member.sent = offset
            if self.confirming and prev == member.confirmed:
                member.sent_at = now
                self._unconfirmed[member] = room
            group = groups.get((member.edge, prev))
            if group is None:
                groups[(member.edge, prev)] = [member.session]
            else:
                group.append(member.session)
        for (edge, prev), sessions in groups.items():
            out.append(
                (
                    edge,
                    Deliver(
                        sessions, event.payload, room.name, offset, prev, room.term, room.epoch
                    ),
                )
            )

    def _seal(
        self,
        out: list[Outbound],
        now: float,
        request: Request | None = None,
        reply: Outbound | None = None,
        key: str = "",
        record: _Record | None = None,
    ) -> None:
        """End a command: replicate what it recorded, hold or release it."""
        parked = self._parked
        if parked:
            self._parked = {}
        for name, (room, events) in parked.items():
            after: list[Outbound] = []
            carries_reply = request is not None and reply is not None and name == request.room
            if carries_reply:
                assert reply is not None
                after.append(reply)
                reply = None
            replica = self.replica_for(name)
            keys = [(request.session, key)] if carries_reply and request is not None else []
            if self.rooms.get(name) is not room or replica is None:
                # Gone (its last member left) or nobody to replicate to: let it out,
                # behind whatever the room still holds.
                room.pending.append(
                    _Batch(
                        None,
                        None,
                        number=None,
                        events=events,
                        after=after,
                        confirmed=True,
                        keys=keys,
                    )
                )
                self._release(room, now, out)
                continue
            number = room.next_batch
            room.next_batch += 1
            members: list[HandedMember] = []
            records: list[HandedRecord] = []
            if room.replica_target != replica:
                # A runner-up new to the room gets the whole history, not only this batch,
                # the members (those away from their edges are known nowhere else) and
                # the reply records (a resend after its takeover finds its answer).
                room.replica_target = replica
                sent = list(room.history)
                members = _handed_members(room, now)
                records = self._records_of(room, now)
            else:
                sent = events
            replicate = ReplicateCmd(
                self.node_id,
                name,
                room.epoch,
                number,
                [ReplicatedEvent(e.offset, sorted(e.recipients), e.payload) for e in sent],
                room.term,
                members=members,
                records=records,
            )
            if carries_reply and request is not None and record is not None:
                # The runner-up learns the answer too: a resend after takeover gets it.
                replicate = msgspec.structs.replace(
                    replicate,
                    reply_session=request.session,
                    reply_key=key,
                    reply_fingerprint=record.fingerprint,
                    reply_ok=record.ok,
                    reply_epoch=record.epoch,
                    reply_offset=record.offset,
                    reply_payload=record.payload,
                )
            room.pending.append(
                _Batch(
                    replicate,
                    replica,
                    number=number,
                    events=events,
                    after=after,
                    keys=keys,
                    sent_at=now,
                )
            )
            out.append((replica, replicate))
        if reply is not None:
            room_of_reply = self.rooms.get(request.room) if request is not None else None
            if room_of_reply is not None and room_of_reply.pending:
                room_of_reply.pending.append(
                    _Batch(None, None, number=None, events=[], after=[reply], confirmed=True)
                )
            else:
                out.append(reply)

    def _release(self, room: Room, now: float, out: list[Outbound]) -> None:
        """Let out every batch at the head of ``room.pending`` that is confirmed."""
        pending = room.pending
        while pending and pending[0].confirmed:
            batch = pending.popleft()
            for event in batch.events:
                room.released = event.offset
                if room.active and self.rooms.get(room.name) is room:
                    self._deliver(room, event, None, now, out)
                    if self.hooks is not None and not room.deposed:
                        self.hooks.released(room, event, now)
            out.extend(batch.after)

    # ----------------------------------------------------------------- replication

    def fenced(self, name: str, term: int) -> list[Outbound]:
        """The runner-up knows a newer owner of ``name``: stop serving it (its next command
        here asks that owner for a handoff, if this broker owns the room in its view)."""
        room = self.rooms.get(name)
        if room is not None and room.active and term > room.term:
            self.demote(name)
        return []

    def replica_acked(self, name: str, batch: int, now: float, replica: str = "") -> list[Outbound]:
        """Broker ``replica`` has batch ``batch`` of ``name``: if that batch was last sent
        there (the room's runner-up, as far as this owner knows), release what waited for
        it. An ack from a runner-up replaced since releases nothing. (One that names no
        broker comes from a broker of an earlier version, during a rolling upgrade: taken
        as before.)"""
        out: list[Outbound] = []
        room = self.rooms.get(name)
        if room is None:
            return out
        for held in room.pending:
            if held.number == batch:
                if replica and held.target != replica:  # ("": a broker of an older version)
                    self.late_acks += 1
                    return out
                held.confirmed = True
        self._release(room, now, out)
        return out

    def replicas_changed(self, now: float = 0.0) -> list[Outbound]:
        """The placement may have changed: rooms owned elsewhere now are deposed here; the
        runner-ups may have changed (or restarted empty): the next batch of every room
        carries its whole history; resend unconfirmed batches (or stop waiting)."""
        out: list[Outbound] = []
        for room in list(self.rooms.values()):
            room.replica_target = None
            if room.active:
                # The placement may have moved: a room this broker no longer owns serves
                # nothing more here (a view that moves it back lets it go on: see the known
                # limit "Views that change twice within a handoff", docs/reliability.md).
                room.deposed = not self.owns(room.name)
            if not room.pending:
                continue
            replica = self.replica_for(room.name)
            for held in room.pending:
                if (
                    replica is not None
                    and room.replica_target != replica
                    and not held.confirmed
                    and held.message is not None
                    and held.target != replica
                ):
                    # A runner-up new to the room gets its whole history first.
                    room.replica_target = replica
                    out.append((replica, self._snapshot(room, now)))
                retarget(held, replica, now, out)
            self._release(room, now, out)
        return out

    def _resend_batches(self, room: Room, now: float, out: list[Outbound]) -> None:
        """Send the runner-up again what it has not answered for ``resend_after``: a batch
        or its ack lost on a reset link (the runner-up skips events it has)."""
        resend_late(room.pending, now, self.resend_after, out)

    def _snapshot(self, room: Room, now: float) -> ReplicateCmd:
        """The room's whole history and members for a new runner-up (batch -1: its ack
        waits for none)."""
        events = [ReplicatedEvent(e.offset, sorted(e.recipients), e.payload) for e in room.history]
        return ReplicateCmd(
            self.node_id,
            room.name,
            room.epoch,
            -1,
            events,
            room.term,
            members=_handed_members(room, now),
            records=self._records_of(room, now),
        )

    def _records_of(self, room: Room, now: float) -> list[HandedRecord]:
        """The reply records of ``room``'s requests, for a runner-up given its whole history.

        All of them, also those of events not released yet: the history sent with them
        holds those events, and the batches that carried their records went to the runner-up
        before this one (which the new one never gets: chaos seed 11, an owner killed and
        back within a second, applied four signals again). Looked up by the sessions that can
        have records of the room (members, departed, ``recorders``), not by scanning every
        session's records (a new room's first batch comes here)."""
        prefix = f"{room.name}\x00"
        oldest_allowed = now - REPLY_RECORD_TTL
        found: list[HandedRecord] = []
        records_of = self._records
        for session in room.members.keys() | room.departed.keys() | room.recorders:
            by_key = records_of.get(session)
            if by_key is None:
                continue
            found.extend(
                _handed(session, k, r, now)
                for k, r in by_key.items()
                if k.startswith(prefix) and r.at > oldest_allowed
            )
        return found

    def _take_records(self, room: Room, records: list[HandedRecord], now: float) -> None:
        """Keep reply records of ``room`` handed over or replicated from another broker."""
        for r in records:
            record = _Record(r.payload, r.fingerprint, now - r.age, r.ok, r.epoch, r.offset)
            self._remember(r.session, r.key, record)
            _note_recorder(room, r.session)

    def replicate(self, command: ReplicateCmd, now: float) -> list[Outbound]:
        """Runner-up side: keep the owner's events (and reply) for a takeover."""
        if self.owner_of is not None and self.owner_of(command.room) != command.owner:
            # Not the room's owner in this broker's view: nothing kept, nothing acked (a
            # view that lags resends; a peer replicating a room it does not own fences
            # nobody either).
            self.refused(
                command.owner,
                f"ReplicateCmd of {command.room!r}, which it does not own here "
                f"({self.owner_of(command.room)!r} does)",
                "room",
            )
            return []
        room = self.rooms.get(command.room)
        if room is None:
            room = self.rooms[command.room] = Room(
                command.room, command.epoch, active=False, term=command.term
            )
        if room.active or command.term < room.term:
            # This broker serves the room itself, or knows a newer owner: the sender was
            # deposed. No ack, so it releases nothing (fencing); it is told why.
            refusal = ReplicaAck(command.room, command.batch, True, room.term, self.node_id)
            return [(command.owner, refusal)]
        room.term = command.term
        if not room.active:
            if not room.replicated or room.epoch != command.epoch:
                room.epoch = command.epoch
                room.history.clear()
                first = command.events[0].offset if command.events else room.offset + 1
                room.offset = room.trimmed_through = room.released = first - 1
                room.replicated = True
            else:
                self._fill_in(room, command.events, now)
            for replicated in command.events:
                if replicated.offset <= room.offset:
                    continue  # a batch resent after a runner-up change
                room.offset = replicated.offset
                room.history.append(
                    RoomEvent(
                        replicated.offset, now, tuple(replicated.recipients), replicated.payload
                    )
                )
                if replicated.payload.startswith(_PEER_LEFT):
                    self._replicated_departure(room, replicated.payload)
            self._trim(room, now)
            if command.members:
                self._merge_members(room, command.members, now, owner=True)
            # With the whole history: the answers of its events.
            self._take_records(room, command.records, now)
            if command.reply_key:
                _note_recorder(room, command.reply_session)
                self._remember(
                    command.reply_session,
                    command.reply_key,
                    _Record(
                        command.reply_payload,
                        command.reply_fingerprint,
                        now,
                        command.reply_ok,
                        command.reply_epoch,
                        command.reply_offset,
                    ),
                )
        return [(command.owner, ReplicaAck(command.room, command.batch, replica=self.node_id))]

    @staticmethod
    def _fill_in(room: Room, events: list[ReplicatedEvent], now: float) -> None:
        """Put in front of a copy's history the events of ``events`` just before it: a copy
        begun by a batch (this runner-up restarted and was sent a batch before its owner
        heard of the restart) lacks the room's earlier history, which the owner's next
        batch carries whole. Without them, a takeover (or the owner's handoff back, asked
        of this copy) answered the resumes from before that batch ``recovered: false``."""
        older = [e for e in events if e.offset <= room.trimmed_through]
        if not older or older[-1].offset != room.trimmed_through:
            return  # nothing older, or not up to the copy's first event (a hole)
        at = room.history[0].at if room.history else now  # no younger than what follows
        room.history.extendleft(
            RoomEvent(e.offset, at, tuple(e.recipients), e.payload) for e in reversed(older)
        )
        room.trimmed_through = older[0].offset - 1

    def _replicated_departure(self, room: Room, payload: bytes) -> None:
        """A replicated ``peer-left``: the member is gone from the passive copy too. (Its
        edge's ``ForgetCmd`` comes only after the leave's answer, which a killed owner may
        never send: the member would stay, and a takeover would serve it again.)"""
        session = msgspec.json.decode(payload, type=_LeftPeer).peer.session
        member = room.members.pop(session, None)
        if member is not None:
            self._unseat(room, session, member)

    def _unseat(self, room: Room, session: str, member: Member) -> None:
        """The bookkeeping of a member gone from ``room`` (already out of its members):
        its stream, its departure (bounded: ``DEPARTED_MAX``), the session's rooms."""
        self._unconfirmed.pop(member, None)
        room.departed[session] = member.conn
        room.forgotten.discard(session)
        if len(room.departed) > DEPARTED_MAX:
            oldest = next(iter(room.departed))
            del room.departed[oldest]
            room.forgotten.discard(oldest)
        rooms = self._rooms_of.get(session)
        if rooms is not None:
            rooms.discard(room.name)
            if not rooms:
                del self._rooms_of[session]

    def demote(self, name: str) -> list[Outbound]:
        """Another broker owns ``name`` now: keep its membership passively, drop history.

        What still waits for the runner-up is not released: it was never acked, and the
        edges resend those requests to the new owner (which has the events if the
        runner-up got them, and applies them otherwise).
        """
        room = self.rooms.get(name)
        if room is None:
            return []
        for batch in room.pending:  # never released: their records are not answers
            for session, key in batch.keys:
                records = self._records.get(session)
                if records is not None:
                    records.pop(key, None)
        for by_room in self._inflows.values():
            by_room.pop(name, None)
        room.pending.clear()
        room.active = False
        room.deposed = False
        room.replicated = False
        room.replica_target = None
        room.history.clear()
        for member in room.members.values():
            member.synced = False
            self._unconfirmed.pop(member, None)
        return []

    def _trim(self, room: Room, now: float) -> None:
        history = room.history
        oldest_allowed = now - self.history_max_age
        while history and (
            len(history) > self.history_max_events or history[0].at < oldest_allowed
        ):
            room.trimmed_through = history.popleft().offset


def _handed(session: str, key: str, record: _Record, now: float) -> HandedRecord:
    """``record`` as it travels to another broker (its age, not its time: clocks differ)."""
    r = record
    return HandedRecord(session, key, r.fingerprint, r.payload, r.ok, r.epoch, r.offset, now - r.at)


def _note_recorder(room: Room, session: str) -> None:
    """``session`` has a reply record in ``room``: unless it is a member or departed, keep
    it in ``Room.recorders`` (a server API pseudo-session, or, in a copy, a joiner its edge
    has not re-announced), so that its records go with the room's whole history."""
    recorders = room.recorders
    if session in recorders or session in room.members or session in room.departed:
        return
    if len(recorders) >= MAX_RECORDERS:
        # Those that are members or departed by now are found as such.
        recorders -= room.members.keys() | room.departed.keys()
        if len(recorders) >= MAX_RECORDERS:
            return
    recorders.add(session)


def _user_of(peer: bytes) -> str:
    user = msgspec.json.decode(peer).get("user")
    return user if isinstance(user, str) else ""


def _reason_of(data: bytes) -> str:
    """The ``reason`` of a close's data (``{"reason": ...}``, set by the edge)."""
    try:
        decoded = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return ""
    reason = decoded.get("reason") if isinstance(decoded, dict) else None
    return reason if isinstance(reason, str) else ""


def _summary(room: Room) -> dict[str, object]:
    """What the server API shows of a room in a listing."""
    return {
        "name": room.name,
        "members": len(room.members),
        "epoch": room.epoch,
        "offset": room.released,
    }


_PEER_LEFT: Final = b'{"type":"peer-left"'


class _Session(msgspec.Struct):
    session: str


class _LeftPeer(msgspec.Struct):
    """What a runner-up reads of a replicated ``peer-left`` frame."""

    peer: _Session


def _handed_members(room: Room, now: float) -> list[HandedMember]:
    """A room's members as its owner hands them to a successor or a new runner-up."""
    return [
        HandedMember(
            m.session,
            m.peer,
            m.edge,
            m.conn,
            -1.0 if m.suspended_until is None else max(0.0, m.suspended_until - now),
            m.confirmed if room.active and m.synced and m.suspended_until is None else -1,
        )
        for m in room.members.values()
    ]


def _reply(command: Request, record: _Record, term: int, member: bool = False) -> Reply:
    payload = record.payload
    if not payload and record.ok and type(command) is SignalCmd and command.req is not None:
        payload = encode_frame(AckFrame(id=command.req))  # see ``_Record.payload``
    return Reply(
        command.session,
        command.conn,
        command.seq,
        payload,
        record.ok,
        record.epoch,
        record.offset,
        command.room,
        term,
        member,
    )


def _recovered(command: AttachCmd, room: str, recovered: bool) -> Outbound:
    # Not a member: reported, and the edge keeps no position (no peer object).
    return (
        command.edge,
        Synced(command.session, command.conn, room, "", 0, recovered, True, b""),
    )


def request_error(exc: ProtocolError, req: RequestId | None) -> bytes:
    """Encode a refused request as the client's error frame."""
    return encode_frame(ErrorFrame(code=exc.code, message=exc.message, id=req))
