"""Sharded, replicated presence against one unsharded PresenceTable as the reference model.

Up to three presence tables share users by rendezvous hashing over the live nodes, copy
their leases to each user's runner-up, and hand users over when the view changes. Random
sequences of connections, drops, ends, resume claims, watches, time, and node kills and
restarts go to them and to a single ``PresenceTable`` that never fails. Messages between
nodes arrive at once and in order; a kill takes the node and the view changes in the same
step; the edges then re-sync their connected sessions and watches to the new owners (as
``ZmqBackplane`` does), and a settling grace passes. After every step:

- every user's status at its owner is the reference's;
- the leases the owners hold are the reference's (user, connection, suspended, deadline);
- every claim has the reference's outcome;
- every watcher's watches at its owner are the reference's.

So a kill of any node loses no lease, no resume window, no watch.

A further step kills an owner between applying a resume claim and its runner-up's
acknowledgement of the copy (``claim-kill``): the copy reaches the runner-up or not, the
ack never comes back, the claiming connection drops at once (its goodbye is lost with the
owner, and its edge does not name it in the re-sync). An answered claim is never lost: if
the dead owner answered it, the new owner holds the claiming connection's lease (and the
window its lost goodbye starts when the new owner settles); if it did not, the edge
claims again at the new owner and gets the reference's answer.

``fresh-kill`` does the same to a new session's claim of its lease (``ClaimCmd.fresh``):
the owner makes the lease and dies before the runner-up acknowledged its copy; the edge
welcomed the session if the grant came out, else claims again at the new owner; the
connection drops right after the welcome. The session is known after the failover (its
window runs at the new owner and a later resume is granted). Before fresh claims an edge
welcomed a new session at once and announced it (``SessionUp``): the model fails on that
(``announce_fresh``).

Runs: a fixed set of examples by default; ``PRESENCE_MODEL_EXAMPLES=N`` runs N examples
with fresh randomness.
"""

from __future__ import annotations

import itertools
import os
from collections import deque

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from presence.table import SYNC_GRACE, Outbound, PresenceTable
from signalpost.placement import owner, ranking
from signalpost.wire import (
    ClaimCmd,
    ClaimReply,
    EdgeSync,
    Envelope,
    Evict,
    Evicted,
    LeaseCopy,
    SessionDown,
    SessionUp,
    WatchCmd,
)

WINDOW = 30.0
NODES = ["p0", "p1", "p2"]
SESSIONS = [f"s{i}" for i in range(6)]
USERS = ["u0", "u1", "u2", "u3"]
EDGES = ["e0", "e1"]
EXAMPLES = int(os.environ.get("PRESENCE_MODEL_EXAMPLES", "0"))


def user_of(session: str) -> str:
    return USERS[int(session[1:]) % len(USERS)]


class Cluster:
    """Presence tables wired in memory, with the view every node and edge reads."""

    def __init__(self) -> None:
        self.alive: list[str] = list(NODES)
        self.tables: dict[str, PresenceTable] = {}
        for node in NODES:
            self._start(node)
        self.now = 0.0
        self.claims: dict[str, bool] = {}  # conn -> claim outcome, as the edges got them

    def _start(self, node: str) -> None:
        self.tables[node] = PresenceTable(
            resume_window=WINDOW,
            node_id=node,
            owner_of=lambda user: owner(user, self.alive) if self.alive else None,
            replica_of=lambda user: r[1] if len(r := ranking(user, self.alive)) > 1 else None,
        )

    def owner(self, user: str) -> PresenceTable:
        return self.tables[owner(user, self.alive)]

    def run(self, out: list[Outbound]) -> None:
        queue = deque(out)
        for _ in range(100_000):  # bounded: a loop between nodes would be a bug
            if not queue:
                return
            dest, envelope = queue.popleft()
            if dest in self.tables:
                queue.extend(self.tables[dest].handle(envelope, self.now))
            elif dest in NODES:
                pass  # a dead node: lost
            elif isinstance(envelope, Evict):  # the edge closes it and confirms at once
                evicted = Evicted(envelope.session, envelope.conn, dest)
                queue.extend(self.owner(envelope.user).handle(evicted, self.now))
            elif isinstance(envelope, ClaimReply):
                self.claims[envelope.conn] = envelope.live
        raise AssertionError("messages between nodes never settle")

    def send(self, user: str, command: Envelope) -> None:
        self.run(self.owner(user).handle(command, self.now))

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for table in list(self.tables.values()):
            self.run(table.expire(self.now))

    def change_view(self, reference: PresenceTable, unknown: str = "") -> None:
        """Every node reads the new view; the edges re-sync what they hold (all the
        reference's connected sessions but ``unknown``, which no edge holds)."""
        for table in list(self.tables.values()):
            self.run(table.view_changed(self.now))
        # The edges re-sync their connected sessions, and those sessions' watches.
        for edge in EDGES:
            parts: dict[str, list[SessionUp]] = {}
            for session, lease in reference.leases.items():
                if session == unknown:
                    continue
                if lease.edge == edge and lease.suspended_until is None:
                    up = SessionUp(session, lease.user, edge, lease.conn)
                    parts.setdefault(owner(lease.user, self.alive), []).append(up)
            for node, ups in parts.items():
                watches = {
                    up.session: sorted(reference.watched_by(up.session))
                    for up in ups
                    if reference.watched_by(up.session)
                }
                self.run(self.tables[node].handle(EdgeSync(edge, ups, watches), self.now))

    def kill(self, node: str) -> None:
        del self.tables[node]
        self.alive.remove(node)

    def restart(self, node: str) -> None:
        self.alive = sorted([*self.alive, node])
        self._start(node)


Step = tuple[object, ...]

_session = st.sampled_from(SESSIONS)
_step = st.one_of(
    st.tuples(st.just("up"), _session, st.sampled_from(EDGES)),
    st.tuples(st.just("down"), _session, st.booleans()),
    st.tuples(st.just("claim"), _session, st.sampled_from(EDGES)),
    st.tuples(st.just("watch"), _session, st.sets(st.sampled_from(USERS), min_size=1)),
    st.tuples(st.just("tick"), st.sampled_from([0.5, 5.0, 20.0, 31.0])),
    st.tuples(st.just("kill"), st.sampled_from(NODES)),
    st.tuples(st.just("restart"), st.sampled_from(NODES)),
    st.tuples(st.just("claim-kill"), _session, st.sampled_from(EDGES), st.booleans()),
    st.tuples(st.just("fresh"), _session, st.sampled_from(EDGES)),
    st.tuples(st.just("fresh-kill"), _session, st.sampled_from(EDGES), st.booleans()),
)


def claim_then_kill(
    cluster: Cluster,
    reference: PresenceTable,
    claim: ClaimCmd,
    copy_arrives: bool,
    where: str,
) -> None:
    """The owner applies ``claim`` and dies before the runner-up's ack reaches it."""
    doomed = owner(claim.user, cluster.alive)
    table = cluster.tables[doomed]
    expected = {
        e.conn: e.live for _, e in reference.handle(claim, cluster.now) if isinstance(e, ClaimReply)
    }
    cluster.claims.clear()
    for dest, envelope in table.handle(claim, cluster.now):
        if isinstance(envelope, ClaimReply):
            cluster.claims[envelope.conn] = envelope.live  # answered before the kill
        elif isinstance(envelope, LeaseCopy) and copy_arrives and dest in cluster.tables:
            cluster.tables[dest].handle(envelope, cluster.now)  # (its ack is lost)
    answered = claim.conn in cluster.claims
    cluster.kill(doomed)
    cluster.change_view(reference, unknown=claim.session)
    if not answered:  # the edge claims again, at the owner of the view it reads now
        cluster.send(claim.user, claim)
    assert cluster.claims == expected, where
    cluster.tick(SYNC_GRACE)
    reference.expire(cluster.now)
    if expected.get(claim.conn):
        # The claiming connection dropped right after its welcome: its goodbye went to
        # the dead owner (lost), or to the new one that answered it.
        down = SessionDown(claim.session, claim.edge, claim.conn, False)
        reference.handle(down, cluster.now)
        if not answered:
            cluster.send(claim.user, down)


def announce_then_kill(
    cluster: Cluster, reference: PresenceTable, up: SessionUp, copy_arrives: bool
) -> None:
    """Before fresh claims: a new session welcomed at once and announced (``SessionUp``);
    the owner dies before the runner-up's ack, and the connection drops at once."""
    doomed = owner(up.user, cluster.alive)
    reference.handle(up, cluster.now)
    for dest, envelope in cluster.tables[doomed].handle(up, cluster.now):
        if isinstance(envelope, LeaseCopy) and copy_arrives and dest in cluster.tables:
            cluster.tables[dest].handle(envelope, cluster.now)  # (its ack is lost)
    cluster.kill(doomed)
    cluster.change_view(reference, unknown=up.session)
    cluster.tick(SYNC_GRACE)
    reference.expire(cluster.now)
    reference.handle(SessionDown(up.session, up.edge, up.conn, False), cluster.now)


def play(
    steps: list[Step], *, broken_replication: bool = False, announce_fresh: bool = False
) -> None:
    reference = PresenceTable(resume_window=WINDOW)
    cluster = Cluster()
    if broken_replication:
        for table in cluster.tables.values():
            table._replica_of = None
    generations = itertools.count(1)
    conns: dict[str, str] = {}  # session -> the connection that last held it
    edges: dict[str, str] = {}
    for number, step in enumerate(steps):
        kind = step[0]
        where = f"step {number} {step} at {cluster.now}"
        if kind == "tick":
            assert isinstance(step[1], float)
            cluster.tick(step[1])
            reference.expire(cluster.now)
        elif kind == "kill":
            node = str(step[1])
            if node not in cluster.alive or len(cluster.alive) == 1:
                continue
            cluster.kill(node)
            cluster.change_view(reference)
            cluster.tick(SYNC_GRACE)
            reference.expire(cluster.now)
        elif kind == "restart":
            node = str(step[1])
            if node in cluster.alive:
                continue
            cluster.restart(node)
            cluster.change_view(reference)
            cluster.tick(SYNC_GRACE)
            reference.expire(cluster.now)
        elif kind == "claim-kill":
            session = str(step[1])
            if len(cluster.alive) == 1:
                continue
            lease = reference.leases.get(session)
            if lease is not None and lease.suspended_until is None:
                # Its connection drops first (a live one's eviction is the plain claim's).
                down = SessionDown(session, lease.edge, lease.conn, False)
                reference.handle(down, cluster.now)
                cluster.send(lease.user, down)
            edges[session] = str(step[2])
            conns[session] = f"c{next(generations)}.{next(generations)}"
            claim = ClaimCmd(session, user_of(session), edges[session], conns[session])
            claim_then_kill(cluster, reference, claim, bool(step[3]), where)
        elif kind == "fresh-kill":
            session = str(step[1])
            if len(cluster.alive) == 1 or session in reference.leases:
                continue  # (a fresh session's id is new)
            edges[session] = str(step[2])
            conns[session] = f"c{next(generations)}.1"
            if announce_fresh:
                up = SessionUp(session, user_of(session), edges[session], conns[session])
                announce_then_kill(cluster, reference, up, bool(step[3]))
            else:
                claim = ClaimCmd(session, user_of(session), edges[session], conns[session], True)
                claim_then_kill(cluster, reference, claim, bool(step[3]), where)
                assert cluster.claims == {claim.conn: True}, where  # a new id: granted
        else:
            session = str(step[1])
            user = user_of(session)
            had_lease = session in reference.leases
            command: Envelope
            if kind == "up":
                edges[session] = str(step[2])
                conns[session] = f"c{next(generations)}.{next(generations)}"
                command = SessionUp(session, user, edges[session], conns[session])
            elif kind == "down":
                if session not in conns:
                    continue
                command = SessionDown(session, edges[session], conns[session], bool(step[2]))
            elif kind == "claim":
                edges[session] = str(step[2])
                conns[session] = f"c{next(generations)}.{next(generations)}"
                command = ClaimCmd(session, user, edges[session], conns[session])
            elif kind == "fresh":
                edges[session] = str(step[2])
                conns[session] = f"c{next(generations)}.1"
                command = ClaimCmd(session, user, edges[session], conns[session], True)
            else:
                assert isinstance(step[2], frozenset | set)
                lease = reference.leases.get(session)
                if lease is None or lease.suspended_until is not None:
                    continue  # only a connected session watches
                users = sorted(step[2])
                command = WatchCmd(session, conns[session], edges[session], number, None, users)
            expected: dict[str, bool] = {}
            for dest, envelope in reference.handle(command, cluster.now):
                if isinstance(envelope, Evict):
                    ack = Evicted(envelope.session, envelope.conn, dest)
                    for _, answer in reference.handle(ack, cluster.now):
                        if isinstance(answer, ClaimReply):
                            expected[answer.conn] = answer.live
                elif isinstance(envelope, ClaimReply):
                    expected[envelope.conn] = envelope.live
            cluster.claims.clear()
            cluster.send(user, command)
            assert cluster.claims == expected, where
            if kind == "fresh" and not had_lease:
                assert expected == {conns[session]: True}, where  # a new id: granted
        for user in USERS:
            assert cluster.owner(user).status(user) == reference.status(user), (where, user)
        held = {
            s: (lease.user, lease.conn, lease.suspended_until)
            for table in cluster.tables.values()
            for s, lease in table.leases.items()
            if table.owns(lease.user)
        }
        want = {
            s: (lease.user, lease.conn, lease.suspended_until)
            for s, lease in reference.leases.items()
        }
        assert held == want, where
        for session in reference.leases:
            watcher_owner = cluster.owner(user_of(session))
            assert watcher_owner.watched_by(session) == reference.watched_by(session), where


def _settings() -> settings:
    return settings(
        max_examples=EXAMPLES or 300,
        derandomize=not EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )


@_settings()
@given(steps=st.lists(_step, min_size=10, max_size=80))
def test_sharded_replicated_presence_agrees_with_one_table_through_kills(
    steps: list[Step],
) -> None:
    play(steps)


def test_the_model_check_catches_a_node_that_copies_nothing() -> None:
    """Not vacuous: without replication, a kill loses the dead node's leases."""
    steps: list[Step] = [("up", s, "e0") for s in SESSIONS]
    steps += [("down", "s0", False), ("kill", "p0"), ("kill", "p1")]
    play(steps)
    with pytest.raises(AssertionError):
        play(steps, broken_replication=True)


def test_an_answered_claim_survives_its_owner_dying_before_the_copy_is_acknowledged() -> None:
    """A session away for most of its window resumes, and its owner dies before the
    runner-up acknowledged the claim's copy (which never arrived): answered or not, the
    claim is not lost (unacknowledged copies: the new owner kept the old window, which
    runs out under the resumed session)."""
    for session in SESSIONS[:4]:
        steps: list[Step] = [
            ("up", session, "e0"),
            ("down", session, False),
            ("tick", 20.0),
            ("claim-kill", session, "e1", False),
            ("tick", 20.0),
        ]
        play(steps)


def test_a_fresh_session_survives_its_owner_dying_before_the_copy_is_acknowledged() -> None:
    """A new session's claim of its lease, its owner dying before the runner-up acknowledged
    the copy (which never arrived), the connection dropping right after the welcome: the
    session is known after the failover and a resume later is granted. Welcomed at once
    and announced (``SessionUp``, before fresh claims), it is unknown to the new owner."""
    for session in SESSIONS[:4]:
        steps: list[Step] = [
            ("fresh-kill", session, "e1", False),
            ("tick", 5.0),
            ("claim", session, "e0"),
            ("tick", 31.0),
        ]
        play(steps)
        with pytest.raises(AssertionError):
            play(steps, announce_fresh=True)
