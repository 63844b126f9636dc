"""EdgeCore: the edge's session logic for rooms, sans I/O.

What a client's requests become and what the owners' answers and deliveries mean for it,
decided with no sockets and no clock (``now`` is passed in): numbering requests (per
connection ``seq``, per room ``rseq``/``rbase``), resending what is unanswered
(``edge.delivery.Retries``), which room events to write (``edge.delivery.admit``) and
what to confirm, which owners are deposed (terms), and the soft state re-announced when
the brokers change (joined rooms and the position written in each). ``edge.server``
keeps the links, the timers and the writes; it calls the core and carries out the actions
the core queues (``take``), in order. ``tests/unit/test_delivery_model.py`` drives the same
core over lossy links against a reference model.

Membership follows the owner's answers in the order the requests were made (``rseq``): an
answer to an older join or leave that arrives after a newer one's changes nothing, and a
join answered while the session is no longer a member (a resend of an old id) adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Generic, NamedTuple, TypeVar

import msgspec

from edge.delivery import (
    ACCEPT,
    DUPLICATE,
    GAP,
    OTHER_EPOCH,
    Confirmations,
    Position,
    Retries,
)
from signalpost.wire import (
    AttachCmd,
    Deliver,
    Envelope,
    ForgetCmd,
    JoinCmd,
    LeaveCmd,
    RecoveredFrame,
    Reply,
    RestoreCmd,
    RoomPosition,
    SignalCmd,
    Synced,
    encode_frame,
)

#: Rooms whose owner's term the edge remembers at once; past that it starts over (room
#: names come from clients). Forgetting a term only lets a deposed owner's late envelope
#: through until the current owner is heard from again.
MAX_ROOM_TERMS: Final = 100_000

#: An attach is resent (1, 2, 4, 8 s) until every room the resume named was reported, and
#: at most this often: with no room named there is no answer to wait for.
ATTACH_RESENDS: Final = 4

#: Rooms a connection left whose last position it keeps (the oldest go first): a stream
#: opened there again in the same epoch starts no lower (see ``SessionState.left``).
MAX_LEFT_POSITIONS: Final = 256

#: After the broker set changed, unanswered requests are resent at once and again this
#: soon: the new owner may learn that it owns the room a moment after the edge did.
OWNERS_CHANGED_RETRY: Final = 0.5


@dataclass(slots=True, eq=False, kw_only=True)
class SessionState:
    """One connection's session as far as rooms go (``edge.server.ClientConnection``)."""

    session: str
    conn: str
    seq: int = 0
    unanswered: dict[int, Envelope] = field(default_factory=dict)  # seq -> command
    rooms: dict[str, bytes] = field(default_factory=dict)  # joined room -> peer object
    positions: dict[str, Position] = field(default_factory=dict)  # room -> what was written
    # room -> its position when the session left it (or was told it is not in it): a late
    # copy or an answer from before that must not have the same events written again
    left: dict[str, Position] = field(default_factory=dict)
    room_seqs: dict[str, int] = field(default_factory=dict)  # room -> last request's rseq
    waiting_in: dict[str, dict[int, None]] = field(default_factory=dict)  # room -> rseqs owed
    member_since: dict[str, int] = field(default_factory=dict)  # room -> rseq of its answer
    attaching: set[str] = field(default_factory=set)  # rooms a resume waits to hear about
    attach_resends: int = 0  # resends of its attach so far (``ATTACH_RESENDS`` at most)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


class ToOwner(NamedTuple):
    """Send ``command`` to the owner of ``room``."""

    room: str
    command: Envelope


class ToReplica(NamedTuple):
    """Send ``command`` to the runner-up of ``room``."""

    room: str
    command: Envelope


class Reannounce(NamedTuple):
    """Re-announce a member to the owner and the runner-up of its room."""

    room: str
    restore: RestoreCmd


class ToPresence(NamedTuple):
    command: Envelope


class Attach(NamedTuple):
    """Tell every broker that ``session`` resumed here, with its rooms' positions."""

    session: str
    conn: str
    positions: dict[str, RoomPosition]


class ConfirmPositions(NamedTuple):
    """``(room, session, epoch, offset, gap)`` for the rooms' owners."""

    positions: list[tuple[str, str, str, int, bool]]


class Write(NamedTuple):
    """Write ``payload`` to the client of ``state``."""

    state: SessionState
    payload: bytes


Action = ToOwner | ToReplica | Reannounce | ToPresence | Attach | ConfirmPositions | Write
RoomRequest = SignalCmd | JoinCmd | LeaveCmd
#: The same as a tuple: ``isinstance`` against a tuple costs a quarter of what it costs
#: against ``A | B | C``, which builds the union on every call (once per answer here).
_ROOM_REQUESTS: Final = (SignalCmd, JoinCmd, LeaveCmd)
S = TypeVar("S", bound=SessionState)


class EdgeCore(Generic[S]):
    """The edge's room logic for the sessions it holds (``sessions``)."""

    def __init__(self, edge_id: str, *, lossy: bool) -> None:
        self.edge_id = edge_id
        #: Links to the owners can lose envelopes (a cluster): confirm what is written,
        #: resend what is unanswered, fence deposed owners. In one process they cannot.
        self.lossy = lossy
        self.sessions: dict[str, S] = {}
        self.confirms = Confirmations()
        self.retries: Retries[tuple[S, Envelope]] = Retries()
        self.terms: dict[str, int] = {}  # room -> highest owner term heard
        self._actions: list[Action] = []

    def take(self) -> list[Action]:
        """The actions queued since the last take, in order."""
        actions, self._actions = self._actions, []
        return actions

    # ----------------------------------------------------------------- requests

    def room_order(self, state: S, room: str) -> tuple[int, int]:
        """``(rseq, rbase)`` of a new request to ``room``: owners apply in this order."""
        if not self.lossy:
            return 0, 0  # one process: requests cannot overtake each other
        rseq = state.room_seqs[room] = state.room_seqs.get(room, 0) + 1
        waiting = state.waiting_in.get(room)
        if waiting is None:
            waiting = state.waiting_in[room] = {}
        rbase = next(iter(waiting), rseq)
        waiting[rseq] = None
        return rseq, rbase

    def await_answer(self, state: S, seq: int, command: Envelope, now: float) -> None:
        """Keep ``command`` until its answer comes (resent meanwhile)."""
        state.unanswered[seq] = command
        if self.lossy:
            self.retries.add((state.conn, seq), (state, command), now)
            if isinstance(command, LeaveCmd):
                # A re-announcement resent behind the leave would put the member back.
                self.retries.done((state.conn, "restore", command.room))

    def _resend(self, state: S, command: Envelope) -> None:
        if isinstance(command, SignalCmd | JoinCmd | LeaveCmd):
            if command.rseq:
                # Tell the owner what was answered meanwhile: it need not wait for those.
                waiting = state.waiting_in.get(command.room)
                rbase = next(iter(waiting), command.rseq) if waiting else command.rseq
                if rbase != command.rbase:
                    command = msgspec.structs.replace(command, rbase=rbase)
            self._actions.append(ToOwner(command.room, command))
        elif isinstance(command, RestoreCmd):
            self._actions.append(Reannounce(command.room, command))
        elif isinstance(command, AttachCmd):
            state.attach_resends += 1
            if state.attach_resends >= ATTACH_RESENDS:
                self.retries.done((state.conn, "attach"))
            # Where the session stands now in every room it has: the owners re-sync from
            # there (what was reported already is not reported lost).
            now_at = {r: RoomPosition(p.epoch, p.offset) for r, p in state.positions.items()}
            self._actions.append(Attach(state.session, state.conn, now_at))
        else:
            self._actions.append(ToPresence(command))

    # ----------------------------------------------------------------- timers

    def tick(self, now: float) -> None:
        """Confirm what was written; resend what is owed."""
        if self.confirms:
            self._actions.append(ConfirmPositions(self.confirms.take()))
        for state, command in self.retries.due(now):
            if self.sessions.get(state.session) is state:
                self._resend(state, command)

    def owners_changed(self, now: float) -> None:
        """Brokers came or went: re-announce memberships with what each session has been
        written (resent until the owner answers ``Synced``), then resend unanswered
        requests (at once, and again soon)."""
        states = list(self.sessions.values())
        for state in states:
            for room, peer in state.rooms.items():
                if self._leaving(state, room):
                    continue  # its leave is on the way: it must not come back
                position = state.positions.get(room)
                restore = RestoreCmd(
                    state.session,
                    state.conn,
                    self.edge_id,
                    room,
                    peer,
                    False,
                    position.epoch if position is not None else "",
                    position.offset if position is not None else 0,
                )
                self._actions.append(Reannounce(room, restore))
                if self.lossy:
                    self.retries.add((state.conn, "restore", room), (state, restore), now)
        if self.lossy:
            self.retries.reschedule(now, OWNERS_CHANGED_RETRY)
        for state in states:
            for seq in sorted(state.unanswered):
                command = state.unanswered[seq]
                if isinstance(command, SignalCmd | JoinCmd | LeaveCmd):
                    self._resend(state, command)

    @staticmethod
    def _left_before(state: SessionState, join: JoinCmd) -> bool:
        """Whether a leave of the room sent before ``join`` is still unanswered."""
        return any(
            isinstance(c, LeaveCmd) and c.room == join.room and c.rseq < join.rseq
            for c in state.unanswered.values()
        )

    @staticmethod
    def _leaving(state: SessionState, room: str) -> bool:
        return any(isinstance(c, LeaveCmd) and c.room == room for c in state.unanswered.values())

    # ----------------------------------------------------------------- sessions

    def resumed(self, state: S, rooms: dict[str, RoomPosition], now: float) -> None:
        """A resumed session is registered: where it says it is in each room; the owners
        replay what came after (the attach is resent until every room was reported)."""
        for room, seen in rooms.items():
            state.positions[room] = Position(seen.epoch, seen.offset)
        self._actions.append(Attach(state.session, state.conn, dict(rooms)))
        if self.lossy:
            # Resent while a named room is unreported (an attach lost on a reset link),
            # and a few times anyway: rooms the client did not name have no answer.
            state.attaching = set(rooms)
            attach = AttachCmd(state.session, state.conn, self.edge_id, dict(rooms))
            self.retries.add((state.conn, "attach"), (state, attach), now)

    def closed(self, state: S) -> None:
        """The connection ended: nobody is left to answer on it, nothing of it is confirmed
        (an owner takes a position confirmed after it re-synced the session as the answer
        to that ``Synced``)."""
        if not self.lossy:
            return
        for room, position in state.positions.items():
            self.confirms.forget_stream(room, state.session, position)
        for seq in state.unanswered:
            self.retries.done((state.conn, seq))
        for room in state.rooms:
            self.retries.done((state.conn, "restore", room))
        self.retries.done((state.conn, "attach"))

    # ----------------------------------------------------------------- from owners

    def stale(self, room: str, term: int) -> bool:
        """Whether an owner's envelope for ``room`` comes from a term older than one heard
        (fencing: a deposed owner that woke up must not reach clients)."""
        if not self.lossy:
            return False  # one process, one room table: nobody to be deposed
        known = self.terms.get(room, 0)
        if term >= known:
            if term > known:
                if len(self.terms) >= MAX_ROOM_TERMS:
                    self.terms.clear()
                self.terms[room] = term
            return False
        return True

    def admit(self, state: S, deliver: Deliver) -> int | None:
        """Whether ``state`` is written this room event: ``ACCEPT``, ``DUPLICATE``, ``GAP``
        (``edge.delivery``), or None when the session has no position in the room here
        (its joined answer or sync is still to come; unconfirmed, it is resent). Copies and
        gaps are confirmed back to the owner."""
        position = state.positions.get(deliver.room)
        if position is None:
            return None
        # ``edge.delivery.admit``, inline (once per delivered event)
        epoch = deliver.epoch
        if epoch and epoch != position.epoch:
            return OTHER_EPOCH  # nothing to confirm: the stream it belongs to is not this one
        offset = deliver.offset
        if offset <= position.offset:
            verdict = DUPLICATE
        elif deliver.prev > position.offset:
            verdict = GAP
        else:
            position.offset = offset
            verdict = ACCEPT
        if self.lossy:
            if verdict != GAP:
                self.confirms.note(deliver.room, state.session, position)
            else:
                self.confirms.note(deliver.room, state.session, position, gap=True)
        return verdict

    def reply(self, reply: Reply) -> tuple[S, Envelope] | None:
        """An owner's answer: the request it answers (its payload is to be written), or
        None (not for a session here, stale, or already answered)."""
        state = self.sessions.get(reply.session)
        if state is None or state.conn != reply.conn:
            return None
        if (
            reply.term
            and self.lossy
            and reply.term != self.terms.get(reply.room)  # the term known: not stale
            and self.stale(reply.room, reply.term)
        ):
            return None  # a deposed owner's answer: the request is resent to the owner
        command = state.unanswered.pop(reply.seq, None)
        if command is None:
            return None  # the answer to a retry that was already answered
        if self.lossy:
            self.retries.done((state.conn, reply.seq))
            # answered in its room: the owner need not wait for it (once per answer, inline)
            if isinstance(command, _ROOM_REQUESTS) and command.rseq:
                waiting = state.waiting_in.get(command.room)
                if waiting is not None:
                    waiting.pop(command.rseq, None)
                    if not waiting:
                        del state.waiting_in[command.room]
        if type(command) is JoinCmd or type(command) is LeaveCmd:
            self._membership(state, command, reply)
        return state, command

    def _membership(self, state: S, command: JoinCmd | LeaveCmd, reply: Reply) -> None:
        """Remember joined rooms (the soft state re-announced when a room changes owner),
        as the owner answered them, newest request last."""
        room = command.room
        if not reply.ok:
            return
        if reply.member and isinstance(command, LeaveCmd):
            # A resend of an old leave, answered while a member again: no change, and it
            # orders nothing (the join answers it would hide carry the peer to keep).
            return
        if command.rseq:
            if command.rseq < state.member_since.get(room, 0):
                return  # a newer join or leave of this room was answered already
            state.member_since[room] = command.rseq
        if isinstance(command, JoinCmd) and reply.member:
            state.rooms[room] = command.peer
            position = state.positions.get(room)
            if reply.epoch and (position is None or position.epoch != reply.epoch):
                self._open(state, room, reply.epoch, reply.offset)
            elif position is not None and self._left_before(state, command):
                # The position is of the membership that leave ended (its answer, still to
                # come, changes nothing now): this one's stream starts at the join.
                position.offset = max(position.offset, reply.offset)
            restore = RestoreCmd(state.session, state.conn, self.edge_id, room, command.peer, True)
            self._actions.append(ToReplica(room, restore))
        elif isinstance(command, LeaveCmd) or not reply.member:
            state.rooms.pop(room, None)
            self._close(state, room)
            self.confirms.forget(room, state.session)
            if self.lossy:
                self.retries.done((state.conn, "restore", room))
            if isinstance(command, LeaveCmd):
                self._actions.append(ToReplica(room, ForgetCmd(state.session, room, self.edge_id)))

    def synced(self, synced: Synced) -> None:
        """An owner (re)opened a session's stream in a room: after a resume or a restore;
        or (no room) it has handled the session's attach."""
        state = self.sessions.get(synced.session)
        if state is None or state.conn != synced.conn:
            return
        if synced.term and self.stale(synced.room, synced.term):
            return  # (no term: a room the owner does not have, reported not recovered)
        if not synced.peer:  # not a member there: reported, nothing kept
            self.not_a_member(state, synced.room)
            frame = RecoveredFrame(room=synced.room, recovered=synced.recovered)
            self._actions.append(Write(state, encode_frame(frame)))
            return
        self._reported(state, synced.room)
        if self.lossy:
            self.retries.done((state.conn, "restore", synced.room))
        state.rooms[synced.room] = synced.peer
        position = state.positions.get(synced.room)
        if position is not None and position.epoch == synced.epoch:
            # Never back in the epoch: what was written is not written again (a copy or a
            # late ``Synced``, even one that reports a loss, restarts nothing before it).
            position.offset = max(position.offset, synced.offset)
        else:
            position = self._open(state, synced.room, synced.epoch, synced.offset)
        if self.lossy:
            self.confirms.forget(synced.room, state.session)
            self.confirms.note(synced.room, state.session, position)
        if synced.report:
            frame = RecoveredFrame(
                room=synced.room,
                recovered=synced.recovered,
                epoch=position.epoch,
                offset=position.offset,
            )
            self._actions.append(Write(state, encode_frame(frame)))

    def not_a_member(self, state: S, room: str) -> None:
        """An owner reported ``recovered: false`` for a room the session is not in."""
        self._reported(state, room)
        self._close(state, room)

    @staticmethod
    def _open(state: SessionState, room: str, epoch: str, offset: int) -> Position:
        """A new position in ``room``: never below what was written there in ``epoch``."""
        left = state.left.pop(room, None)
        if left is not None and left.epoch == epoch:
            offset = max(offset, left.offset)
        position = state.positions[room] = Position(epoch, offset)
        return position

    @staticmethod
    def _close(state: SessionState, room: str) -> None:
        """No stream in ``room`` any more; what was written there is remembered."""
        position = state.positions.pop(room, None)
        if position is not None:
            state.left.pop(room, None)
            state.left[room] = position
            if len(state.left) > MAX_LEFT_POSITIONS:
                del state.left[next(iter(state.left))]

    def _reported(self, state: S, room: str) -> None:
        """The owner reported ``room`` after the session's resume."""
        if room in state.attaching:
            state.attaching.discard(room)
            if not state.attaching and self.lossy:
                self.retries.done((state.conn, "attach"))  # every named room is back
