"""PresenceTable against a reference model that scans every lease.

The table keeps resume deadlines in a heap with lazy deletion and its connected sessions
indexed by edge; the model keeps a plain dict of leases and scans it for everything. Random
sequences of ``SessionUp``, ``SessionDown`` (ended or not), claims and edge re-announcements
(by connections older, as old as and newer than the lease's), watches, lost edges, expiry
ticks and advancing time go to both; after every step they must agree on each user's
status, the leases, and what was sent (evictions, presence frames, claim outcomes), and the
table's own bookkeeping must be bounded and consistent.

Runs: a fixed set of examples by default; ``PRESENCE_MODEL_EXAMPLES=N`` runs N examples
with fresh randomness.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from presence.table import Outbound, PresenceTable
from signalpost.wire import (
    ClaimCmd,
    ClaimReply,
    Deliver,
    EdgeSync,
    Envelope,
    Evict,
    Evicted,
    Reply,
    SessionDown,
    SessionUp,
    WatchCmd,
)

WINDOW = 30.0
SESSIONS = [f"s{i}" for i in range(5)]
USERS = ["u0", "u1", "u2"]
EDGES = ["e0", "e1", "e2"]
#: Connections of a session: several of one generation, older and newer ones.
CONNS = ["a.1", "b.1", "c.2", "d.3", "e.3", "f"]
EXAMPLES = int(os.environ.get("PRESENCE_MODEL_EXAMPLES", "0"))

Sent = tuple[str, ...]


def user_of(session: str) -> str:
    """Each session belongs to one user; u0 and u1 have two sessions each."""
    return USERS[int(session[1:]) % len(USERS)]


# ------------------------------------------------------------------------------ the model


@dataclass
class ModelLease:
    user: str
    edge: str
    conn: str
    suspended_until: float | None = None


@dataclass
class Model:
    """What the table promises, written the obvious way: scan everything."""

    leases: dict[str, ModelLease] = field(default_factory=dict)
    watches: dict[str, set[str]] = field(default_factory=dict)  # watcher session -> users

    def status(self, user: str) -> str:
        online = any(lease.user == user for lease in self.leases.values())
        return "online" if online else "offline"

    def _notify(self, user: str, was: str, sent: list[Sent]) -> None:
        status = self.status(user)
        if status == was:
            return
        for watcher, users in self.watches.items():
            lease = self.leases.get(watcher)
            if user in users and lease is not None and lease.suspended_until is None:
                sent.append(("presence", lease.edge, watcher, user, status))

    def may_take(self, conn: str, holder: str) -> bool:
        """A lease goes to the same connection or one of no older generation."""

        def generation(c: str) -> int:
            tail = c.rpartition(".")[2]
            return int(tail) if "." in c and tail.isdigit() else 0

        return conn == holder or generation(conn) >= generation(holder)

    def session_up(self, session: str, user: str, edge: str, conn: str, sent: list[Sent]) -> None:
        lease = self.leases.get(session)
        if lease is not None:
            if not self.may_take(conn, lease.conn):
                return
            if lease.conn != conn:  # (a suspended one too: its edge may still hold it)
                sent.append(("evict", lease.edge, session, lease.conn))
        was = self.status(user)
        self.leases[session] = ModelLease(user, edge, conn)
        self._notify(user, was, sent)

    def session_down(
        self, session: str, edge: str, conn: str, ended: bool, now: float, sent: list[Sent]
    ) -> None:
        lease = self.leases.get(session)
        if lease is None or lease.conn != conn or lease.edge != edge:
            return  # stale, or from an edge that does not hold the session: refused
        if ended:
            self._end(session, sent)
        else:
            lease.suspended_until = now + WINDOW

    def claim(
        self, session: str, user: str, edge: str, conn: str, now: float, sent: list[Sent]
    ) -> None:
        lease = self.leases.get(session)
        if lease is not None and lease.suspended_until is not None and lease.suspended_until <= now:
            self._end(session, sent)
            lease = None
        if lease is None or lease.user != user or not self.may_take(conn, lease.conn):
            sent.append(("claim", edge, session, conn, "refused"))
            return
        self.session_up(session, user, edge, conn, sent)
        sent.append(("claim", edge, session, conn, "live"))

    def edge_sync(self, session: str, user: str, edge: str, conn: str, sent: list[Sent]) -> None:
        lease = self.leases.get(session)
        if lease is None or lease.conn != conn or lease.suspended_until is not None:
            self.session_up(session, user, edge, conn, sent)

    def edge_lost(self, edge: str, now: float) -> None:
        for lease in self.leases.values():
            if lease.edge == edge and lease.suspended_until is None:
                lease.suspended_until = now + WINDOW

    def expire(self, now: float, sent: list[Sent]) -> None:
        for session, lease in list(self.leases.items()):
            if lease.suspended_until is not None and lease.suspended_until <= now:
                self._end(session, sent)

    def _end(self, session: str, sent: list[Sent]) -> None:
        lease = self.leases.pop(session)
        self._notify(lease.user, "online", sent)
        self.watches.pop(session, None)


# ------------------------------------------------------------------------------ comparing


def what_was_sent(out: list[Outbound]) -> list[Sent]:
    """The table's output in the model's terms (watch replies are not modelled)."""
    sent: list[Sent] = []
    for edge, envelope in out:
        if isinstance(envelope, Deliver):
            frame = json.loads(envelope.payload)
            assert frame["type"] == "presence"
            sent += [
                ("presence", edge, watcher, frame["user"], frame["status"])
                for watcher in envelope.sessions
            ]
        elif isinstance(envelope, Evict):
            sent.append(("evict", edge, envelope.session, envelope.conn))
        elif isinstance(envelope, ClaimReply):
            outcome = "live" if envelope.live else "refused"
            sent.append(("claim", edge, envelope.session, envelope.conn, outcome))
        else:
            assert isinstance(envelope, Reply), envelope
    return sent


def check_bookkeeping(table: PresenceTable) -> None:
    """The heap holds every suspension once, and at most as many stale entries as live
    ones; the edge index is exactly the connected sessions; no empty set is kept."""
    suspended = {s: lease for s, lease in table.leases.items() if lease.suspended_until is not None}
    live = [
        entry
        for entry in table._deadlines
        if (lease := table.leases.get(entry[1])) is not None and lease.deadline_token == entry[2]
    ]
    assert sorted(s for _, s, _ in live) == sorted(suspended)
    for deadline, session, _ in live:
        assert suspended[session].suspended_until == deadline
    assert table._stale == len(table._deadlines) - len(live)
    assert 2 * table._stale <= len(table._deadlines)
    heap = table._deadlines
    assert all(heap[(i - 1) // 2] <= heap[i] for i in range(1, len(heap)))
    connected: dict[str, set[str]] = {}
    for session, lease in table.leases.items():
        if lease.suspended_until is None:
            connected.setdefault(lease.edge, set()).add(session)
    assert table._connected_at == connected
    for index in (table._sessions_of, table._watchers_of, table._watched_by):
        assert all(index.values()), index


# ------------------------------------------------------------------------------ scenarios

_session = st.sampled_from(SESSIONS)
_edge = st.sampled_from(EDGES)
#: None (most often): the connection that holds the lease now, so downs and re-announcements
#: match it.
_conn = st.one_of(st.none(), st.none(), st.sampled_from(CONNS))
_step = st.one_of(
    st.tuples(st.just("up"), _session, _edge, _conn),
    st.tuples(st.just("down"), _session, _edge, _conn, st.booleans()),
    st.tuples(st.just("claim"), _session, _edge, _conn, st.booleans()),
    st.tuples(st.just("sync"), _session, _edge, _conn),
    st.tuples(st.just("watch"), _session, _edge, st.sets(st.sampled_from(USERS), min_size=1)),
    st.tuples(st.just("edge_lost"), _edge),
    st.tuples(st.just("expire")),
    st.tuples(st.just("tick"), st.sampled_from([0.0, 5.0, 10.0, 15.0, 30.0, 45.0])),
)
Step = tuple[object, ...]


def play(steps: list[Step], model: Model | None = None) -> None:
    """Play ``steps`` on a table and ``model``; they must agree after each."""
    table = PresenceTable(resume_window=WINDOW)
    model = model or Model()
    now = 0.0
    for number, step in enumerate(steps):
        kind = step[0]
        sent: list[Sent] = []
        out: list[Outbound] = []
        if kind == "tick":
            assert isinstance(step[1], float)
            now += step[1]
        elif kind == "edge_lost":
            edge = str(step[1])
            out = table.edge_lost(edge, now)
            model.edge_lost(edge, now)
        elif kind == "expire":
            out = table.expire(now)
            model.expire(now, sent)
        elif kind == "watch":
            assert isinstance(step[3], frozenset | set)
            session, edge, users = str(step[1]), str(step[2]), sorted(step[3])
            out = table.handle(WatchCmd(session, "w", edge, number, None, users), now)
            holder = model.leases.get(session)
            if holder is None or holder.edge == edge:  # else refused: another edge's session
                model.watches.setdefault(session, set()).update(users)
        else:
            session, edge = str(step[1]), str(step[2])
            holder = model.leases.get(session)
            conn = step[3] if step[3] is not None else holder.conn if holder else CONNS[0]
            assert isinstance(conn, str)
            user = user_of(session)
            command: Envelope
            if kind == "up":
                command = SessionUp(session, user, edge, conn)
                model.session_up(session, user, edge, conn, sent)
            elif kind == "down":
                ended = bool(step[4])
                command = SessionDown(session, edge, conn, ended)
                model.session_down(session, edge, conn, ended, now, sent)
            elif kind == "claim":
                if step[4]:  # someone else's session
                    user = USERS[(USERS.index(user) + 1) % len(USERS)]
                command = ClaimCmd(session, user, edge, conn)
                model.claim(session, user, edge, conn, now, sent)
            else:
                command = EdgeSync(edge, [SessionUp(session, user, edge, conn)], {})
                model.edge_sync(session, user, edge, conn, sent)
            out = table.handle(command, now)
        # Edges confirm each eviction at once (``Evicted``): a resume is answered then.
        for target, envelope in list(out):
            if isinstance(envelope, Evict):
                out += table.handle(Evicted(envelope.session, envelope.conn, target), now)
        where = f"step {number} {step} at {now}"
        assert Counter(what_was_sent(out)) == Counter(sent), where
        for user in USERS:
            assert table.status(user) == model.status(user), (where, user)
        leases = {
            s: (lease.user, lease.edge, lease.conn, lease.suspended_until)
            for s, lease in table.leases.items()
        }
        expected = {
            s: (lease.user, lease.edge, lease.conn, lease.suspended_until)
            for s, lease in model.leases.items()
        }
        assert leases == expected, where
        for session in SESSIONS:
            assert table.watched_by(session) == model.watches.get(session, set()), where
        check_bookkeeping(table)


def _settings() -> settings:
    return settings(
        max_examples=EXAMPLES or 400,
        derandomize=not EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )


@_settings()
@given(steps=st.lists(_step, min_size=20, max_size=120))
def test_the_table_agrees_with_the_scanning_model(steps: list[Step]) -> None:
    play(steps)


def test_the_model_check_catches_a_wrong_expiry() -> None:
    """The check is not vacuous: a model whose windows are a second longer disagrees."""

    class LateModel(Model):
        def expire(self, now: float, sent: list[Sent]) -> None:
            super().expire(now - 1.0, sent)

    steps: list[Step] = [("up", "s1", "e0", None), ("down", "s1", "e0", None, False)]
    steps += [("tick", 30.0), ("expire",)]
    play(steps)
    with pytest.raises(AssertionError):
        play(steps, LateModel())
