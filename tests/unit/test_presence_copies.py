"""Confirmed lease copies: an owner lets out what a change caused only once the runner-up
acknowledged the change's copy (``presence.table``, "Replication and handoff")."""

from __future__ import annotations

import pytest

import presence.table
from presence.table import COPY_RESEND_AFTER, Outbound, PresenceTable
from signalpost.placement import owner, ranking
from signalpost.wire import (
    ClaimCmd,
    ClaimReply,
    Deliver,
    Envelope,
    LeaseCopy,
    ReplicaAck,
    SessionDown,
    SessionUp,
    WatchCmd,
)

NODES = ["p0", "p1"]
WINDOW = 30.0


def _user_owned_by(node: str, nodes: list[str]) -> str:
    return next(f"u{i}" for i in range(500) if owner(f"u{i}", nodes) == node)


def _table(node: str, nodes: list[str]) -> PresenceTable:
    placing = nodes

    def replica_of(user: str) -> str | None:
        ranked = ranking(user, placing)
        return ranked[1] if len(ranked) > 1 else None

    return PresenceTable(
        resume_window=WINDOW,
        node_id=node,
        owner_of=lambda user: owner(user, placing),
        replica_of=replica_of,
    )


def _of(out: list[Outbound], kind: type) -> list[tuple[str, Envelope]]:
    return [(t, e) for t, e in out if isinstance(e, kind)]


def _suspended_session() -> tuple[PresenceTable, PresenceTable, str]:
    """p0 owns a user with a suspended session; p1 holds its copies (all acknowledged)."""
    p0, p1 = _table("p0", NODES), _table("p1", NODES)
    user = _user_owned_by("p0", NODES)
    for command in (SessionUp("s", user, "e0", "c1.1"), SessionDown("s", "e0", "c1.1", False)):
        for target, copy in _of(p0.handle(command, 0.0), LeaseCopy):
            assert target == "p1"
            ((_, ack),) = p1.handle(copy, 0.0)
            p0.handle(ack, 0.0)
    return p0, p1, user


def test_a_claim_is_answered_once_the_runner_up_acknowledged_its_copy() -> None:
    p0, p1, user = _suspended_session()
    out = p0.handle(ClaimCmd("s", user, "e1", "c2.2"), 1.0)
    assert _of(out, ClaimReply) == []  # held
    ((target, copy),) = _of(out, LeaseCopy)
    assert target == "p1" and isinstance(copy, LeaseCopy) and copy.conn == "c2.2"
    ((_, ack),) = p1.handle(copy, 1.0)
    assert ack == ReplicaAck("s", copy.seq, replica="p1")
    # The same ack from a node the copy was not sent to (a runner-up replaced since)
    # lets nothing out.
    assert p0.handle(ReplicaAck("s", copy.seq, replica="p2"), 1.0) == []
    assert p0.counters.late_acks == 1
    released = p0.handle(ack, 1.0)
    ((edge, reply),) = _of(released, ClaimReply)
    assert edge == "e1" and isinstance(reply, ClaimReply) and reply.live
    # (with it, the suspended connection's edge is told to close it, should it be open)
    assert [type(e).__name__ for _, e in released] == ["Evict", "ClaimReply"]


def test_an_unacknowledged_copy_is_sent_again_and_the_runner_up_acks_it_once() -> None:
    p0, p1, user = _suspended_session()
    ((_, copy),) = _of(p0.handle(ClaimCmd("s", user, "e1", "c2.2"), 1.0), LeaseCopy)
    assert _of(p0.expire(1.0 + COPY_RESEND_AFTER / 2), LeaseCopy) == []
    ((_, again),) = _of(p0.expire(1.0 + COPY_RESEND_AFTER), LeaseCopy)
    assert again == copy  # the same copy: the runner-up skips what it has
    p1.handle(again, 2.0)
    ((_, ack),) = p1.handle(copy, 2.0)  # (a duplicate: acked, ignored)
    assert isinstance(ack, ReplicaAck)
    assert _of(p0.handle(ack, 2.0), ClaimReply) != []


def test_a_runner_up_keeps_the_newest_copy_and_refuses_a_deposed_owner() -> None:
    p1 = _table("p1", NODES)
    user = _user_owned_by("p0", NODES)
    newer = LeaseCopy("p0", "s", user, "e0", "c2.2", seq=5, term=3)
    older = LeaseCopy("p0", "s", user, "e0", "c1.1", seq=4, term=3)
    p1.handle(newer, 0.0)
    assert p1.handle(older, 0.0) == [("p0", ReplicaAck("s", 4, replica="p1"))]
    assert p1._copies["s"][0] == newer
    deposed = LeaseCopy("p9", "s", user, "e0", "c3.3", seq=99, term=2)
    assert p1.handle(deposed, 0.0) == [("p9", ReplicaAck("s", 99, True, 3, "p1"))]
    assert p1._copies["s"][0] == newer


def test_a_refused_copy_lets_nothing_out() -> None:
    p0, _, user = _suspended_session()
    ((_, copy),) = _of(p0.handle(ClaimCmd("s", user, "e1", "c2.2"), 1.0), LeaseCopy)
    assert isinstance(copy, LeaseCopy)
    assert p0.handle(ReplicaAck("s", copy.seq, True, 9), 1.0) == []
    assert p0.counters.copies_refused == 1


def test_status_notes_wait_for_the_copy_too() -> None:
    p0, p1 = _table("p0", NODES), _table("p1", NODES)
    watcher, bob = [u for u in (f"u{i}" for i in range(500)) if owner(u, NODES) == "p0"][:2]
    for command in (
        SessionUp("w", watcher, "e0", "c1.1"),
        WatchCmd("w", "c1.1", "e0", 1, 1, [bob]),
    ):
        for _, copy in _of(p0.handle(command, 0.0), LeaseCopy):
            ((_, ack),) = p1.handle(copy, 0.0)
            p0.handle(ack, 0.0)
    out = p0.handle(SessionUp("b", bob, "e1", "c2.1"), 0.0)
    assert _of(out, Deliver) == []
    ((_, copy),) = _of(out, LeaseCopy)
    ((_, ack),) = p1.handle(copy, 0.0)
    ((edge, deliver),) = _of(p0.handle(ack, 0.0), Deliver)
    assert edge == "e0" and isinstance(deliver, Deliver) and deliver.sessions == ["w"]


def test_without_a_runner_up_any_more_what_waits_goes_out() -> None:
    placing = list(NODES)
    p0 = PresenceTable(
        resume_window=WINDOW,
        node_id="p0",
        owner_of=lambda user: owner(user, placing),
        replica_of=lambda user: r[1] if len(r := ranking(user, placing)) > 1 else None,
    )
    user = _user_owned_by("p0", NODES)
    p0.handle(SessionUp("s", user, "e0", "c1.1"), 0.0)
    out = p0.handle(WatchCmd("s", "c1.1", "e0", 1, 1, [user]), 0.0)
    assert [t for t, _ in out] == ["p1"]  # its copy; the reply waits for the ack
    placing.remove("p1")  # the runner-up died: a view of p0 alone
    released = p0.view_changed(1.0)
    assert any(t == "e0" for t, _ in released)  # the watch reply
    assert p0._copying == {} and p0._changes == {}


def test_at_the_bound_the_oldest_change_goes_out_unacknowledged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(presence.table, "MAX_HELD_CHANGES", 2)
    p0 = _table("p0", NODES)
    users = [u for u in (f"u{i}" for i in range(500)) if owner(u, NODES) == "p0"][:3]
    watcher = users[0]
    p0.handle(SessionUp("w", watcher, "e0", "c0.1"), 0.0)
    replies = []
    for seq, user in enumerate(users, start=1):
        out = p0.handle(WatchCmd("w", "c0.1", "e0", seq, seq, [user]), 0.0)
        replies += [e for t, e in out if t == "e0"]
    assert len(replies) == 1  # the first watch's reply: let out to make room
    assert p0.counters.copies_unconfirmed == 1
    assert len(p0._changes) == 2


def test_a_fresh_claim_makes_the_lease_and_is_granted_once_the_runner_up_has_it() -> None:
    p0, p1 = _table("p0", NODES), _table("p1", NODES)
    user = _user_owned_by("p0", NODES)
    claim = ClaimCmd("s", user, "e0", "c1.1", fresh=True)
    out = p0.handle(claim, 0.0)
    assert _of(out, ClaimReply) == []  # held for the copy
    assert p0.status(user) == "online" and p0.leases["s"].conn == "c1.1"
    ((target, copy),) = _of(out, LeaseCopy)
    assert target == "p1" and isinstance(copy, LeaseCopy) and copy.conn == "c1.1"
    # The edge claims again (0.5 s later) before the ack: nothing new is copied, and the
    # answer to it waits for the same copy.
    again = p0.handle(claim, 0.5)
    assert _of(again, LeaseCopy) == [] and _of(again, ClaimReply) == []
    ((_, ack),) = p1.handle(copy, 0.5)
    replies = _of(p0.handle(ack, 0.5), ClaimReply)
    assert replies == [("e0", ClaimReply("s", "c1.1", True))] * 2
    assert p1.handle(copy, 0.6) == [("p0", ReplicaAck("s", copy.seq, replica="p1"))]  # kept
    # The session is known to the runner-up: the same claim is granted there at once
    # once it owns the user (its owner died).
    lone = _table("p1", ["p1"])
    lone.handle(copy, 1.0)
    assert lone.leases["s"].conn == "c1.1"


def test_a_fresh_claim_of_a_session_held_by_another_connection_is_refused() -> None:
    p0 = PresenceTable(resume_window=WINDOW)
    p0.handle(SessionUp("s", "u", "e0", "c1.1"), 0.0)
    out = p0.handle(ClaimCmd("s", "u", "e1", "c2.1", fresh=True), 1.0)
    assert out == [("e1", ClaimReply("s", "c2.1", False))]
    assert p0.leases["s"].conn == "c1.1"  # not moved, not evicted
    # A resume claim of an unknown session (what a presence node before fresh claims
    # makes of a fresh one) is refused too: the edge then announces it (SessionUp).
    assert p0.handle(ClaimCmd("t", "u", "e1", "c3.1"), 1.0) == [
        ("e1", ClaimReply("t", "c3.1", False))
    ]


def test_a_fresh_claim_sent_again_after_its_lease_was_suspended_reconnects_it() -> None:
    # (The edge lost, say, while the claim was out: the connection that claims is live.)
    p0 = PresenceTable(resume_window=WINDOW)
    p0.handle(ClaimCmd("s", "u", "e0", "c1.1", fresh=True), 0.0)
    p0.edge_lost("e0", 1.0)
    assert p0.leases["s"].suspended_until is not None
    out = p0.handle(ClaimCmd("s", "u", "e0", "c1.1", fresh=True), 2.0)
    assert out == [("e0", ClaimReply("s", "c1.1", True))]
    assert p0.leases["s"].suspended_until is None and p0.status("u") == "online"
