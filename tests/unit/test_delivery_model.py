"""The delivery path end to end, sans I/O: a room owner, its runner-up and edges over lossy links.

What is wired together (in memory, no sockets, no clock):

* one ``RoomTable`` owner (``confirming=True``) and, in some runs, a second ``RoomTable`` as
  its runner-up, replication (``ReplicateCmd``/``ReplicaAck``) carried reliably or over lossy
  links like the rest;
* 3 edges, each an ``_Edge``: the rules of ``edge.server.EdgeServer`` (``_admit``,
  ``_synced``, ``_room_order``, ``_resend``, ``_delivery_tick``, ``_track_membership``,
  ``owners_changed``) applied with ``edge.delivery`` as the server does, for 4 clients (two
  share an edge, so a ``Deliver`` can name several sessions); a client can drop and resume
  on any edge (``_closed``'s ``DetachCmd``, ``_authenticate``'s positions and
  ``AttachCmd``) while its SDK keeps each room's epoch and offset, resends what was
  unanswered with its ids, in order, and joins again a room it could not recover
  (``signalpost.js``);
* links that lose what the scenario says. A link carries frames: what one node sent one peer
  in one go (one ``handle`` call, one timer tick), as the transport batches it into one
  ZeroMQ message, lost or delivered whole. Per direction a link is FIFO (ZeroMQ over TCP);
  a reset loses a contiguous run, so ``drop`` loses frames at the head and ``reset`` loses
  everything in flight both ways on one link. ``dup`` delivers a frame twice: stronger than
  TCP (ZeroMQ never duplicates), the protocol absorbs it anyway.

A scenario is a list of commands (``_Cmd``, ``(kind, a, b, c)``): client actions (join,
leave, signal one peer or all, repeat an earlier request with its id as an SDK does,
drop the connection and resume on an edge), link
actions (deliver, drop, dup, reset, flush), time (``advance``: edges confirm and retry,
owners expire and resend) and ``flap`` (an edge sees the brokers change, as on any broker
up/down: it re-announces its members with their positions and resends what is unanswered).
Hypothesis draws and shrinks the lists; ``_random_commands`` draws them from a seed
(``test_seeded_scenarios``) so a failure replays exactly.

Invariants after every step: no client is written a room event twice; per (client, room,
epoch) offsets strictly increase; every event written is the one the owner recorded at that
offset, meant for that client, and released (the runner-up has it); per (sender, room)
signals reach each target in send order; every answer to a client id is the same (an ack or
an error never changes); each signal is recorded at most once; ``recovered: false`` only
where a resume had no position in the room's epoch. At the end the links heal, time runs
on until resends and retries have done their work (well inside the reply-record age), and:
every request was answered, the owner's membership agrees with what the clients were
answered and with the rooms their edges would re-announce (each member's edge holding a
position in the room's epoch), every event recorded for a member since it joined (or was
told it could not recover) reached it exactly once (liveness), and a signal's recipients
are those its sender could have reached.

The ``test_bug_*`` tests are the shortest scenarios found for defects of the owner and edge
rules (each docstring says what happens); each failed before its fix and guards it now.

Runs: by default a fixed set of examples (about 2 s). ``DELIVERY_MODEL_EXAMPLES=N`` runs N
examples per hypothesis test and N seeds, with fresh randomness each run;
``DELIVERY_MODEL_TRACE=1`` prints every frame carried (with ``-s``).
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from broker.rooms import Member, Outbound, Room, RoomEvent, RoomTable
from edge.core import (
    Attach,
    ConfirmPositions,
    EdgeCore,
    Reannounce,
    SessionState,
    ToOwner,
    ToReplica,
    Write,
)
from edge.delivery import ACCEPT, Position
from signalpost.wire import (
    AttachCmd,
    Confirm,
    Deliver,
    DetachCmd,
    Envelope,
    JoinCmd,
    LeaveCmd,
    Reply,
    RoomPosition,
    SignalCmd,
    Synced,
    peer_object,
    sender_object,
)

OWNER = "A"
RUNNER_UP = "B"
EDGES = ("e0", "e1", "e2")
CLIENTS = 4  # client i lives on edge i % len(EDGES)
ROOMS = ("r0", "r1")
#: Simulated seconds a scenario may spend before healing, and healing: both well inside the
#: owners' reply-record age (120 s), past which a resend is applied anew by design.
CHAOS_TIME = 40.0
HEAL_TIME = 40.0
HEAL_STEP = 0.25
#: Longer than any scenario: a suspended member never times out here (its resume must work).
RESUME_WINDOW = 1e6
ADVANCES = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

Request = SignalCmd | JoinCmd | LeaveCmd
_Cmd = tuple[str, int, int, int]

EXAMPLES = int(os.environ.get("DELIVERY_MODEL_EXAMPLES", "0"))
TRACE = os.environ.get("DELIVERY_MODEL_TRACE", "") == "1"


# --------------------------------------------------------------------------- the edge


@dataclass(slots=True, eq=False, kw_only=True)
class _Conn(SessionState):
    """A client connection on an edge: the core's ``SessionState`` and what the client
    sends with it."""

    peer: bytes
    sender: bytes
    hello: dict[str, RoomPosition] = field(default_factory=dict)  # a resume's positions


def _conn(session: str, conn: str, peer: bytes, sender: bytes) -> _Conn:
    return _Conn(session=session, conn=conn, peer=peer, sender=sender)


class _Edge:
    """An edge: the real ``EdgeCore`` (as ``EdgeServer`` drives it) over a lossy backplane."""

    def __init__(self, edge_id: str, world: _World) -> None:
        self.id = edge_id
        self.world = world
        self.core: EdgeCore[_Conn] = EdgeCore(edge_id, lossy=True)
        self.sessions = self.core.sessions
        self.retries = self.core.retries

    # ------------------------------------------------------------ from clients

    def request(self, client: _Conn, command: Request) -> None:
        """``_dispatch``: number the request, await its answer, send it to the owner."""
        seq = client.next_seq()
        rseq, rbase = self.core.room_order(client, command.room)
        command = msgspec.structs.replace(
            command, seq=seq, conn=client.conn, edge=self.id, rseq=rseq, rbase=rbase
        )
        self.core.await_answer(client, seq, command, self.world.now)
        self.world.send(self.id, self.world.owner_id, command)

    def closed(self, client: _Conn) -> None:
        """``_closed`` for a dropped connection (no clean close: the session may resume)."""
        self.core.closed(client)
        if self.sessions.get(client.session) is client:
            del self.sessions[client.session]
        detach = DetachCmd(client.session, client.conn, self.id, False)
        for broker in self.world.tables:  # ``to_all_brokers``
            self.world.send(self.id, broker, detach)

    def resumed(self, client: _Conn) -> None:
        """The end of ``_authenticate`` for a resume: register, then the core's attach."""
        # (An older connection of the session on this edge would be evicted: closed
        # without a DetachCmd. The scenario's resume closed it first.)
        self.sessions[client.session] = client
        self.core.resumed(client, dict(client.hello), self.world.now)
        self._act()

    # ------------------------------------------------------------ timers

    def tick(self) -> None:
        """``_delivery_tick``."""
        self.core.tick(self.world.now)
        self._act()

    def owners_changed(self) -> None:
        self.core.owners_changed(self.world.now)
        self._act()

    # ------------------------------------------------------------ from owners

    def receive(self, envelope: Envelope) -> None:
        """``EdgeServer.receive`` for room events, replies and syncs."""
        if isinstance(envelope, Deliver):
            if envelope.room and self.core.stale(envelope.room, envelope.term):
                return
            for session in envelope.sessions:
                client = self.sessions.get(session)
                if client is None:
                    continue
                if not envelope.room:  # a ``recovered`` frame for a room it is not in
                    self.world.not_recovered(client, envelope.payload)
                elif self.core.admit(client, envelope) == ACCEPT:
                    self.world.written(client, envelope.payload, client.positions[envelope.room])
        elif isinstance(envelope, Reply):
            self.world.replied(envelope)
            answered = self.core.reply(envelope)
            if answered is not None:
                client, command = answered
                if isinstance(command, SignalCmd | JoinCmd | LeaveCmd):
                    self.world.answered(client, command, envelope)
        elif isinstance(envelope, Synced):
            self.core.synced(envelope)
        self._act()

    def _act(self) -> None:
        """``EdgeServer._act``: carry out the core's actions over the model's links."""
        world = self.world
        for action in self.core.take():
            if isinstance(action, ToOwner):
                world.send(self.id, world.owner_id, action.command)
            elif isinstance(action, ToReplica):
                if world.replica_id is not None:
                    world.send(self.id, world.replica_id, action.command)
            elif isinstance(action, Reannounce):
                world.send(self.id, world.owner_id, action.restore)
                if world.replica_id is not None:
                    replica = msgspec.structs.replace(
                        action.restore, replica=True, epoch="", offset=0
                    )
                    world.send(self.id, world.replica_id, replica)
            elif isinstance(action, Attach):
                for broker in world.tables:  # each broker the positions of its rooms
                    mine = action.positions if broker == world.owner_id else {}
                    world.send(
                        self.id, broker, AttachCmd(action.session, action.conn, self.id, mine)
                    )
            elif isinstance(action, ConfirmPositions):
                world.send(self.id, world.owner_id, Confirm(self.id, action.positions))
            elif isinstance(action, Write):
                client = action.state
                if self.sessions.get(client.session) is not client:
                    continue
                assert isinstance(client, _Conn)
                room = json.loads(action.payload)["room"]
                position = client.positions.get(room)
                if position is None:
                    world.not_recovered(client, action.payload)
                else:
                    world.synced(client, action.payload, position)


# --------------------------------------------------------------------------- the reference


@dataclass
class _Sent:
    """One client request (by its id) and what the client learnt of it."""

    kind: str
    room: str
    to: str | None
    data: bytes
    number: int  # send order among all requests (signals: also in ``data``)
    sent_step: int
    answered_step: int | None = None
    answer: bytes | None = None
    ok: bool = False


@dataclass
class _Client:
    name: str
    edge: _Edge
    conn: _Conn
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    requests: dict[int, _Sent] = field(default_factory=dict)  # client id -> request
    # (room, epoch) -> last offset written; (sender, room) -> last signal number written
    last_offset: dict[tuple[str, str], int] = field(default_factory=dict)
    last_from: dict[tuple[str, str], int] = field(default_factory=dict)
    # (room, epoch, offset) -> times written
    events: dict[tuple[str, str, int], int] = field(default_factory=dict)
    # What the SDK keeps per joined room (epoch, last offset) and resumes with
    rooms: dict[str, tuple[str, int]] = field(default_factory=dict)
    # ... and the highest offset it saw per (room, epoch), across leaves (the SDKs'
    # ``seen``): a ``joined`` answer never starts below it (answers can come late, from
    # reply records, after events of a later membership were written)
    seen: dict[tuple[str, str], int] = field(default_factory=dict)
    epoch_of: dict[str, str] = field(default_factory=dict)  # room -> epoch it last knew
    # (room, epoch) -> the client was told it may have lost what came up to this offset
    lost_through: dict[tuple[str, str], int] = field(default_factory=dict)
    conns: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


@dataclass(frozen=True)
class _Event:
    room: str
    epoch: str
    offset: int
    recipients: frozenset[str]
    payload: bytes


class _RecordingTable(RoomTable):
    """The owner: a ``RoomTable`` that tells the test each event it numbers."""

    def __init__(self, on_record: Callable[[str, str, RoomEvent], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_record = on_record

    def _record(
        self, room: Room, recipients: list[Member], payload: bytes, now: float, out: list[Outbound]
    ) -> None:
        super()._record(room, recipients, payload, now, out)
        self._on_record(room.name, room.epoch, room.history[-1])


class ModelViolation(AssertionError):
    """An invariant of the delivery path does not hold."""


def _check(condition: bool, message: str, *context: object) -> None:
    if not condition:
        raise ModelViolation(message + "".join(f"\n  {c!r}" for c in context))


# --------------------------------------------------------------------------- the world


class _World:
    """Owner(s), edges and clients over links; the reference model and its invariants."""

    def __init__(self, *, replicated: bool, lossy_replication: bool, dup: bool) -> None:
        self.now = 0.0
        self.step = 0
        self.dup = dup
        #: What happened, for a failure's report (``DELIVERY_MODEL_TRACE=1`` prints it).
        self.trace: list[str] | None = [] if TRACE else None
        epochs = itertools.count()
        self.owner_id = OWNER
        self.replica_id = RUNNER_UP if replicated else None
        self.tables: dict[str, RoomTable] = {
            OWNER: _RecordingTable(
                self.recorded_by_owner,
                capacity=CLIENTS,
                resume_window=RESUME_WINDOW,
                history_max_events=1_000_000,
                history_max_age=1e9,
                new_epoch=lambda: f"epoch-{next(epochs)}",
                node_id=OWNER,
                replica_for=(lambda room: RUNNER_UP) if replicated else _no_replica,
                confirming=True,
            )
        }
        if replicated:
            self.tables[RUNNER_UP] = RoomTable(
                capacity=CLIENTS,
                resume_window=RESUME_WINDOW,
                history_max_events=1_000_000,
                history_max_age=1e9,
                new_epoch=lambda: f"epoch-{next(epochs)}",
                node_id=RUNNER_UP,
                confirming=True,
                owns=lambda room: False,  # in every view, A owns the rooms
            )
        self.edges = [_Edge(e, self) for e in EDGES]
        # Links a scenario acts on, in a fixed order (commands name them by index) ...
        self.chaos_links: list[tuple[str, str]] = []
        for edge in EDGES:
            self.chaos_links += [(edge, OWNER), (OWNER, edge)]
        # ... and links carried at once at the end of every step (unless lossy).
        self.calm_links: list[tuple[str, str]] = []
        if replicated:
            replication = [(OWNER, RUNNER_UP), (RUNNER_UP, OWNER)]
            replica_restores = [(edge, RUNNER_UP) for edge in EDGES]
            if lossy_replication:
                self.chaos_links += replication
                self.calm_links += replica_restores
            else:
                self.calm_links += replication + replica_restores
        # In flight per link: frames (a ZeroMQ message: what one node sent one peer in one
        # go, lost or delivered whole), oldest first; and the frames being filled now.
        self.links: dict[tuple[str, str], deque[list[Envelope]]] = {
            link: deque() for link in self.chaos_links + self.calm_links
        }
        self.filling: dict[tuple[str, str], list[Envelope]] = {}
        self.clients: list[_Client] = []
        for i in range(CLIENTS):
            name = f"s{i}"
            home = self.edges[i % len(self.edges)]
            conn = _conn(
                name, f"c{i}", peer_object(name, f"u{i}", None, None), sender_object(name, f"u{i}")
            )
            home.sessions[name] = conn
            self.clients.append(_Client(name, home, conn))
        self.by_session = {c.name: c for c in self.clients}
        self.numbers = itertools.count(1)
        # The reference: every event the owner recorded, as it recorded it.
        self.recorded: dict[tuple[str, str, int], _Event] = {}
        self.signal_events: dict[int, list[_Event]] = {}  # signal number -> its events
        self.answers: dict[tuple[str, int], bytes] = {}  # (session, client id) -> reply

    @property
    def owner(self) -> RoomTable:
        return self.tables[self.owner_id]

    # ------------------------------------------------------------ transport

    def send(self, source: str, target: str, envelope: Envelope) -> None:
        """Queue ``envelope`` in the frame ``source`` is filling for ``target``."""
        self.filling.setdefault((source, target), []).append(envelope)

    def seal(self) -> None:
        """The sender's loop iteration ends: each frame it filled goes on its link."""
        filling, self.filling = self.filling, {}
        for link, frame in filling.items():
            self.links[link].append(frame)

    def dispatch(self, source: str, out: list[Outbound]) -> None:
        for target, envelope in out:
            if target == source:
                raise ModelViolation(f"{source} sent itself {envelope!r}")
            self.send(source, target, envelope)

    def carry(self, link: tuple[str, str], copies: int = 1) -> bool:
        """Hand the frame at the head of ``link`` to its target (``copies`` times)."""
        queue = self.links[link]
        if not queue:
            return False
        frame = queue.popleft()
        if self.trace is not None:
            for envelope in frame:
                self.trace.append(f"{self.now:6.2f} {link[0]}->{link[1]} x{copies} {envelope!r}")
        for _ in range(copies):
            for envelope in frame:
                self.arrive(link, envelope)
            self.seal()
        return True

    def arrive(self, link: tuple[str, str], envelope: Envelope) -> None:
        target = link[1]
        table = self.tables.get(target)
        if table is not None:
            self.dispatch(target, table.handle(envelope, self.now))
        else:
            self.edges[EDGES.index(target)].receive(envelope)

    def settle_calm(self) -> None:
        moved = True
        while moved:
            moved = False
            for link in self.calm_links:
                while self.carry(link):
                    moved = True

    def flush(self) -> None:
        """Carry everything in flight, round robin over the links, until nothing moves."""
        moved = True
        while moved:
            moved = False
            for link in self.chaos_links + self.calm_links:
                moved = self.carry(link) or moved

    def tick(self) -> None:
        """Timers at ``now``: every edge confirms and retries, every broker expires."""
        for edge in self.edges:
            edge.tick()
        for node, table in self.tables.items():
            self.dispatch(node, table.expire(self.now))
        self.seal()

    # ------------------------------------------------------------ commands

    def run(self, command: _Cmd) -> None:
        kind, a, b, c = command
        self.step += 1
        if self.trace is not None:
            self.trace.append(f"-- step {self.step}: {command}")
        if kind in {"join", "leave"}:
            self.client_request(self.clients[a % CLIENTS], kind, ROOMS[b % len(ROOMS)], None)
        elif kind == "signal":
            client = self.clients[a % CLIENTS]
            others = [x.name for x in self.clients if x is not client]
            target = b % (len(others) + 1)
            to = others[target] if target < len(others) else None
            self.client_request(client, kind, ROOMS[c % len(ROOMS)], to)
        elif kind == "repeat":
            self.repeat(self.clients[a % CLIENTS], b)
        elif kind == "resume":
            self.resume(self.clients[a % CLIENTS], self.edges[b % len(self.edges)])
        elif kind == "deliver":
            link = self.chaos_links[a % len(self.chaos_links)]
            for _ in range(b % 4 + 1):
                self.carry(link)
        elif kind == "drop":
            queue = self.links[self.chaos_links[a % len(self.chaos_links)]]
            for _ in range(min(len(queue), b % 3 + 1)):
                queue.popleft()
        elif kind == "dup":
            if self.dup:
                self.carry(self.chaos_links[a % len(self.chaos_links)], copies=2)
        elif kind == "reset":
            link = self.chaos_links[a % len(self.chaos_links)]
            self.links[link].clear()
            self.links[link[1], link[0]].clear()
        elif kind == "advance":
            dt = ADVANCES[a % len(ADVANCES)]
            if self.now + dt <= CHAOS_TIME:
                self.now += dt
                self.tick()
        elif kind == "tick":
            self.edges[a % len(self.edges)].tick()
        elif kind == "flap":
            self.edges[a % len(self.edges)].owners_changed()
        elif kind == "flush":
            self.flush()
        self.seal()
        self.settle_calm()

    def client_request(self, client: _Client, kind: str, room: str, to: str | None) -> None:
        req = next(client.ids)
        number = next(self.numbers)
        data = json.dumps({"n": number, "from": client.name}).encode() if kind == "signal" else b""
        client.requests[req] = _Sent(kind, room, to, data, number, self.step)
        self._send_request(client, req)

    def repeat(self, client: _Client, pick: int) -> None:
        """The client sends an earlier request again with its id (as an SDK does). An answer
        to an id already answered changes nothing on the client (``answered``)."""
        if client.requests:
            req = sorted(client.requests)[pick % len(client.requests)]
            self._send_request(client, req)

    def resume(self, client: _Client, edge: _Edge) -> None:
        """The client's connection drops; it reconnects to ``edge`` and resumes (the SDK:
        ``hello`` with its rooms' positions, then every request still waiting, in order)."""
        old = client.conn
        client.edge.closed(old)
        self.seal()
        client.conn = _conn(
            old.session, f"{old.conn.split('.')[0]}.{next(client.conns)}", old.peer, old.sender
        )
        client.conn.hello = {room: RoomPosition(*seen) for room, seen in client.rooms.items()}
        client.edge = edge
        edge.resumed(client.conn)
        self.seal()
        waiting = [s for s in client.requests.values() if s.answered_step is None]
        for sent in sorted(waiting, key=lambda s: s.number):
            self._send_request(client, next(r for r, s in client.requests.items() if s is sent))

    def _send_request(self, client: _Client, req: int) -> None:
        sent = client.requests[req]
        conn = client.conn
        command: Request
        if sent.kind == "signal":
            command = SignalCmd(
                conn.session, "", "", 0, req, sent.room, sent.to, conn.sender, sent.data
            )
        elif sent.kind == "join":
            command = JoinCmd(conn.session, "", "", 0, req, sent.room, conn.peer)
        else:
            command = LeaveCmd(conn.session, "", "", 0, req, sent.room)
        client.edge.request(conn, command)

    def heal(self) -> None:
        """No more losses: carry everything and let time run until retries have settled."""
        end = self.now + HEAL_TIME
        while self.now < end:
            self.flush()
            self.now += HEAL_STEP
            self.tick()
            self.flush()

    # ------------------------------------------------------------ what edges tell clients

    def written(self, conn: _Conn, payload: bytes, position: Position) -> None:
        """A room event was written to the client (``position``: after it was admitted)."""
        client = self.by_session[conn.session]
        _check(conn is client.conn, "written to a connection the client left", conn)
        frame = json.loads(payload)
        room, offset, epoch = frame["room"], frame["offset"], position.epoch
        _check(position.offset == offset, "position is not the written offset", position, frame)
        key = (room, epoch, offset)
        client.events[key] = client.events.get(key, 0) + 1
        _check(client.events[key] == 1, "a room event was written twice", client.name, key)
        last = client.last_offset.get((room, epoch), 0)
        _check(offset > last, "offsets went back", client.name, key, last)
        client.last_offset[room, epoch] = offset
        room_now = self.owner.rooms.get(room)
        if room_now is not None and room_now.epoch == epoch:
            _check(offset <= room_now.released, "written before the runner-up had it", key)
        event = self.recorded.get(key)
        _check(event is not None, "written an event the owner did not record", client.name, key)
        assert event is not None
        _check(event.payload == payload, "written another payload than recorded", key, payload)
        _check(client.name in event.recipients, "written an event meant for others", client.name)
        if frame["type"] == "signal":
            sender, number = frame["data"]["from"], frame["data"]["n"]
            previous = client.last_from.get((sender, room), 0)
            _check(number > previous, "signals of one sender out of order", client.name, frame)
            client.last_from[sender, room] = number
        seen = client.rooms.get(room)
        if seen is not None and seen[0] == epoch and offset > seen[1]:
            client.rooms[room] = (epoch, offset)
        # The SDK counts an event in the epoch it believes the room is in (frames name none).
        believed = seen[0] if seen is not None else client.epoch_of.get(room)
        if believed is not None:
            key = (room, believed)
            client.seen[key] = max(client.seen.get(key, 0), offset)

    def synced(self, conn: _Conn, payload: bytes, position: Position) -> None:
        """A ``recovered`` frame after a resume (or a re-announce); the edge is at
        ``position``. Nothing here loses history, changes a member's epoch or lets a
        suspension lapse: only a resume without a position in the room's epoch (its joined
        reply never reached the client, or the room was emptied and made anew since)
        cannot recover."""
        client = self.by_session[conn.session]
        frame = json.loads(payload)
        room = frame["room"]
        # The SDKs take the stream's position from the report (``signalpost.js``).
        seen = client.rooms.get(room)
        if seen is not None and seen[0] == frame["epoch"]:
            client.rooms[room] = (frame["epoch"], max(seen[1], frame["offset"]))
        else:
            client.rooms[room] = (frame["epoch"], frame["offset"])
        client.epoch_of[room] = frame["epoch"]
        key = (room, frame["epoch"])
        client.seen[key] = max(client.seen.get(key, 0), client.rooms[room][1])
        if not frame["recovered"]:
            hello = conn.hello.get(room)
            _check(
                hello is None or hello.epoch != position.epoch,
                "a client was told it lost events",
                client.name,
                room,
            )
            key = (room, position.epoch)
            client.lost_through[key] = max(client.lost_through.get(key, 0), position.offset)
            self._rejoin(client, room)

    def not_recovered(self, conn: _Conn, payload: bytes) -> None:
        """``recovered: false`` for a room the resumed session was not in when its attach
        was applied (it may have joined again since)."""
        client = self.by_session[conn.session]
        frame = json.loads(payload)
        _check(frame["type"] == "recovered" and not frame["recovered"], "not a room event", frame)
        self._rejoin(client, frame["room"])

    def _rejoin(self, client: _Client, room: str) -> None:
        """The SDK's ``rejoinUnrecovered``: join again a room it thinks it is in."""
        if room in client.rooms:
            self.client_request(client, "join", room, None)

    def replied(self, reply: Reply) -> None:
        """Every copy of an answer, also those the edge drops: one per client id, ever."""
        if reply.payload:
            req = json.loads(reply.payload).get("id")
            if req is not None:
                key = (reply.session, req)
                first = self.answers.setdefault(key, reply.payload)
                _check(first == reply.payload, "an id was answered twice, differently", key)

    def answered(self, conn: _Conn, command: Request, reply: Reply) -> None:
        client = self.by_session[conn.session]
        _check(command.req is not None, "an answer to a request without id", command)
        assert isinstance(command.req, int)
        sent = client.requests[command.req]
        if sent.answered_step is not None:
            _check(sent.answer == reply.payload, "a repeated request answered otherwise", sent)
            return  # the SDKs ignore a reply to an id no longer waiting (``signalpost.js``)
        sent.answered_step, sent.answer, sent.ok = self.step, reply.payload, reply.ok
        if reply.ok and isinstance(command, JoinCmd):
            # The SDKs read the joined frame (``Reply.epoch``/``offset`` are the edge's).
            joined = json.loads(reply.payload)
            epoch, offset = joined["epoch"], joined["offset"]
            previous = client.rooms.get(command.room)
            if previous is not None and previous[0] == epoch:
                offset = max(previous[1], offset)
            offset = max(offset, client.seen.get((command.room, epoch), 0))
            client.rooms[command.room] = (epoch, offset)
            client.epoch_of[command.room] = epoch
        elif reply.ok and isinstance(command, LeaveCmd):
            previous = client.rooms.pop(command.room, None)
            if previous is not None:
                key = (command.room, previous[0])
                client.seen[key] = max(client.seen.get(key, 0), previous[1])

    # ------------------------------------------------------------ the record

    def recorded_by_owner(self, room: str, epoch: str, event: RoomEvent) -> None:
        """The owner numbered an event: the reference. Each signal is recorded at most once."""
        recorded = _Event(room, epoch, event.offset, frozenset(event.recipients), event.payload)
        key = (room, epoch, event.offset)
        _check(key not in self.recorded, "an offset was recorded twice", key)
        self.recorded[key] = recorded
        frame = json.loads(event.payload)
        if frame["type"] == "signal":
            events = self.signal_events.setdefault(frame["data"]["n"], [])
            events.append(recorded)
            _check(len(events) == 1, "a signal was recorded twice", events)

    # ------------------------------------------------------------ the end

    def check_end(self) -> None:
        for client in self.clients:
            _check(not client.conn.unanswered, "unanswered after healing", client.conn.unanswered)
            for req, sent in client.requests.items():
                _check(sent.answered_step is not None, "a request never answered", req, sent)
            _check(len(client.edge.retries) == 0, "retries left", client.edge.id)
        self._check_membership()
        self._check_signals()
        self._check_liveness()

    def _member_by_answers(self, client: _Client, room: str) -> bool:
        """A connection's requests to a room apply in order: the last one decides."""
        member = False
        for sent in sorted(client.requests.values(), key=lambda s: s.number):
            if sent.room != room or not sent.ok:
                continue
            if sent.kind == "join":
                member = True
            elif sent.kind == "leave":
                member = False
        return member

    def _check_membership(self) -> None:
        for name in ROOMS:
            room = self.owner.rooms.get(name)
            members = set(room.members) if room is not None else set()
            expected = {c.name for c in self.clients if self._member_by_answers(c, name)}
            _check(members == expected, "membership differs from the answers", name, members)
            for client in self.clients:
                # What the edge re-announces on an owners change is what the owner has ...
                _check(
                    (name in client.conn.rooms) == (client.name in members),
                    "the edge's rooms differ from the owner's membership",
                    client.name,
                    name,
                )
                # ... and a member's edge has a position in the room's epoch to write from.
                if room is not None and client.name in members:
                    position = client.conn.positions.get(name)
                    _check(position is not None, "a member without a position", client.name)
                    assert position is not None
                    _check(position.epoch == room.epoch, "stale epoch", client.name, name)

    def _member_before(self, client: _Client, room: str, number: int) -> bool:
        """Whether ``client`` is a member when its request ``number`` applies (a connection's
        requests to a room apply in send order; joins never fail here, repeats change
        nothing)."""
        member = False
        for sent in sorted(client.requests.values(), key=lambda s: s.number):
            if sent.number >= number:
                break
            if sent.room == room and sent.kind in {"join", "leave"}:
                member = sent.kind == "join"
        return member

    def _surely_member(self, client: _Client, room: str, since: int, until: int) -> bool:
        """Whether ``client`` was a member of ``room`` all through steps [since, until]."""
        joins = [
            s
            for s in client.requests.values()
            if s.kind == "join"
            and s.room == room
            and s.ok
            and s.answered_step is not None
            and s.answered_step < since
        ]
        if not joins:
            return False
        join = max(joins, key=lambda s: s.number)
        return not any(
            s.kind == "leave" and s.room == room and s.number > join.number and s.sent_step <= until
            for s in client.requests.values()
        )

    def _maybe_member(self, client: _Client, room: str, until: int) -> bool:
        return any(
            s.kind == "join" and s.room == room and s.sent_step <= until
            for s in client.requests.values()
        )

    def _check_signals(self) -> None:
        """Each signal's recipients are those its sender could have reached, and only them."""
        for client in self.clients:
            for sent in client.requests.values():
                if sent.kind != "signal":
                    continue
                events = self.signal_events.get(sent.number, [])
                assert sent.answered_step is not None and sent.answer is not None
                answer = json.loads(sent.answer)
                if not sent.ok:
                    _check(not events, "a refused signal was recorded", sent, events)
                    if answer["code"] == "not_in_room":
                        _check(
                            not self._member_before(client, sent.room, sent.number),
                            "not_in_room for a member",
                            sent,
                        )
                    else:
                        _check(answer["code"] == "unknown_peer", "unexpected refusal", answer)
                        target = self.by_session[sent.to or ""]
                        _check(
                            not self._surely_member(
                                target, sent.room, sent.sent_step, sent.answered_step
                            ),
                            "unknown_peer for a member",
                            sent,
                        )
                    continue
                _check(answer["type"] == "ack", "a signal answered otherwise", answer)
                _check(
                    self._member_before(client, sent.room, sent.number),
                    "a signal acked for a non-member",
                    sent,
                )
                _check(len(events) == 1, "an acked signal is not recorded once", sent, events)
                recipients = events[0].recipients
                if sent.to is not None:
                    _check(recipients == {sent.to}, "a signal to one peer", sent, recipients)
                    continue
                for other in self.clients:
                    if other is client:
                        _check(other.name not in recipients, "a signal to its sender", sent)
                    elif self._surely_member(other, sent.room, sent.sent_step, sent.answered_step):
                        _check(other.name in recipients, "a member missed a signal", sent)
                    elif not self._maybe_member(other, sent.room, sent.answered_step):
                        _check(other.name not in recipients, "a signal to a stranger", sent)

    def _check_liveness(self) -> None:
        """Every recorded event a member is owed (since its latest join) reached it once."""
        for name in ROOMS:
            room = self.owner.rooms.get(name)
            if room is None:
                continue
            events = sorted(
                (e for e in self.recorded.values() if e.room == name and e.epoch == room.epoch),
                key=lambda e: e.offset,
            )
            _check(
                [e.offset for e in events] == list(range(1, room.offset + 1)),
                "the record has holes",
                name,
                room.offset,
            )
            for session in room.members:
                client = self.by_session[session]
                joined = [
                    e.offset
                    for e in events
                    if json.loads(e.payload)["type"] == "peer-joined"
                    and json.loads(e.payload)["peer"]["session"] == session
                ]
                since = max(max(joined, default=0), client.lost_through.get((name, room.epoch), 0))
                owed = [e.offset for e in events if e.offset > since and session in e.recipients]
                got = [
                    offset
                    for (r, epoch, offset), times in client.events.items()
                    if r == name and epoch == room.epoch and offset > since and times == 1
                ]
                _check(sorted(got) == owed, "a member did not get what it is owed", session, name)


def _no_replica(room: str) -> str | None:
    return None


# --------------------------------------------------------------------------- scenarios

#: Command kinds, repeated to weigh them (hypothesis shrinks towards the first).
KINDS = (
    ["flush", "deliver", "join", "signal", "advance"]
    + ["deliver"] * 5
    + ["signal"] * 3
    + ["join", "leave", "repeat", "drop", "drop", "dup", "reset", "advance", "advance"]
    + ["tick", "flap", "resume"]
)


def run_scenario(
    commands: Iterable[_Cmd],
    *,
    replicated: bool = False,
    lossy_replication: bool = False,
    dup: bool = True,
) -> _World:
    """Play ``commands``, heal, check the end; every step checks the invariants."""
    world = _World(replicated=replicated, lossy_replication=lossy_replication, dup=dup)
    try:
        for command in commands:
            world.run(command)
        world.heal()
        world.check_end()
    finally:
        if world.trace is not None:
            print("\n".join(world.trace))
    return world


_command = st.tuples(
    st.sampled_from(KINDS), st.integers(0, 7), st.integers(0, 7), st.integers(0, 7)
)
#: Every client joins a room first (so signals have somewhere to go), then anything.
_commands = st.builds(
    lambda rooms, rest: [("join", i, room, 0) for i, room in enumerate(rooms)] + rest,
    st.lists(st.integers(0, 1), min_size=CLIENTS, max_size=CLIENTS),
    st.lists(_command, max_size=150),
)


def _random_commands(rng: random.Random, count: int) -> list[_Cmd]:
    """A scenario from a seed: joins first (so signals have somewhere to go), then anything."""
    joins: list[_Cmd] = [("join", i, rng.randrange(2), 0) for i in range(CLIENTS)]
    rest: list[_Cmd] = [
        (rng.choice(KINDS), rng.randrange(8), rng.randrange(8), rng.randrange(8))
        for _ in range(count)
    ]
    return joins + rest


def _settings() -> settings:
    """Bounded for CI (a fixed set of examples, the same every run); wider with the env var.

    No example database (failures replay from the printed list or a seed) and no explain
    phase (it costs seconds and adds nothing to a shrunk command list)."""
    return settings(
        max_examples=EXAMPLES or 150,
        derandomize=not EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow],
    )


@_settings()
@given(commands=_commands)
def test_edges_and_one_owner_over_lossy_links(commands: list[_Cmd]) -> None:
    run_scenario(commands)


@_settings()
@given(commands=_commands)
def test_with_a_runner_up_replication_reliable(commands: list[_Cmd]) -> None:
    run_scenario(commands, replicated=True)


@_settings()
@given(commands=_commands)
def test_with_a_runner_up_replication_lossy(commands: list[_Cmd]) -> None:
    run_scenario(commands, replicated=True, lossy_replication=True)


#: Seeds of the default run that still find a defect (docs/reliability.md, "Known limits").
#: Strict: fixed, it must go.
KNOWN_FAILING_SEEDS: set[int] = set()


@pytest.mark.parametrize(
    "seed",
    [
        pytest.param(
            seed,
            marks=pytest.mark.xfail(
                strict=True, reason="known defect: rejoin during a resent resume replay"
            ),
        )
        if seed in KNOWN_FAILING_SEEDS and not EXAMPLES
        else seed
        for seed in range(EXAMPLES or 20)
    ],
)
def test_seeded_scenarios(seed: int) -> None:
    rng = random.Random(seed)
    replicated = seed % 3 != 0
    run_scenario(
        _random_commands(rng, 150),
        replicated=replicated,
        lossy_replication=replicated and seed % 3 == 2,
    )


def test_a_plain_run_delivers_and_answers() -> None:
    """The model itself: without losses every signal reaches every member once."""
    commands: list[_Cmd] = [("join", i, 0, 0) for i in range(CLIENTS)]
    commands += [("flush", 0, 0, 0)]
    commands += [("signal", i, 7, 0) for i in range(CLIENTS)]  # to everyone else
    commands += [("signal", 0, 0, 0), ("flush", 0, 0, 0), ("advance", 1, 0, 0)]  # s0 -> s1
    world = run_scenario(commands, replicated=True)
    for client in world.clients:
        signals = [
            key
            for key in client.events
            if json.loads(world.recorded[key].payload)["type"] == "signal"
        ]
        expected = CLIENTS - 1 + (1 if client.name == "s1" else 0)
        assert len(signals) == expected, (client.name, signals)


# --------------------------------------------------------------------------- defects found
# Links by index: 0 e0->A, 1 A->e0, 2 e1->A, 3 A->e1 (``_World.chaos_links``); client i is
# on edge i % 3; ``("signal", 1, 0, 0)`` is s1 to s0 in r0.


def test_bug_a_join_answer_that_overtook_a_leave_makes_the_edge_keep_a_left_room() -> None:
    """s0 joins then leaves; the joined reply is lost, the left reply arrives. The edge's
    retry of the join is answered from the record ("joined") and ``_track_membership``
    applies it after the leave: the edge holds a position (and ``rooms`` entry) for a room
    the owner no longer has s0 in, and re-announces it on the next owners change."""
    run_scenario(
        [
            ("join", 0, 0, 0),
            ("deliver", 0, 0, 0),
            ("drop", 1, 0, 0),  # the joined reply
            ("leave", 0, 0, 0),
            ("deliver", 0, 0, 0),
            ("deliver", 1, 0, 0),  # the left reply
        ]
    )


def test_bug_owners_changed_during_a_leave_puts_the_member_back() -> None:
    """An owners change while s0's leave is unanswered: the edge re-announces s0 in r0
    (``RestoreCmd``), behind the leave on the same link. The owner removes s0, then
    ``restore`` adds it back (no peer-joined for the others); the edge, answered "left",
    drops its position. s0 is a member nobody knows of, sent events nobody writes."""
    run_scenario(
        [
            ("join", 0, 0, 0),
            ("join", 1, 0, 0),
            ("flush", 0, 0, 0),
            ("leave", 0, 0, 0),
            ("flap", 0, 0, 0),
        ]
    )


def test_bug_a_restore_retried_after_a_leave_puts_the_member_back() -> None:
    """The same without a leave in flight at the change: the ``Synced`` answering the
    re-announce is lost, s0 leaves (answered), and the edge's retry of the old
    ``RestoreCmd`` (``Retries`` keeps it: nothing cancels it on leave) re-adds s0."""
    run_scenario(
        [
            ("join", 0, 0, 0),
            ("join", 1, 0, 0),
            ("flush", 0, 0, 0),
            ("flap", 0, 0, 0),
            ("deliver", 0, 0, 0),
            ("drop", 1, 0, 0),  # the Synced
            ("leave", 0, 0, 0),
            ("flush", 0, 0, 0),
        ]
    )


def test_bug_a_second_join_whose_first_answer_was_lost_skips_events() -> None:
    """s0's joined reply is lost; s1 joins and signals s0 (acked; the edge drops the
    delivery, s0 has no position yet); s0 joins again with a new id. That no-op join is
    answered with the room's current offset, the edge takes it as its position, and the
    acked signal (below it) is never written: the owner's resend is a "duplicate"."""
    run_scenario(
        [
            ("join", 0, 0, 0),
            ("deliver", 0, 0, 0),
            ("reset", 0, 0, 0),  # the joined reply
            ("join", 1, 0, 0),
            ("deliver", 2, 0, 0),
            ("deliver", 3, 0, 0),
            ("signal", 1, 0, 0),
            ("deliver", 2, 0, 0),
            ("join", 0, 0, 0),
            ("flush", 0, 0, 0),
        ]
    )


def test_bug_a_confirmation_from_before_a_leave_is_applied_to_the_next_membership() -> None:
    """No loss needed. s0 and s3 (both on e0) leave r1 and s0 joins again before e0's next
    confirm tick: the room emptied, so it is made anew with a new epoch. ``Confirmations``
    still holds s0's old ``Position`` (``note`` keeps the first entry per key, and nothing
    drops it on leave) and confirms its offset, 3 of the old epoch: the owner takes it for
    the new member (``Confirm`` names no epoch) and never sends s0 the new epoch's events
    up to 3 (s1's peer-joined here). A ``Synced`` that opens a new epoch (a takeover
    without replication) leaves the same stale entry behind."""
    run_scenario(
        [
            ("join", 0, 1, 0),
            ("join", 3, 1, 0),
            ("flush", 0, 0, 0),
            ("leave", 3, 1, 0),
            ("leave", 0, 1, 0),
            ("join", 0, 1, 0),
            ("flush", 0, 0, 0),
            ("tick", 0, 0, 0),  # e0 confirms (r1, s0, 3)
            ("flush", 0, 0, 0),
            ("join", 1, 1, 0),
            ("flush", 0, 0, 0),
        ]
    )


def test_bug_a_gap_confirmed_from_the_previous_membership_writes_an_event_twice() -> None:
    """s0 leaves and rejoins; both answers are lost. s1 signals s0 (offset 5, prev 4): the
    edge still has s0's previous membership's position (2), confirms a gap at 2, and the
    owner resends from 2 (``confirm`` believes any lower gap position): the edge writes 5.
    Then the retried answers arrive and the joined reply resets the position to 4; the next
    signal (prev 5) is a gap at 4 and 5 is written again."""
    run_scenario(
        [
            ("join", 0, 0, 0),
            ("join", 1, 0, 0),
            ("flush", 0, 0, 0),
            ("leave", 0, 0, 0),
            ("join", 0, 0, 0),
            ("deliver", 0, 1, 0),
            ("drop", 1, 2, 0),  # the left and joined replies
            ("signal", 1, 0, 0),
            ("deliver", 2, 0, 0),
            ("deliver", 1, 0, 0),
            ("tick", 0, 0, 0),
            ("flush", 0, 0, 0),
            ("advance", 4, 0, 0),
            ("flush", 0, 0, 0),
            ("signal", 1, 0, 0),
            ("flush", 0, 0, 0),
        ]
    )


def test_bug_a_repeated_join_id_after_leaving_makes_the_edge_keep_the_room() -> None:
    """A client sends its (answered) join again with the same id after leaving: the owner
    answers from the record ("joined", membership unchanged) and the edge tracks it as a
    join: a position and a re-announce for a room the session is not in."""
    run_scenario(
        [
            ("join", 0, 0, 0),
            ("flush", 0, 0, 0),
            ("leave", 0, 0, 0),
            ("flush", 0, 0, 0),
            ("repeat", 0, 0, 0),  # the join, id 1
            ("flush", 0, 0, 0),
        ]
    )


def test_bug_a_lost_replicate_freezes_the_room() -> None:
    """A reset of the owner -> runner-up link loses a ``ReplicateCmd`` (or its
    ``ReplicaAck``) without either side seeing the peer go down: nothing sends the batch
    again (``replicas_changed`` resends only to a new runner-up), so it and everything
    behind it in the room's ``pending`` stay held: no deliveries, no answers, resends
    answered into the same queue."""
    run_scenario(
        [("join", 0, 0, 0), ("deliver", 0, 0, 0), ("drop", 6, 0, 0)],
        replicated=True,
        lossy_replication=True,
    )


def test_bug_a_stale_restore_recreates_a_membership_left_on_the_resumed_connection() -> None:
    """s1's edge re-announces it (owners change), then s1 leaves; the connection drops
    before either left e1. s1 resumes on e0 and its SDK resends the leave, applied there
    (the room empties and goes). Then e1's old ``RestoreCmd`` arrives: ``restore`` creates
    the room anew (new epoch) with s1 on the dead connection; the old connection's leave
    is answered from the record and changes nothing; its detach suspends s1 for good."""
    run_scenario(
        [
            ("join", 1, 0, 0),
            ("flush", 0, 0, 0),
            ("flap", 1, 0, 0),
            ("leave", 1, 0, 0),
            ("resume", 1, 0, 0),  # to e0
            ("deliver", 0, 3, 0),  # attach and the resent leave
            ("flush", 0, 0, 0),
        ]
    )


def test_bug_a_lost_attach_is_never_sent_again() -> None:
    """s2 resumes on e1 and the ``AttachCmd`` is lost on e1's link: nothing resends it (the
    edge learns the session's rooms only from ``Synced``, so an owners change re-announces
    nothing either). The owner keeps s2 suspended on its old connection and the signal s0
    sends it (acked) is never delivered; the client is never told anything."""
    run_scenario(
        [
            ("join", 0, 0, 0),
            ("join", 2, 0, 0),
            ("flush", 0, 0, 0),
            ("resume", 2, 1, 0),  # to e1
            ("drop", 2, 0, 0),  # the AttachCmd
            ("signal", 0, 1, 0),  # s0 -> s2
            ("flush", 0, 0, 0),
        ]
    )


def test_bug_an_attach_from_an_older_connection_rehomes_the_session_to_it() -> None:
    """s3 resumes on e2, drops again at once and resumes on e1. The attaches travel on
    different links: e1's arrives first, then e2's (older connection) re-homes s3 to the
    dead connection (``attach`` checks nothing), and e2's detach of it suspends s3. The
    acked signal s0 sends it is never delivered."""
    run_scenario(
        [
            ("join", 0, 0, 0),
            ("join", 3, 0, 0),
            ("flush", 0, 0, 0),
            ("resume", 3, 2, 0),  # to e2
            ("resume", 3, 1, 0),  # to e1
            ("deliver", 2, 3, 0),  # e1: attach of the live connection
            ("deliver", 0, 3, 0),  # e0: detach of the first connection (stale, ignored)
            ("deliver", 4, 3, 0),  # e2: attach, then detach, of the second
            ("signal", 0, 2, 0),  # s0 -> s3
            ("flush", 0, 0, 0),
        ]
    )


def test_bug_a_join_from_the_dropped_connection_binds_the_member_to_it() -> None:
    """No loss needed. s2 sends a join and its connection drops before the join reaches
    the owner; s2 resumes on e0. The owner applies the attach (nothing to re-home yet),
    then the old connection's join: s2 becomes a member on the dead connection. The SDK's
    resend of the join is answered from the record (no re-home, unlike a no-op join), and
    the old connection's detach suspends s2: the acked signal s0 sends it never arrives."""
    run_scenario(
        [
            ("join", 0, 1, 0),
            ("flush", 0, 0, 0),
            ("join", 2, 1, 0),
            ("resume", 2, 0, 0),  # to e0
            ("deliver", 0, 0, 0),  # e0: the attach
            ("deliver", 4, 0, 0),  # e2: the join of the dropped connection
            ("flush", 0, 0, 0),
            ("signal", 0, 1, 1),  # s0 -> s2
            ("flush", 0, 0, 0),
        ]
    )


def test_bug_a_join_answered_from_the_record_rewinds_a_resumed_clients_position() -> None:
    """No loss needed. s1's connection drops before its join is answered; on e0 the attach
    says ``recovered: false`` (the client had no position) and the edge starts at the
    room's offset, 2; s2's peer-joined (3) is written. Then the SDK's resend of the join
    is answered from the record: offset 2. The SDK did not track 3 (a room it did not know
    yet) and keeps 2; after the next resume the owner replays 3 and the client gets it
    twice. (The ``recovered`` frame carries no epoch/offset the SDK could start from.)"""
    run_scenario(
        [
            ("join", 0, 0, 0),
            ("flush", 0, 0, 0),
            ("join", 1, 0, 0),
            ("resume", 1, 0, 0),  # to e0
            ("deliver", 2, 1, 0),  # e1: the join and the detach of the dropped connection
            ("deliver", 0, 0, 0),  # e0: the attach
            ("deliver", 1, 3, 0),
            ("join", 2, 0, 0),
            ("deliver", 4, 0, 0),
            ("deliver", 1, 3, 0),  # s1 is written s2's peer-joined (3)
            ("flush", 0, 0, 0),  # the resent join: "joined", offset 2
            ("resume", 1, 2, 0),  # to e2, with (epoch, 2)
            ("flush", 0, 0, 0),
        ]
    )


def test_bug_a_delivery_of_a_new_epoch_is_admitted_at_an_old_epochs_position() -> None:
    """No loss needed. s1 leaves r0 and joins again (the room empties: epoch-1), then its
    connection drops and it resumes on the same edge with its SDK's position (epoch-0, 1).
    s0's peer-joined (epoch-1, offset 2, prev 1), sent for the old connection's stream,
    reaches e1, where s1 now has that position: ``Deliver`` names no epoch, so ``admit``
    writes it as offset 2 of epoch-0, an event that never existed."""
    run_scenario(
        [
            ("join", 1, 0, 0),
            ("flush", 0, 0, 0),
            ("leave", 1, 0, 0),
            ("join", 1, 0, 0),
            ("deliver", 2, 1, 0),  # e1: the leave and the join (room made anew)
            ("join", 0, 0, 0),
            ("deliver", 0, 0, 0),  # e0: s0 joins; peer-joined (2) goes to e1 for s1
            ("resume", 1, 1, 0),  # to e1 again, at (epoch-0, 1)
            ("flush", 0, 0, 0),
        ]
    )


def test_bug_a_repeated_join_id_of_an_earlier_epoch_gives_the_edge_that_epoch() -> None:
    """No loss needed. s1 joins r0 (epoch-0), leaves (the room empties and goes) and joins
    again (epoch-1); then it sends its first join again with its id. The owner answers from
    the record, with the record's epoch and offset (epoch-0, 1), and the edge takes them as
    the member's position (another epoch than its own): every delivery of epoch-1 is then
    dropped as of another epoch, for good."""
    run_scenario(
        [
            ("join", 1, 0, 0),
            ("flush", 0, 0, 0),
            ("leave", 1, 0, 0),
            ("join", 1, 0, 0),
            ("repeat", 1, 0, 0),  # the join, id 1
        ]
    )


def test_bug_a_not_a_member_report_is_dropped_as_stale() -> None:
    """No loss needed. s2 leaves r0 and its connection drops before the answer; it resumes
    on e0 with its position in r0 and the SDK resends the leave. The attach arrives after
    the leave: the owner reports r0 not recovered with no term (a ``Synced`` for a room
    it may not have), and the edge, which knows r0's term, drops it as a deposed owner's.
    So the attach is resent; s2 joins r0 again meanwhile, and the resent attach, naming no
    position in r0 any more, has the new membership reported ``recovered: false``."""
    run_scenario(
        [
            ("join", 2, 0, 0),
            ("flush", 0, 0, 0),
            ("join", 0, 0, 0),
            ("leave", 2, 0, 0),
            ("resume", 2, 0, 0),  # to e0
            ("flush", 0, 0, 0),
            ("join", 2, 0, 0),
            ("advance", 4, 0, 0),
        ]
    )


def test_bug_a_resent_attach_replays_the_previous_membership_into_the_new_one() -> None:
    """Seed 15, shrunk. s2 resumes on e0 (its position in r0: 1), leaves r0 and joins
    again; a reset loses it all, and the retries are applied (the attach, then the leave
    and the join: a new membership from offset 4) with their answers lost; s0 joins (5).
    The edge's resent attach still names position 1, and the owner re-opens the new
    membership's stream there: it replays 2 (of the previous membership) and 5, and the
    edge writes them. Then the answers come: the leave drops the edge's position and the
    join sets it to 4, and the owner's resend from 1 has 5 written again."""
    run_scenario(
        [
            ("join", 2, 0, 0),
            ("flush", 0, 0, 0),
            ("join", 3, 0, 0),
            ("resume", 2, 0, 0),  # to e0
            ("leave", 2, 0, 0),
            ("advance", 4, 0, 0),
            ("join", 2, 0, 0),
            ("reset", 0, 0, 0),
            ("advance", 4, 0, 0),
            ("advance", 5, 0, 0),
            ("join", 0, 0, 0),
            ("deliver", 0, 1, 0),  # e0: the retries
            ("drop", 1, 0, 0),  # their answers
        ]
    )


def test_bug_a_resume_position_from_before_a_rejoin_replays_the_old_membership() -> None:
    """s0 leaves r0 and joins again (4), and its connection drops before either answer
    reaches it; s3 joins (5). s0 resumes on e2 naming its position from before the leave
    (2), and the SDK resends the leave and the join. The owner re-opens the new
    membership's stream at 2 and the edge writes 5 at once; then the answers come: "left"
    (the SDK drops the room) and "joined" at 4, the position the SDK resumes from next
    time, and 5 is written again. (With the replay starting at the join, a replay the edge
    drops as a gap was taken as written: ``Synced`` named the last offset replayed.)"""
    run_scenario(
        [
            ("join", 0, 0, 0),
            ("join", 1, 0, 0),
            ("flush", 0, 0, 0),
            ("leave", 0, 0, 0),
            ("join", 0, 0, 0),
            ("resume", 0, 2, 0),  # to e2
            ("join", 3, 0, 0),
            ("reset", 4, 0, 0),  # e2's link: the attach, the resent leave and join
            ("flush", 0, 0, 0),
            ("advance", 4, 0, 0),
            ("flush", 0, 0, 0),
            ("resume", 0, 0, 0),  # to e0
        ]
    )


def test_bug_a_rejoin_answered_before_the_leave_keeps_the_old_position() -> None:
    """s3 leaves r0 (applied; the answer is lost on a reset) and joins again (4); s0
    signals it (5, prev 4). The join's answer comes first: the edge keeps its position of
    the previous membership (2, the same epoch), reports a gap at 2 and the owner resends
    from the new membership's start (4): a gap again, for good. The leave's answer, when
    it comes, is older than the join's and changes nothing."""
    run_scenario(
        [
            ("join", 0, 0, 0),
            ("join", 3, 0, 0),
            ("flush", 0, 0, 0),
            ("leave", 3, 0, 0),
            ("advance", 4, 0, 0),
            ("join", 3, 0, 0),
            ("signal", 0, 2, 0),  # s0 -> s3
            ("deliver", 0, 0, 0),  # the leave
            ("reset", 0, 0, 0),
        ]
    )


def test_bug_a_resent_attach_after_a_rejoin_on_the_same_connection_is_not_recovered() -> None:
    """s0 resumes on e0 (position 2 in r1) and leaves r1; the attach's ``Synced`` is lost
    on a reset, the leave's answer comes (the edge drops its position) and s0 joins again
    (4). The edge's resent attach names no position in r1 any more; the owner applies it
    after the join and reports the new membership ``recovered: false`` (a stream with no
    position), though its connection's own join starts it and nothing was lost."""
    run_scenario(
        [
            ("join", 0, 1, 0),
            ("join", 1, 1, 0),
            ("flush", 0, 0, 0),
            ("resume", 0, 0, 0),  # to e0
            ("leave", 0, 1, 0),
            ("deliver", 0, 2, 0),  # the detach, the attach, the leave
            ("leave", 0, 1, 0),
            ("reset", 0, 0, 0),
            ("join", 0, 1, 0),
            ("flush", 0, 0, 0),
            ("flap", 0, 0, 0),
            ("advance", 3, 0, 0),
        ],
        replicated=True,
        lossy_replication=True,
    )


def test_bug_a_resend_of_a_repeated_join_id_is_told_the_old_membership() -> None:
    """s2 resumes on e0, leaves r0 (answered), then sends its first join again with its id:
    answered from the record, not a member now. That answer is lost; the edge resends the
    request (same ``rseq``) and the owner answers it from the connection's order with the
    record it kept for that ``rseq``: the first join's, "a member" after it. The edge
    keeps r0 (and a position) for a session that is not in it."""
    run_scenario(
        [
            ("join", 2, 0, 0),
            ("flush", 0, 0, 0),
            ("resume", 2, 0, 0),  # to e0
            ("leave", 2, 0, 0),
            ("flush", 0, 0, 0),
            ("repeat", 2, 0, 0),  # the join, id 1
            ("deliver", 0, 0, 0),
            ("reset", 0, 0, 0),  # its answer
        ]
    )


def test_bug_a_join_that_rehomes_a_suspended_member_skips_what_it_missed() -> None:
    """s1 resumes on e1 (position 1 in r0); the detach arrives, the attach is lost on a
    reset. s0 joins (2, held back: s1 is suspended). s1 joins r0 again with a new id: the
    no-op join re-homes it and ends the suspension, but sends nothing of what was held;
    the next event (3) goes out after 1 and the edge writes it. The attach, resent, names
    position 3 by then: s0's peer-joined (2) never reaches s1."""
    run_scenario(
        [
            ("join", 1, 0, 0),
            ("flush", 0, 0, 0),
            ("resume", 1, 1, 0),  # to e1
            ("dup", 2, 0, 0),  # the detach (twice)
            ("join", 0, 0, 0),
            ("reset", 2, 0, 0),  # the attach
            ("flush", 0, 0, 0),
            ("join", 2, 0, 0),
            ("deliver", 0, 0, 0),
            ("join", 1, 0, 0),
        ],
        replicated=True,
    )


def test_bug_a_copy_of_a_not_recovered_sync_moves_the_position_back() -> None:
    """s1 resumes on e0 before its join was answered (no position); s3 leaves. The owner's
    frame to e0 arrives twice: ``Synced`` (``recovered: false``, offset 2), then s3's
    peer-left (3, prev 2), which the edge writes; the copy's ``Synced`` sets the position
    back to 2 (a not-recovered sync replaced the position even in its epoch) and the
    copy's peer-left is written again."""
    run_scenario(
        [
            ("join", 1, 0, 0),
            ("join", 3, 0, 0),
            ("resume", 1, 0, 0),  # to e0
            ("deliver", 2, 0, 0),  # the first join
            ("leave", 3, 0, 0),
            ("reset", 0, 0, 0),
            ("advance", 4, 0, 0),
            ("deliver", 0, 0, 0),  # the retries
            ("dup", 1, 0, 0),  # their answers, twice
        ]
    )


def test_bug_a_copy_of_a_sync_after_a_leave_writes_the_stream_again() -> None:
    """As the test before, and s1 leaves r0 too: the first copy of the owner's frame has
    the edge write s3's peer-left (3) and then drop s1's position with the leave's answer;
    the report (``recovered: false``) had the SDK join again, so the copy's ``Synced``
    opens a new position at 2, and the copy's peer-left is written again."""
    run_scenario(
        [
            ("join", 1, 0, 0),
            ("join", 3, 0, 0),
            ("resume", 1, 0, 0),  # to e0
            ("deliver", 2, 0, 0),  # the first join
            ("leave", 3, 0, 0),
            ("reset", 0, 0, 0),
            ("leave", 1, 0, 0),
            ("drop", 0, 0, 0),
            ("advance", 4, 0, 0),
            ("deliver", 0, 0, 0),  # the retries
            ("dup", 1, 0, 0),  # their answers, twice
        ]
    )


def test_bug_a_repeated_leave_answered_first_hides_the_rejoin() -> None:
    """s2 joins r1, leaves and joins again; the requests are lost on e2's link and resent.
    s2 sends its leave again with its id: the owner answers it from the record ("left",
    but a member now: nothing changes), and that answer reaches the edge first. It
    changed nothing, yet it took the room's place in the answer order: the answers of
    the requests before it, the join among them, are then ignored as older, and the edge
    never holds r1 (nor re-announces it) though s2 is a member."""
    run_scenario(
        [
            ("join", 2, 1, 0),
            ("leave", 2, 1, 0),
            ("join", 2, 1, 0),
            ("drop", 4, 2, 0),
            ("flush", 0, 0, 0),
            ("advance", 4, 0, 0),
            ("repeat", 2, 1, 0),  # the leave, id 2
            ("deliver", 4, 0, 0),
            ("reset", 4, 0, 0),
        ]
    )


def test_bug_a_restore_resent_behind_a_leave_makes_the_room_anew() -> None:
    """No loss needed. An owners change has e0 re-announce s3 in r1; s3 leaves before the
    owner answered, and the edge's resend of the re-announcement (still scheduled: only
    the leave's answer cancelled it) goes out behind the leave. The leave empties r1 (the
    room goes, with what it remembered of departed members) and the resent ``RestoreCmd``
    makes it anew with s3 in it: s3's next signal is acked though it left."""
    run_scenario(
        [
            ("join", 3, 1, 0),
            ("flush", 0, 0, 0),
            ("flap", 0, 0, 0),
            ("leave", 3, 1, 0),
            ("advance", 3, 0, 0),
            ("signal", 3, 3, 1),
        ]
    )


def test_bug_a_repeated_join_id_of_an_earlier_membership_gives_the_edge_its_offset() -> None:
    """s3 joins r0 (id 3, offset 1 of epoch-1), leaves and joins again (id 5, offset 4);
    the answer to the last join is lost, and s3 sends its join id 3 again. That is
    answered from the record: "joined" at 1, an offset of the earlier membership, which
    the edge (no position since the leave's answer) takes: every delivery of the new
    membership (prev 4 and up) is a gap at the edge, and the owner, which does not resend
    below where the membership began, sends the same again for good. (The answer to join
    5, older than the repeat's, changes nothing when it comes.)"""
    run_scenario(
        [
            ("join", 3, 0, 0),
            ("leave", 3, 0, 0),
            ("join", 3, 0, 0),
            ("flush", 0, 0, 0),
            ("join", 0, 0, 0),
            ("flush", 0, 0, 0),
            ("leave", 3, 0, 0),
            ("flush", 0, 0, 0),
            ("join", 3, 0, 0),
            ("deliver", 0, 0, 0),
            ("signal", 0, 2, 0),  # s0 -> s3
            ("deliver", 0, 0, 0),
            ("drop", 1, 0, 0),  # the answer to join 5, and the signal
            ("repeat", 3, 2, 0),  # the join, id 3
        ]
    )


def test_bug_a_lost_not_recovered_report_and_a_resent_join_skip_events() -> None:
    """s3's join is applied but not answered before it resumes on e0 naming no room; s0
    joins (2, for s3). The attach finds s3 a member with no position: the owner restarts
    its stream at 2 and reports ``recovered: false``, and that report is lost (as are the
    attach's few resends). The SDK's resent join is answered from the record, offset 1,
    and the edge takes it: the owner's stream is past 2 already, nothing resends 2, and
    the client was never told it lost it."""
    run_scenario(
        [
            ("join", 3, 1, 0),
            ("join", 0, 1, 0),
            ("dup", 0, 0, 0),
            ("deliver", 0, 0, 0),
            ("resume", 3, 0, 0),  # to e0, no room named
            ("advance", 4, 0, 0),
            ("advance", 5, 0, 0),
            ("flap", 0, 0, 0),
            ("advance", 3, 0, 0),
            ("deliver", 0, 0, 0),
            ("deliver", 0, 0, 0),
            ("flap", 0, 0, 0),
            ("advance", 3, 0, 0),
            ("reset", 0, 0, 0),
        ]
    )
