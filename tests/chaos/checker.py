"""The journal of a chaos run and the judge of it (pure: no sockets, no clock, no cluster).

Theory of operation
-------------------
Every client of the run writes what it did and saw to one ``Journal``, with times from
one monotonic clock (all clients live in the harness process):

- ``SentSignal``: a signal request: sender, room, the sender's sequence number for that
  room, ``to`` (or none: the whole room), the targets it was meant for (the other members,
  or the named peer: membership is fixed after the start), when it was first sent, on
  which connections (a request pending when a connection drops is resent, with the same
  id, after the resume), and how it ended: ``ack``, an ``error`` code, or given up.
- ``Reception``: a ``signal`` frame a client received, with the connection it came on,
  and whether it counted: a frame on a connection the client had already abandoned (it
  had started resuming elsewhere) is not seen by the application, only recorded.
- ``ConnectionLog``: one WebSocket of a client: opened, welcomed (resumed or not),
  abandoned, closed (code), and every frame that came on it after it was abandoned.
- ``RecoveryLog``: a ``recovered`` frame (room, true or false).
- ``FaultLog``: what the harness broke, and when; only used to tell the story.

``check`` reads the journal and returns every ``Violation``:

- ``lost``: an acked signal never reached a target (counted), and nothing excuses it.
- ``missed_after_recovered_true``: the same, but after the ack the target resumed from a
  position before the signal and was told ``recovered: true`` for the room: the cluster
  said nothing was missed. (A signal the target missed live, before positions past it, is
  ``lost``: its resume did not ask for it.)
- ``duplicate``: a target got the same signal twice (acked or not: an unacked signal may
  arrive at most once).
- ``out_of_order``: a target got a sender's signals in a room out of their order.
- ``misdelivered``: a signal reached a client that was not one of its targets, or a
  signal nobody sent.
- ``two_live_connections``: an abandoned connection still carried frames (past a short
  grace for frames already on the wire) after the newer connection of the same session
  got its welcome, or was still open ``replace_bound`` seconds after it (the protocol
  closes it with 4409).
- ``resume_refused``: a resume within the resume window got ``resumed: false``: the
  session is gone (guarantee 2). The target is then exempt for the signals after its
  connection ended: it was told.
- ``member_refused``: a signal was refused with ``not_in_room`` (the sender is a member:
  membership is fixed) or ``unknown_peer`` (the peer is a member whose session was not
  lost): the cluster forgot a member (guarantee 5).
- ``peer_left``: a client was told that a member left (``peer-left``), though no member
  leaves and that member's session was not lost: resumed in time, the others must notice
  nothing (guarantee 2).

Exemptions: a target that got ``recovered: false`` for a room is exempt for that room's
signals sent before that point; a signal that was not acked may be missing. A
``recovered: false`` without a position says the session is no member of the room any
more (the room was lost with every broker that held it, as when its whole home region is
killed, and came back without it): the client joins again (``RejoinLog``), and until that
join is answered its own signals refused ``not_in_room``, the signals naming it refused
``unknown_peer`` and the room's signals it misses are exempt (it was told).
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

#: Frames on an abandoned connection this long after the newer welcome were sent after it.
STALE_GRACE = 0.25
#: An abandoned connection must be closed (4409) this long after the newer welcome.
REPLACE_BOUND = 5.0
#: Signals acked this long before a refused session's connection ended are still judged.
REFUSED_SLACK = 1.0


class Kind(StrEnum):
    """What a violation broke."""

    LOST = "lost"
    MISSED_AFTER_RECOVERED_TRUE = "missed_after_recovered_true"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    MISDELIVERED = "misdelivered"
    TWO_LIVE_CONNECTIONS = "two_live_connections"
    RESUME_REFUSED = "resume_refused"
    MEMBER_REFUSED = "member_refused"
    PEER_LEFT = "peer_left"
    MEMBERSHIP_LOST = "membership_lost"


SignalKey = tuple[str, str, int]  # (sender, room, seq)


@dataclass(slots=True)
class SentSignal:
    """One signal request and how it ended."""

    sender: str
    room: str
    seq: int
    to: str | None
    targets: tuple[str, ...]
    request_id: int
    sent_at: float
    marker: bool = False
    sent_on: list[int] = field(default_factory=list)  # connection numbers, in order
    acked_at: float | None = None
    refused: str | None = None  # the error code
    gave_up_at: float | None = None

    @property
    def key(self) -> SignalKey:
        return (self.sender, self.room, self.seq)

    def describe(self, t0: float) -> str:
        to = f"to {self.to}" if self.to else "to the room"
        if self.acked_at is not None:
            outcome = f"acked t={self.acked_at - t0:.3f}"
        elif self.refused is not None:
            outcome = f"refused ({self.refused})"
        elif self.gave_up_at is not None:
            outcome = f"not acked (gave up t={self.gave_up_at - t0:.3f})"
        else:
            outcome = "not acked"
        kind = " marker" if self.marker else ""
        return (
            f"{self.sender}/{self.room}#{self.seq}{kind} {to}, id {self.request_id}, "
            f"sent t={self.sent_at - t0:.3f} on conn {self.sent_on}, {outcome}"
        )


@dataclass(slots=True, frozen=True)
class Reception:
    """One ``signal`` frame a client received."""

    target: str
    room: str
    sender: str
    seq: int
    offset: int
    at: float
    conn: int
    counted: bool  # on the connection the client was using (not an abandoned one)

    @property
    def key(self) -> SignalKey:
        return (self.sender, self.room, self.seq)

    def describe(self, t0: float) -> str:
        late = "" if self.counted else " (abandoned conn: not counted)"
        return (
            f"t={self.at - t0:.3f} conn {self.conn} {self.sender}/{self.room}#{self.seq} "
            f"offset {self.offset}{late}"
        )


@dataclass(slots=True)
class ConnectionLog:
    """One WebSocket of a client."""

    client: str
    number: int
    edge: str
    opened_at: float
    welcome_at: float | None = None
    resumed: bool | None = None
    session: str | None = None
    abandoned_at: float | None = None  # the client started a newer connection
    closed_at: float | None = None
    close_code: int | None = None
    closed_by_client: bool = False
    after_abandon: list[tuple[float, str]] = field(default_factory=list)  # (time, frame type)
    positions: dict[str, int] = field(default_factory=dict)  # room -> offset asked to resume

    @property
    def ended_at(self) -> float | None:
        times = [t for t in (self.abandoned_at, self.closed_at) if t is not None]
        return min(times) if times else None

    def describe(self, t0: float) -> str:
        def at(t: float | None) -> str:
            return "-" if t is None else f"{t - t0:.3f}"

        return (
            f"conn {self.number} on {self.edge}: opened t={at(self.opened_at)} "
            f"welcome t={at(self.welcome_at)} resumed={self.resumed} "
            f"abandoned t={at(self.abandoned_at)} closed t={at(self.closed_at)} "
            f"code {self.close_code}{' (by the client)' if self.closed_by_client else ''}"
        )


@dataclass(slots=True, frozen=True)
class RecoveryLog:
    """A ``recovered`` frame."""

    client: str
    room: str
    at: float
    recovered: bool
    conn: int
    #: False: no position came with it, the session is not a member of the room any more
    #: (the room was lost with every broker that held it: a region kill), and rejoins.
    member: bool = True


@dataclass(slots=True, frozen=True)
class RejoinLog:
    """A join, answered ``joined``, after ``recovered: false`` said the client was not a
    member of the room any more."""

    client: str
    room: str
    at: float


@dataclass(slots=True, frozen=True)
class DepartureLog:
    """A ``peer-left`` frame: ``client`` was told ``peer`` left ``room``."""

    client: str
    room: str
    peer: str  # the peer's user: each client of a run is a user of its own
    reason: str
    at: float
    conn: int


@dataclass(slots=True)
class FaultLog:
    """One fault the harness injected."""

    kind: str
    target: str
    at: float
    ended_at: float | None = None
    detail: str = ""

    def describe(self, t0: float) -> str:
        end = "" if self.ended_at is None else f"-{self.ended_at - t0:.3f}"
        detail = f" ({self.detail})" if self.detail else ""
        return f"t={self.at - t0:.3f}{end} {self.kind} {self.target}{detail}"


@dataclass(slots=True)
class Journal:
    """Everything a run did and saw."""

    t0: float
    signals: list[SentSignal] = field(default_factory=list)
    receptions: list[Reception] = field(default_factory=list)
    connections: list[ConnectionLog] = field(default_factory=list)
    recoveries: list[RecoveryLog] = field(default_factory=list)
    departures: list[DepartureLog] = field(default_factory=list)
    rejoins: list[RejoinLog] = field(default_factory=list)
    faults: list[FaultLog] = field(default_factory=list)
    notes: list[tuple[float, str, str]] = field(default_factory=list)  # (time, client, text)

    def note(self, at: float, client: str, text: str) -> None:
        self.notes.append((at, client, text))


@dataclass(slots=True)
class Violation:
    """One broken promise, with what the client saw around it."""

    kind: Kind
    at: float
    summary: str
    history: list[str] = field(default_factory=list)

    def render(self, t0: float) -> str:
        lines = [f"[{self.kind}] t={self.at - t0:.3f} {self.summary}"]
        lines += [f"    {line}" for line in self.history]
        return "\n".join(lines)


@dataclass(slots=True)
class Verdict:
    """The violations and how much was judged."""

    violations: list[Violation]
    deliveries_checked: int  # (acked signal, target) pairs judged
    exempt: int  # (acked signal, target) pairs excused by recovered: false or a refused resume

    def by_kind(self) -> Counter[str]:
        return Counter(str(v.kind) for v in self.violations)


class _Index:
    """Lookups the checks share."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.signals: dict[SignalKey, SentSignal] = {s.key: s for s in journal.signals}
        # (target, room, sender) -> counted receptions in arrival order
        self.stream: dict[tuple[str, str, str], list[Reception]] = defaultdict(list)
        self.got: Counter[tuple[str, SignalKey]] = Counter()
        self.offset_of: dict[SignalKey, int] = {}  # from any target that got it
        # (target, room) -> arrival times of counted receptions in the room, from anyone
        self.room_times: dict[tuple[str, str], list[float]] = defaultdict(list)
        # (target, sender) -> counted receptions from the sender in any room, and their times
        self.by_pair: dict[tuple[str, str], list[Reception]] = defaultdict(list)
        self.pair_times: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.uncounted: dict[tuple[str, SignalKey], list[Reception]] = defaultdict(list)
        for reception in sorted(journal.receptions, key=lambda r: r.at):
            self.offset_of.setdefault(reception.key, reception.offset)
            if not reception.counted:
                self.uncounted[(reception.target, reception.key)].append(reception)
                continue
            self.room_times[(reception.target, reception.room)].append(reception.at)
            self.by_pair[(reception.target, reception.sender)].append(reception)
            self.pair_times[(reception.target, reception.sender)].append(reception.at)
            self.stream[(reception.target, reception.room, reception.sender)].append(reception)
            self.got[(reception.target, reception.key)] += 1
        self.recoveries: dict[tuple[str, str], list[RecoveryLog]] = defaultdict(list)
        for recovery in sorted(journal.recoveries, key=lambda r: r.at):
            self.recoveries[(recovery.client, recovery.room)].append(recovery)
        self.connections: dict[str, list[ConnectionLog]] = defaultdict(list)
        for connection in sorted(journal.connections, key=lambda c: c.number):
            self.connections[connection.client].append(connection)
        self.rejoins: dict[tuple[str, str], list[float]] = defaultdict(list)
        for rejoin in sorted(journal.rejoins, key=lambda r: r.at):
            self.rejoins[(rejoin.client, rejoin.room)].append(rejoin.at)
        self.refused_from: dict[str, float] = {}  # client -> when its session was lost
        for client, connections in self.connections.items():
            for before, after in itertools.pairwise(connections):
                if after.resumed is False and before.ended_at is not None:
                    self.refused_from.setdefault(client, before.ended_at - REFUSED_SLACK)

    def exempt(self, signal: SentSignal, target: str) -> bool:
        """Whether ``target`` was honestly told it may have missed ``signal``."""
        refused = self.refused_from.get(target)
        if refused is not None and (signal.acked_at or signal.sent_at) >= refused:
            return True
        return self.out_of_room(target, signal.room, signal.sent_at) or any(
            not r.recovered and r.at > signal.sent_at
            for r in self.recoveries[(target, signal.room)]
        )

    def out_of_room(self, client: str, room: str, at: float) -> bool:
        """Whether ``client`` was told it was no member of ``room`` any more (``recovered:
        false`` without a position) after ``at``, or before ``at`` and had not joined
        again by then (the join's answer). Without a join after it, only the time before
        the telling counts."""
        rejoins = self.rejoins[(client, room)]
        for recovery in self.recoveries[(client, room)]:
            if recovery.member or recovery.recovered:
                continue
            if at < recovery.at:
                return True
            later = bisect.bisect_left(rejoins, recovery.at)
            if later < len(rejoins) and at < rejoins[later]:
                return True
        return False

    def owed_replay(self, signal: SentSignal, target: str, recovery: RecoveryLog) -> bool:
        """Whether the resume that ended in ``recovery`` asked for ``signal`` to be replayed.

        It did when the position sent was before the signal's offset (known when another
        target got it) or, without the offset, when the target had got nothing in the room
        since the signal was sent: it was lost live otherwise (offsets past it were seen).
        """
        connection = next((c for c in self.connections[target] if c.number == recovery.conn), None)
        if connection is None:
            return True
        position = connection.positions.get(signal.room)
        offset = self.offset_of.get(signal.key)
        if position is not None and offset is not None:
            return offset > position
        times = self.room_times[(target, signal.room)]
        first_after = bisect.bisect_left(times, signal.sent_at)
        return first_after == len(times) or times[first_after] >= connection.opened_at

    def history(self, signal: SentSignal | None, target: str, key: SignalKey) -> list[str]:
        """What ``target`` saw around ``key``: deliveries, connections, recoveries, faults."""
        t0 = self.journal.t0
        sender, room, seq = key
        lines = [f"signal: {signal.describe(t0)}" if signal else f"signal {key}: never sent"]
        stream = self.stream[(target, room, sender)]
        near = [r for r in stream if abs(r.seq - seq) <= 3] or stream[-3:]
        lines.append(f"{target} got from {sender} in {room} (near #{seq}, {len(stream)} in all):")
        lines += [f"  {r.describe(t0)}" for r in near] or ["  nothing"]
        if signal is not None:
            pair = self.by_pair[(target, sender)]
            times = self.pair_times[(target, sender)]
            lo = bisect.bisect_left(times, signal.sent_at - 1.0)
            hi = bisect.bisect_right(times, signal.sent_at + 1.0)
            around = [r for r in pair[lo:hi] if r.room != room]
            if around:
                lines.append(f"{target} got from {sender} in other rooms within 1 s of sending:")
                lines += [f"  {r.describe(t0)}" for r in around]
        for r in self.uncounted[(target, key)]:
            lines.append(f"  on an abandoned conn: {r.describe(t0)}")
        when = signal.sent_at if signal else (near[0].at if near else t0)
        lines.append(f"{target}'s connections near t={when - t0:.3f}:")
        for connection in self.connections[target]:
            start = connection.opened_at
            end = connection.closed_at or float("inf")
            if start <= when + 15 and end >= when - 15:
                lines.append(f"  {connection.describe(t0)}")
        for recovery in self.recoveries[(target, room)]:
            if abs(recovery.at - when) > 60:
                continue
            lines.append(
                f"{target} recovered {room}: {recovery.recovered} at t={recovery.at - t0:.3f} "
                f"(conn {recovery.conn})"
            )
        for departure in self.journal.departures:
            if departure.client == target and departure.room == room:
                lines.append(
                    f"{target} was told {departure.peer} left {room} ({departure.reason}) "
                    f"at t={departure.at - t0:.3f}"
                )
        for at, client, text in self.journal.notes:
            if client in (target, sender) and when - 10 <= at <= when + 10:
                lines.append(f"note t={at - t0:.3f} {client}: {text}")
        faults = [f for f in self.journal.faults if when - 10 <= f.at <= when + 5]
        lines += [f"fault {f.describe(t0)}" for f in faults]
        return lines


def check(
    journal: Journal, *, resume_window: float = 30.0, rooms_may_be_lost: bool = False
) -> Verdict:
    """Every violation in ``journal``, and how many deliveries were judged.

    ``rooms_may_be_lost``: the run kills whole regions, so a room can be lost with every
    broker that held it; otherwise a member told it is no member any more (``recovered:
    false`` without a position) is a violation (``membership_lost``), though its misses
    and refusals until it joined again are excused as ever."""
    index = _Index(journal)
    violations: list[Violation] = []
    if not rooms_may_be_lost:
        violations += _memberships_lost(index)
    violations += _misdelivered(index)
    violations += _duplicates_and_order(index)
    checked, exempt, missing = _losses(index)
    violations += missing
    violations += _connections(index, resume_window)
    violations += _member_refusals(index)
    violations += _departures(index)
    violations.sort(key=lambda v: (v.at, v.kind))
    return Verdict(violations, checked, exempt)


def undelivered(journal: Journal) -> list[tuple[SentSignal, str]]:
    """Acked markers not yet received by a target that is not exempt: (marker, target)."""
    index = _Index(journal)
    return [
        (marker, target)
        for marker in journal.signals
        if marker.marker and marker.acked_at is not None
        for target in marker.targets
        if not index.got[(target, marker.key)] and not index.exempt(marker, target)
    ]


def _misdelivered(index: _Index) -> Iterable[Violation]:
    for reception in index.journal.receptions:
        signal = index.signals.get(reception.key)
        if signal is not None and reception.target in signal.targets:
            continue
        why = "nobody sent it" if signal is None else f"targets were {list(signal.targets)}"
        yield Violation(
            Kind.MISDELIVERED,
            reception.at,
            f"{reception.target} got {reception.sender}/{reception.room}#{reception.seq}: {why}",
            index.history(signal, reception.target, reception.key),
        )


def _duplicates_and_order(index: _Index) -> Iterable[Violation]:
    for (target, room, sender), stream in index.stream.items():
        seen: set[int] = set()
        highest = 0
        for reception in stream:
            signal = index.signals.get(reception.key)
            acked = signal is not None and signal.acked_at is not None
            state = "acked" if acked else "not acked"
            if reception.seq in seen:
                yield Violation(
                    Kind.DUPLICATE,
                    reception.at,
                    f"{target} got {sender}/{room}#{reception.seq} ({state}) again",
                    index.history(signal, target, reception.key),
                )
                continue
            seen.add(reception.seq)
            if reception.seq < highest:
                yield Violation(
                    Kind.OUT_OF_ORDER,
                    reception.at,
                    f"{target} got {sender}/{room}#{reception.seq} ({state}) after #{highest}",
                    index.history(signal, target, reception.key),
                )
            highest = max(highest, reception.seq)


def _losses(index: _Index) -> tuple[int, int, list[Violation]]:
    checked = exempt = 0
    violations: list[Violation] = []
    for signal in index.journal.signals:
        if signal.acked_at is None:
            continue
        for target in signal.targets:
            if index.got[(target, signal.key)]:
                checked += 1
                continue
            if index.exempt(signal, target):
                exempt += 1
                continue
            checked += 1
            acked_at = signal.acked_at
            told_true = [  # after the ack: the event existed when recovery was reported
                r
                for r in index.recoveries[(target, signal.room)]
                if r.recovered and r.at > acked_at and index.owed_replay(signal, target, r)
            ]
            if told_true:
                kind = Kind.MISSED_AFTER_RECOVERED_TRUE
                why = f"; recovered: true at t={told_true[0].at - index.journal.t0:.3f}"
            else:
                kind, why = Kind.LOST, ""
            violations.append(
                Violation(
                    kind,
                    signal.acked_at,
                    f"{target} never got acked {signal.sender}/{signal.room}#{signal.seq}{why}",
                    index.history(signal, target, signal.key),
                )
            )
    return checked, exempt, violations


def _memberships_lost(index: _Index) -> Iterable[Violation]:
    for recovery in index.journal.recoveries:
        if recovery.member or recovery.recovered:
            continue
        yield Violation(
            Kind.MEMBERSHIP_LOST,
            recovery.at,
            f"{recovery.client} was told it is no member of {recovery.room} any more "
            f"(recovered: false without a position, conn {recovery.conn}), and no region "
            "was killed",
            [
                f"fault {f.describe(index.journal.t0)}"
                for f in index.journal.faults
                if recovery.at - 10 <= f.at <= recovery.at
            ],
        )


def _member_refusals(index: _Index) -> Iterable[Violation]:
    for signal in index.journal.signals:
        if signal.refused == "not_in_room":
            if index.out_of_room(signal.sender, signal.room, signal.sent_at):
                continue  # it was told its membership was gone (and joined again after)
            what = f"{signal.sender} is a member of {signal.room}"
        elif signal.refused == "unknown_peer" and signal.to not in index.refused_from:
            if signal.to is not None and index.out_of_room(signal.to, signal.room, signal.sent_at):
                continue
            what = f"{signal.to} is a member of {signal.room}"
        else:
            continue
        yield Violation(
            Kind.MEMBER_REFUSED,
            signal.sent_at,
            f"{signal.sender}/{signal.room}#{signal.seq} refused ({signal.refused}); {what}",
            index.history(signal, signal.to or signal.sender, signal.key)[:1]
            + [
                f"fault {f.describe(index.journal.t0)}"
                for f in index.journal.faults
                if signal.sent_at - 10 <= f.at <= signal.sent_at + 1
            ],
        )


def _departures(index: _Index) -> Iterable[Violation]:
    t0 = index.journal.t0
    for departure in index.journal.departures:
        if departure.peer in index.refused_from:
            continue  # its session was lost: leaving is what happens next
        connections = [c.describe(t0) for c in index.connections[departure.peer]]
        yield Violation(
            Kind.PEER_LEFT,
            departure.at,
            f"{departure.client} was told {departure.peer} left {departure.room} "
            f"({departure.reason})",
            [f"{departure.peer}'s connections:", *(f"  {c}" for c in connections)],
        )


def _connections(index: _Index, resume_window: float) -> Iterable[Violation]:
    t0 = index.journal.t0
    for client, connections in index.connections.items():
        for older, newer in itertools.pairwise(connections):
            if newer.resumed is False and older.ended_at is not None:
                gap = (newer.welcome_at or newer.opened_at) - older.ended_at
                if gap < resume_window:
                    yield Violation(
                        Kind.RESUME_REFUSED,
                        newer.welcome_at or newer.opened_at,
                        f"{client}: resume after {gap:.2f} s got resumed: false",
                        [older.describe(t0), newer.describe(t0)],
                    )
            if newer.welcome_at is None or not newer.resumed:
                continue
            late = [(at, kind) for at, kind in older.after_abandon if at > newer.welcome_at]
            if [f for f in late if f[0] > newer.welcome_at + STALE_GRACE]:
                shown = ", ".join(f"{kind} t={at - t0:.3f}" for at, kind in late[:8])
                yield Violation(
                    Kind.TWO_LIVE_CONNECTIONS,
                    late[0][0],
                    f"{client}: {len(late)} frames on conn {older.number} after conn "
                    f"{newer.number} was welcomed",
                    [older.describe(t0), newer.describe(t0), f"late frames: {shown}"],
                )
            closed = older.closed_at if older.closed_at is not None else float("inf")
            if closed > newer.welcome_at + REPLACE_BOUND:
                yield Violation(
                    Kind.TWO_LIVE_CONNECTIONS,
                    newer.welcome_at + REPLACE_BOUND,
                    f"{client}: conn {older.number} still open {REPLACE_BOUND:.0f} s after conn "
                    f"{newer.number} resumed the session (no 4409)",
                    [older.describe(t0), newer.describe(t0)],
                )
