"""History replication between two RoomTables, driven by hand (no sockets)."""

from __future__ import annotations

import itertools
import json
from typing import Any

from broker.rooms import Outbound, RoomTable
from signalpost.wire import (
    AttachCmd,
    Deliver,
    DetachCmd,
    Envelope,
    ForgetCmd,
    Handoff,
    HandoffRequest,
    JoinCmd,
    LeaveCmd,
    ReplicaAck,
    ReplicateCmd,
    ReplicatedEvent,
    Reply,
    RestoreCmd,
    RoomPosition,
    SignalCmd,
    Synced,
    peer_object,
    sender_object,
)

epochs = (f"e{n}" for n in itertools.count())


def broker(node: str, capacity: int = 4, **placement: Any) -> RoomTable:
    """Broker ``node``'s room table (``placement``: how it places rooms, RoomTable's hooks)."""
    return RoomTable(
        capacity=capacity,
        resume_window=30,
        history_max_events=100,
        history_max_age=600,
        new_epoch=lambda: next(epochs),
        node_id=node,
        **placement,
    )


def table(node: str, replica: str | None) -> RoomTable:
    return broker(node, capacity=2, replica_for=lambda room: replica)


def owner_whose_replica_moves(first: str | None) -> tuple[RoomTable, list[str | None]]:
    """Owner "A" whose runner-up is ``replica_name[0]`` (tests change it)."""
    replica_name: list[str | None] = [first]
    owner = RoomTable(
        capacity=2,
        resume_window=30,
        history_max_events=10,
        history_max_age=60,
        new_epoch=lambda: "e",
        node_id="A",
        replica_for=lambda room: replica_name[0],
    )
    return owner, replica_name


def frames(out: list[Outbound], edge: str | None = None) -> list[dict[str, object]]:
    """Client frames written by ``out`` (optionally to one edge), in order."""
    found = []
    for target, envelope in out:
        if edge is not None and target != edge:
            continue
        if isinstance(envelope, Deliver | Reply) and envelope.payload:
            found.append(json.loads(envelope.payload))
    return found


def pump(owner: RoomTable, replica: RoomTable, out: list[Outbound]) -> list[Outbound]:
    """Carry ReplicateCmd/ReplicaAck between the two tables until only client output is left."""
    client_out: list[Outbound] = []
    queue = list(out)
    while queue:
        target, envelope = queue.pop(0)
        if isinstance(envelope, ReplicateCmd):
            queue.extend(replica.handle(envelope, 0.0))
        elif isinstance(envelope, ReplicaAck):
            queue.extend(owner.handle(envelope, 0.0))
        else:
            client_out.append((target, envelope))
    return client_out


def join(session: str, seq: int) -> JoinCmd:
    return JoinCmd(
        session,
        f"c-{session}",
        f"edge-{session}",
        seq,
        seq,
        "room",
        peer_object(session, session, None, None),
    )


def signal(seq: int, n: int) -> SignalCmd:
    return SignalCmd(
        "a",
        "c-a",
        "edge-a",
        seq,
        seq,
        "room",
        "b",
        sender_object("a", "a"),
        json.dumps({"n": n}).encode(),
    )


def restore(
    table_: RoomTable, session: str, replica: bool, position: RoomPosition | None = None
) -> list[Outbound]:
    return table_.handle(
        RestoreCmd(
            session,
            f"c-{session}",
            f"edge-{session}",
            "room",
            peer_object(session, session, None, None),
            replica,
            position.epoch if position is not None else "",
            position.offset if position is not None else 0,
        ),
        0.0,
    )


def test_output_waits_for_the_replica_then_leaves_in_order() -> None:
    owner, replica = table("A", "B"), table("B", None)
    restore(replica, "a", True)
    out = owner.handle(join("a", 1), 0.0)
    assert [type(e) for _, e in out] == [ReplicateCmd]  # nothing to clients yet
    assert frames(pump(owner, replica, out))[0]["type"] == "joined"
    restore(replica, "b", True)
    pump(owner, replica, owner.handle(join("b", 1), 0.0))
    held = owner.handle(signal(2, 0), 0.0)
    assert frames(held) == []
    released = pump(owner, replica, held)
    assert [f["type"] for f in frames(released)] == ["signal", "ack"]


def test_the_runner_up_takes_over_with_history_and_replies() -> None:
    owner, successor = table("A", "B"), table("B", None)
    for session in ("a", "b"):
        restore(successor, session, True)
        pump(owner, successor, owner.handle(join(session, 1), 0.0))
    delivered = pump(owner, successor, owner.handle(signal(2, 0), 0.0))
    seen = [f for f in frames(delivered, "edge-b") if f["type"] == "signal"]
    position = RoomPosition(owner.rooms["room"].epoch, int(seen[-1]["offset"]))  # type: ignore[call-overload]
    # Signal 3 reaches the successor, but the owner dies before delivering or acking it.
    unreleased = owner.handle(signal(3, 1), 0.0)
    for _, envelope in unreleased:
        if isinstance(envelope, ReplicateCmd):
            successor.handle(envelope, 0.0)
    # The edges re-announce to the successor with what they wrote: b is replayed signal 3
    # (it reached the successor), then the unanswered request is retried: only its ack.
    restore(successor, "a", False, RoomPosition(position.epoch, position.offset))
    restored = frames(restore(successor, "b", False, position))
    assert [f.get("data") for f in restored] == [{"n": 1}]
    assert successor.rooms["room"].epoch == owner.rooms["room"].epoch
    retried = successor.handle(signal(3, 1), 0.0)
    assert [f["type"] for f in frames(retried)] == ["ack"]
    # A new request continues the same epoch and offsets.
    fresh = frames(successor.handle(signal(4, 2), 0.0))
    assert fresh[0]["offset"] == int(restored[0]["offset"]) + 1  # type: ignore[call-overload]
    # b resumes at the successor: it gets signals 3 and 4 replayed and recovered: true.
    replay = successor.handle(AttachCmd("b", "c-b2", "edge-b2", {"room": position}), 0.0)
    assert [f.get("data") for f in frames(replay) if f["type"] == "signal"] == [{"n": 1}, {"n": 2}]
    (synced,) = [e for _, e in replay if isinstance(e, Synced)]
    assert (synced.recovered, synced.report) == (True, True)


def test_without_a_replica_nothing_waits() -> None:
    solo = table("A", None)
    out = solo.handle(join("a", 1), 0.0)
    assert frames(out)[0]["type"] == "joined"


def test_losing_the_replica_releases_held_output() -> None:
    owner, replica_name = owner_whose_replica_moves("B")
    held = owner.handle(join("a", 1), 0.0)
    assert frames(held) == []
    replica_name[0] = None
    assert frames(owner.replicas_changed())[0]["type"] == "joined"


def test_a_new_replica_gets_the_unconfirmed_batches() -> None:
    owner, replica_name = owner_whose_replica_moves("B")
    owner.handle(join("a", 1), 0.0)
    replica_name[0] = "C"
    resent: list[tuple[str, Envelope]] = owner.replicas_changed()
    # The whole history first (a runner-up new to the room), then the unconfirmed batch.
    assert [(t, type(e)) for t, e in resent] == [("C", ReplicateCmd)] * 2
    snapshot, batch = (e for _, e in resent)
    assert isinstance(snapshot, ReplicateCmd) and isinstance(batch, ReplicateCmd)
    assert (snapshot.batch, batch.batch) == (-1, 0)
    # The runner-up replaced meanwhile acks the batch late: it vouches for nothing the new
    # one may lack, so nothing is released on it.
    assert owner.handle(ReplicaAck("room", 0, replica="B"), 0.0) == []
    assert owner.late_acks == 1
    released = owner.handle(ReplicaAck("room", 0, replica="C"), 0.0)
    assert frames(released)[0]["type"] == "joined"


def test_an_ack_naming_no_replica_is_taken_as_from_an_earlier_version() -> None:
    # A runner-up of an earlier version does not name itself: during a rolling upgrade
    # its acks release as they did, or its owner would stall until it is upgraded.
    owner, _ = owner_whose_replica_moves("B")
    owner.handle(join("a", 1), 0.0)
    released = owner.handle(ReplicaAck("room", 0), 0.0)
    assert frames(released)[0]["type"] == "joined" and owner.late_acks == 0


def test_a_runner_up_new_to_the_room_learns_the_members_away_from_their_edges() -> None:
    # b joined while the room had no runner-up, then dropped (in its resume window: no
    # edge knows it to re-announce it). A runner-up that appears later gets b from the
    # owner's snapshot, so a takeover still knows b as a member.
    owner, replica_name = owner_whose_replica_moves(None)
    successor = table("C", None)
    owner.handle(join("a", 1), 0.0)
    owner.handle(join("b", 1), 0.0)
    owner.handle(DetachCmd("b", "c-b", "edge-b", False), 1.0)
    replica_name[0] = "C"
    pump(owner, successor, owner.replicas_changed(2.0))
    pump(owner, successor, owner.handle(signal(2, 0), 2.0))
    replica = successor.rooms["room"]
    assert set(replica.members) == {"a", "b"}
    assert replica.members["b"].suspended_until is not None
    # The owner dies: the successor serves the room and b is still a member.
    restore(successor, "a", False)
    answered = frames(successor.handle(signal(3, 1), 3.0))
    assert [f["type"] for f in answered if f["type"] in ("ack", "error")] == ["ack"]


# ------------------------------------------------------------------ terms and handoff


def test_a_runner_up_that_serves_the_room_refuses_and_the_sender_stops_serving() -> None:
    # A paused owner wakes up after its runner-up took the room over (and its term).
    owner, successor = table("A", "B"), table("B", None)
    for session in ("a", "b"):
        restore(successor, session, True)
        pump(owner, successor, owner.handle(join(session, 1), 0.0))
    successor.handle(signal(2, 0), 0.0)  # the takeover: active, with a higher term
    assert successor.rooms["room"].term > owner.rooms["room"].term
    held = owner.handle(signal(3, 1), 0.0)  # the woken owner applies a late command
    (_, replicate) = held[0]
    assert isinstance(replicate, ReplicateCmd)
    (answer,) = successor.handle(replicate, 0.0)
    assert isinstance(answer[1], ReplicaAck) and answer[1].refused
    assert owner.handle(answer[1], 0.0) == []  # nothing released: no ack, no delivery
    assert not owner.rooms["room"].active  # fenced: it serves the room no more


def test_a_replica_refuses_a_lower_term_than_it_knows() -> None:
    replica = table("B", None)
    newer = ReplicateCmd("A2", "room", "e", 0, [ReplicatedEvent(1, ["a"], b"{}")], 10)
    older = ReplicateCmd("A1", "room", "e", 0, [ReplicatedEvent(2, ["a"], b"{}")], 9)
    assert replica.handle(newer, 0.0) == [("A2", ReplicaAck("room", 0, replica="B"))]
    (refusal,) = replica.handle(older, 0.0)
    assert refusal == ("A1", ReplicaAck("room", 0, True, 10, "B"))
    assert [e.offset for e in replica.rooms["room"].history] == [1]


def owning(node: str, source: str | None, owns: bool = True) -> RoomTable:
    return broker(node, owns=lambda room: owns, handoff_from=lambda room: source)


def test_a_new_owner_asks_the_previous_one_and_continues_its_room() -> None:
    previous, new = owning("A", None), owning("B", "A")
    previous.handle(join("a", 1), 0.0)
    previous.handle(join("b", 1), 0.0)
    acked = previous.handle(signal(2, 0), 0.0)
    epoch, offset = previous.rooms["room"].epoch, previous.rooms["room"].offset
    # The broker set changed: B owns the room now. The first command waits for a handoff.
    asked = new.handle(signal(2, 0), 1.0)  # a resend of the acked signal
    assert [type(e) for _, e in asked] == [HandoffRequest]
    previous.owns = lambda room: False
    (handoff,) = previous.handle(asked[0][1], 1.0)
    assert isinstance(handoff[1], Handoff) and handoff[1].present
    assert not previous.rooms["room"].active
    served = new.handle(handoff[1], 1.0)
    # The resend is answered from the handed record: the same ack, nothing applied again.
    assert [r.payload for r in replies(served)] == [r.payload for r in replies(acked)]
    assert replies(served)[0].term > replies(acked)[0].term  # from the new ownership
    room = new.rooms["room"]
    assert (room.epoch, room.offset, room.active) == (epoch, offset, True)
    assert room.term > handoff[1].term
    new.handle(signal(3, 1), 1.0)
    assert new.rooms["room"].offset == offset + 1  # the offsets go on


def test_without_an_answer_the_new_owner_serves_after_the_timeout() -> None:
    new = owning("B", "A")
    assert [type(e) for _, e in new.handle(join("a", 1), 0.0)] == [HandoffRequest]
    assert [type(e) for _, e in new.expire(0.3)] == [HandoffRequest]  # asked again
    out = new.expire(0.0 + new.handoff_timeout)
    assert frames(out)[0]["type"] == "joined"


def test_a_broker_that_still_owns_the_room_in_its_view_says_ask_again() -> None:
    previous = owning("A", None, owns=True)
    previous.handle(join("a", 1), 0.0)
    (answer,) = previous.handle(HandoffRequest("room", "B"), 0.0)
    assert isinstance(answer[1], Handoff) and answer[1].retry and not answer[1].present
    assert previous.rooms["room"].active


def test_a_broker_serves_no_room_it_does_not_own_in_its_view() -> None:
    other = owning("A", None, owns=False)
    assert other.handle(join("a", 1), 0.0) == []  # dropped: the edge resends to the owner
    assert "room" not in other.rooms


def replies(out: list[Outbound]) -> list[Reply]:
    return [e for _, e in out if isinstance(e, Reply)]


def test_a_membership_copy_does_not_replace_a_replicated_history() -> None:
    # 3 brokers: the owner died; its runner-up (with the history) asks the broker that would
    # own the room without it, which only holds a membership copy re-announced by edges.
    owner, runner_up = table("A", "B"), owning("B", "C")
    for session in ("a", "b"):
        restore(runner_up, session, True)
        pump(owner, runner_up, owner.handle(join(session, 1), 0.0))
    pump(owner, runner_up, owner.handle(signal(2, 0), 0.0))
    epoch, offset = runner_up.rooms["room"].epoch, runner_up.rooms["room"].offset
    third = owning("C", None, owns=False)
    restore(third, "a", True)  # only a's re-announcement reached it
    asked = runner_up.handle(signal(3, 1), 1.0)
    assert [type(e) for _, e in asked] == [HandoffRequest]
    (answer,) = third.handle(asked[0][1], 1.0)
    assert isinstance(answer[1], Handoff) and answer[1].present and not answer[1].history
    served = runner_up.handle(answer[1], 1.0)
    room = runner_up.rooms["room"]
    assert (room.epoch, room.active) == (epoch, True)  # the history was kept
    assert set(room.members) == {"a", "b"}
    assert [f["type"] for f in frames(served)] == ["ack"] and room.offset == offset + 1


def test_an_owner_a_newer_view_deposes_acks_nothing_and_hands_its_room_over() -> None:
    # Chaos seed 9001 (5 min): a view moved a room on while the old owner stayed a member;
    # it kept acking signals (its room was still active) that its successor never had.
    previous, new = owning("A", None), owning("B", "A")
    previous.handle(join("a", 1), 0.0)
    previous.handle(join("b", 1), 0.0)
    previous.handle(signal(2, 0), 0.0)
    offset = previous.rooms["room"].offset
    previous.owns = lambda room: False  # the new view: B owns the room
    previous.replicas_changed(1.0)
    assert previous.handle(signal(3, 1), 1.0) == []  # no ack, no event: the edge resends
    assert previous.rooms["room"].offset == offset
    asked = new.handle(signal(3, 1), 1.0)
    assert [type(e) for _, e in asked] == [HandoffRequest]
    (handoff,) = previous.handle(asked[0][1], 1.0)
    assert isinstance(handoff[1], Handoff) and handoff[1].history
    served = new.handle(handoff[1], 1.0)
    assert [r.ok for r in replies(served)] == [True]  # acked once, by the new owner
    assert new.rooms["room"].offset == offset + 1
    # A view that gives the room back before anyone took it lets the old owner go on.
    again = owning("C", None)
    again.handle(join("a", 1), 0.0)
    again.owns = lambda room: False
    again.replicas_changed(1.0)
    again.owns = lambda room: True
    again.replicas_changed(2.0)
    assert sorted(f["type"] for f in frames(again.handle(join("b", 1), 2.0))) == [
        "joined",
        "peer-joined",
    ]


def test_a_broker_takes_a_rooms_state_only_from_the_broker_that_owns_it() -> None:
    # Views from Consul: "A" owns the room, "B" is its runner-up, "X" is another broker
    # (admitted, sending under its own name) after a room it does not own.
    refusals: list[tuple[str, str]] = []
    owner = owning("A", None)
    runner_up = owning("B", "A", owns=False)
    for node in (owner, runner_up):
        node.owner_of = lambda room: "A"
        node.refused = lambda sender, why, what: refusals.append((sender, what))
    owner.handle(join("a", 1), 0.0)
    owner.handle(join("b", 1), 0.0)
    room = owner.rooms["room"]
    state = (room.epoch, room.offset, room.term, set(room.members))
    events = [ReplicatedEvent(1, ["a"], b'{"forged":true}')]
    forged = ReplicateCmd("X", "room", "forged", 0, events, term=2**62)
    assert runner_up.handle(forged, 1.0) == []  # nothing kept, nothing acked
    assert "room" not in runner_up.rooms
    # Asking for the room's state: told to ask again, nothing handed, nobody fenced.
    (answer,) = owner.handle(HandoffRequest("room", "X", term=2**62), 1.0)
    assert answer == ("X", Handoff("room", "A", False, retry=True))
    # Pushing a state over it (a higher term would win): refused.
    push = Handoff("room", "X", True, term=2**62, epoch="forged", members=[])
    assert owner.handle(push, 1.0) == []
    assert (room.epoch, room.offset, room.term, set(room.members)) == state
    assert refusals == [("X", "room")] * 3
    # The owner itself replicates as before.
    genuine = ReplicateCmd("A", "room", room.epoch, 0, [], term=room.term)
    assert runner_up.handle(genuine, 1.0) == [("A", ReplicaAck("room", 0, replica="B"))]


def test_a_replica_forgets_a_member_only_for_the_edge_holding_its_seat() -> None:
    replica = table("B", None)
    refusals: list[str] = []
    replica.refused = lambda sender, why, what: refusals.append(sender)
    restore(replica, "a", True)  # a passive seat of "a", on edge-a
    replica.handle(ForgetCmd("a", "room", "edge-rogue"), 0.0)
    assert refusals == ["edge-rogue"] and "a" in replica.rooms["room"].members
    replica.handle(ForgetCmd("a", "room", "edge-a"), 0.0)
    assert "room" not in replica.rooms or "a" not in replica.rooms["room"].members


def test_a_handoff_request_from_a_broker_this_view_does_not_make_owner_fences_nothing() -> None:
    # Chaos seed 21 (one region): two brokers whose views disagreed each told the other to
    # ask again, waited out the handoff timeout and both served the room (160 lost). The
    # asker is answered as an owner would be, but its term fences nothing here.
    refusals: list[tuple[str, str]] = []
    owner, runner_up = table("A", "B"), owning("B", "C", owns=False)
    runner_up.owner_of = lambda room: "A"  # B's view: A owns the room
    runner_up.refused = lambda sender, why, what: refusals.append((sender, what))
    for session in ("a", "b"):
        restore(runner_up, session, True)
        pump(owner, runner_up, owner.handle(join(session, 1), 0.0))
    pump(owner, runner_up, owner.handle(signal(2, 0), 0.0))
    copy = runner_up.rooms["room"]
    term, offset = copy.term, copy.offset
    (answer,) = runner_up.handle(HandoffRequest("room", "C", term=2**62), 1.0)
    assert isinstance(answer[1], Handoff) and answer[1].present and answer[1].history
    assert answer[1].offset == offset
    assert copy.term == term  # not fenced by a broker that does not own the room here
    assert refusals == [("C", "room")]  # counted and logged all the same


def test_a_runner_up_that_missed_a_resume_takes_the_seat_from_the_owners_snapshot() -> None:
    # Chaos seed 21: "a" resumed on another edge while broker C (holding a passive copy
    # of the room from an earlier view) did not hear the attach. C becomes the runner-up
    # later and gets the owner's snapshot; then the owner dies. C must serve "a" from its
    # new edge, not refuse its signals for a seat left on its old, dead edge.
    owner, replica_name = owner_whose_replica_moves(None)
    successor = table("C", None)
    for session in ("a", "b"):
        restore(successor, session, True)  # C's old passive copy: a on edge-a, c-a
        owner.handle(join(session, 1), 0.0)
    successor.edge_lost("edge-a", 1.0)  # edge-a died: C suspends a's copy
    owner.handle(AttachCmd("a", "c-a.2", "edge-x", {}), 1.0)  # a resumed on edge-x
    replica_name[0] = "C"
    pump(owner, successor, owner.replicas_changed(2.0))
    moved = SignalCmd(
        "a", "c-a.2", "edge-x", 2, 2, "room", "b", sender_object("a", "a"), b'{"n":1}'
    )
    pump(owner, successor, owner.handle(moved, 2.0))
    seat = successor.rooms["room"].members["a"]
    assert (seat.edge, seat.conn, seat.suspended_until) == ("edge-x", "c-a.2", None)
    # The owner dies; C serves the room (b re-announced) and takes a's signals from edge-x.
    restore(successor, "b", False)
    again = SignalCmd(
        "a", "c-a.2", "edge-x", 3, 3, "room", "b", sender_object("a", "a"), b'{"n":2}'
    )
    answered = frames(successor.handle(again, 3.0))
    assert [f["type"] for f in answered if f["type"] in ("ack", "error")] == ["ack"]


def test_a_copy_keeps_its_own_seat_over_an_older_connection_in_a_snapshot() -> None:
    owner, replica_name = owner_whose_replica_moves(None)
    successor = table("C", None)
    owner.handle(join("a", 1), 0.0)
    owner.handle(join("b", 1), 0.0)
    # C heard of a's newer connection (its attach) before the owner's snapshot came.
    successor.handle(
        RestoreCmd("a", "c-a.2", "edge-x", "room", peer_object("a", "a", None, None), True), 0.5
    )
    replica_name[0] = "C"
    pump(owner, successor, owner.replicas_changed(1.0))
    pump(owner, successor, owner.handle(signal(2, 0), 1.0))
    seat = successor.rooms["room"].members["a"]
    assert (seat.edge, seat.conn) == ("edge-x", "c-a.2")


def test_a_replica_takes_a_member_that_left_and_joined_again_on_the_same_connection() -> None:
    # The edge sends the runner-up ForgetCmd after a leave's answer and RestoreCmd after a
    # join's, on one link, in order: a re-announcement after the forget is a new join.
    # (Refused as a "late word", the member was unknown to the broker that took the room
    # over: its resent leave got not_in_room and nobody heard it left.)
    replica = table("B", None)
    restore(replica, "a", True)
    restore(replica, "b", True)
    replica.handle(ForgetCmd("a", "room", "edge-a"), 0.0)
    assert set(replica.rooms["room"].members) == {"b"}
    restore(replica, "a", True)
    assert set(replica.rooms["room"].members) == {"a", "b"}


def test_a_handoff_of_a_room_that_ended_here_brings_no_member_back() -> None:
    # The owner ended the room (its last member left); its runner-up's copy still has a
    # member whose ForgetCmd it has not had yet. When the owner asks it for the room (a
    # new join), that copy must not resurrect the member in the old epoch.
    owner, runner_up = owning("A", "B"), owning("B", None, owns=False)
    asked = owner.handle(join("a", 1), 0.0)
    handoff = runner_up.handle(asked[0][1], 0.0)
    out = owner.handle(handoff[0][1], 0.0)
    assert frames(out)[0]["type"] == "joined"
    epoch = owner.rooms["room"].epoch
    restore(runner_up, "a", True)
    restore(runner_up, "b", True)  # b never joined on A: a stale copy
    runner_up.rooms["room"].epoch = epoch
    owner.handle(LeaveCmd("a", "c-a", "edge-a", 2, 2, "room"), 0.0)
    assert "room" not in owner.rooms  # ended
    asked = owner.handle(join("c", 1), 1.0)
    (handoff,) = runner_up.handle(asked[0][1], 1.0)
    assert isinstance(handoff[1], Handoff) and handoff[1].epoch == epoch
    owner.handle(handoff[1], 1.0)
    room = owner.rooms["room"]
    assert set(room.members) == {"c"} and room.epoch != epoch


def test_a_handed_membership_brings_back_no_member_that_left_here() -> None:
    # A third broker's stale copy (a runner-up of another view) still lists a member that
    # left on this owner: merging it must not resurrect the member.
    owner = owning("A", None)
    owner.handle(join("a", 1), 0.0)
    owner.handle(join("b", 1), 0.0)
    owner.handle(LeaveCmd("b", "c-b", "edge-b", 2, 2, "room"), 0.0)
    stale = owning("C", None, owns=False)
    restore(stale, "a", True)
    restore(stale, "b", True)
    (handoff,) = stale.handle(HandoffRequest("room", "A", 0), 0.0)
    owner.handle(handoff[1], 0.0)
    assert set(owner.rooms["room"].members) == {"a"}


def test_a_late_replica_re_announcement_does_not_bring_back_a_member_that_left_the_owner() -> None:
    # A broker that serves the room now (it took over) may still get a runner-up's
    # re-announcement an edge sent before the member left: only a newer connection is news.
    owner = owning("A", None)
    owner.handle(join("a", 1), 0.0)
    owner.handle(join("b", 1), 0.0)
    owner.handle(LeaveCmd("b", "c-b", "edge-b", 2, 2, "room"), 0.0)
    restore(owner, "b", True)
    assert set(owner.rooms["room"].members) == {"a"}


def test_a_replicated_peer_left_removes_the_member_from_the_runner_ups_copy() -> None:
    # The owner replicated b's leave and died before answering it: the edge never sends
    # the ForgetCmd. The runner-up must not serve b as a member when it takes over.
    owner, replica = table("A", "B"), table("B", None)
    pump(owner, replica, owner.handle(join("a", 1), 0.0))
    pump(owner, replica, owner.handle(join("b", 1), 0.0))
    restore(replica, "a", True)
    restore(replica, "b", True)
    out = owner.handle(LeaveCmd("b", "c-b", "edge-b", 2, 2, "room"), 0.0)
    (replicate,) = [e for _, e in out if isinstance(e, ReplicateCmd)]
    replica.handle(replicate, 0.0)  # the owner dies before the ack
    assert set(replica.rooms["room"].members) == {"a"}
    # b's join's re-announcement by its edge, late (another link than the owner's): stale.
    restore(replica, "b", True)
    assert set(replica.rooms["room"].members) == {"a"}


def test_a_member_gone_by_a_replicated_leave_may_join_again_on_the_same_connection() -> None:
    # b's leave reached the runner-up twice: the owner's replicated peer-left, then the
    # edge's ForgetCmd. b then joins again on the same connection: the edge's
    # re-announcement (after the ForgetCmd on its link) must put b back in the copy.
    owner, replica = table("A", "B"), table("B", None)
    pump(owner, replica, owner.handle(join("a", 1), 0.0))
    pump(owner, replica, owner.handle(join("b", 1), 0.0))
    restore(replica, "a", True)
    restore(replica, "b", True)
    pump(owner, replica, owner.handle(LeaveCmd("b", "c-b", "edge-b", 2, 2, "room"), 0.0))
    assert set(replica.rooms["room"].members) == {"a"}
    replica.handle(ForgetCmd("b", "room", "edge-b"), 0.0)
    pump(owner, replica, owner.handle(join("b", 3), 0.0))
    restore(replica, "b", True)
    assert set(replica.rooms["room"].members) == {"a", "b"}


def test_a_new_runner_up_takes_the_owners_members_even_one_that_left_and_came_back() -> None:
    # The runner-up saw b leave (the owner's replicated peer-left); b joined again on the
    # same connection and the runner-up changed and changed back: the owner's snapshot
    # lists b, and it is the room's membership, not a stale copy.
    owner, replica_name = owner_whose_replica_moves("B")
    replica = table("B", None)
    pump(owner, replica, owner.handle(join("a", 1), 0.0))
    pump(owner, replica, owner.handle(join("b", 1), 0.0))
    restore(replica, "a", True)
    restore(replica, "b", True)
    pump(owner, replica, owner.handle(LeaveCmd("b", "c-b", "edge-b", 2, 2, "room"), 0.0))
    replica_name[0] = "C"
    owner.replicas_changed(1.0)
    owner.handle(join("b", 3), 1.0)  # held for C, which never answers
    replica_name[0] = "B"
    pump(owner, replica, owner.replicas_changed(2.0))
    assert set(replica.rooms["room"].members) == {"a", "b"}


def test_a_join_replicated_but_never_answered_is_seated_by_the_successor() -> None:
    # The owner replicated b's join and died before answering it: b's edge never
    # re-announced b to the runner-up. The resent join is answered from the replicated
    # record, and b must hold a seat there (else its leave is refused, no peer-left made).
    owner, replica = table("A", "B"), table("B", None)
    pump(owner, replica, owner.handle(join("a", 1), 0.0))
    restore(replica, "a", True)
    out = owner.handle(join("b", 1), 0.0)
    (replicate,) = [e for _, e in out if isinstance(e, ReplicateCmd)]
    replica.handle(replicate, 0.0)  # acked, but the owner is dead
    answered = replica.handle(join("b", 1), 1.0)
    (reply,) = replies(answered)
    assert reply.ok and reply.member
    assert set(replica.rooms["room"].members) == {"a", "b"}
    left = replica.handle(LeaveCmd("b", "c-b", "edge-b", 2, 2, "room"), 1.0)
    assert [f["type"] for f in frames(left)] == ["left"]  # (a is told once it syncs)
    last = json.loads(replica.rooms["room"].history[-1].payload)
    assert last["type"] == "peer-left" and last["peer"]["session"] == "b"


def restarted_runner_up_sent_a_batch() -> tuple[RoomTable, RoomTable, RoomPosition]:
    """Owner A, its runner-up B restarted (empty) and sent one batch of A's room before A
    heard of the restart (a rolling restart: the batch waited in A's link to B). Returns
    A, the restarted B, and b's position from before the restart."""
    owner, replica = table("A", "B"), table("B", None)
    for session in ("a", "b"):
        restore(replica, session, True)
        pump(owner, replica, owner.handle(join(session, 1), 0.0))
    position = RoomPosition(owner.rooms["room"].epoch, owner.rooms["room"].offset)
    for n in range(4):
        pump(owner, replica, owner.handle(signal(2 + n, n), 0.0))
    restarted = table("B", None)
    for session in ("a", "b"):
        restore(restarted, session, True)  # the edges re-announce their members
    out = owner.handle(signal(6, 4), 1.0)
    (batch,) = [e for _, e in out if isinstance(e, ReplicateCmd)]
    assert [e.offset for e in batch.events] == [owner.rooms["room"].offset]  # not the history
    pump(owner, restarted, out)
    return owner, restarted, position


def resumed_at(successor: RoomTable, position: RoomPosition) -> tuple[list[object], Synced]:
    """b resumes at ``successor`` from ``position``: the signals replayed and the report."""
    out = successor.handle(AttachCmd("b", "c-b2", "edge-b2", {"room": position}), 2.0)
    (synced,) = [e for _, e in out if isinstance(e, Synced)]
    return [f.get("data") for f in frames(out) if f["type"] == "signal"], synced


def test_a_restarted_runner_up_begun_by_a_batch_gets_the_history_from_the_next() -> None:
    # A's next batch (it heard of the restart: its runner-up may be empty) carries the
    # whole history; the copy must take what lies before the batch it began with, else a
    # takeover (or A asking for its room back after its own restart) says recovered: false.
    owner, restarted, position = restarted_runner_up_sent_a_batch()
    owner.replicas_changed(1.0)
    pump(owner, restarted, owner.handle(signal(7, 5), 1.0))
    replayed, synced = resumed_at(restarted, position)
    assert (synced.recovered, synced.epoch) == (True, position.epoch)
    assert replayed == [{"n": n} for n in range(6)]


def test_a_copy_begun_by_a_batch_takes_the_whole_room_its_owner_hands_over() -> None:
    # A stops (SIGTERM) before its next batch and hands its room to B, at the offset and
    # term B's copy has: the handed state holds more history than the copy, and wins.
    owner, restarted, position = restarted_runner_up_sent_a_batch()
    handoff = owner.hand_over("room", 1.0)
    restarted.handle(handoff, 1.0)
    replayed, synced = resumed_at(restarted, position)
    assert (synced.recovered, synced.epoch) == (True, position.epoch)
    assert replayed == [{"n": n} for n in range(5)]


def test_a_new_owner_asks_the_next_broker_once_the_one_it_asked_is_gone() -> None:
    # Rolling restart: B, restarted, owns the room again and asks A (the broker before it
    # in its view), but A was stopped meanwhile and handed the room on to C. Once A has
    # left B's view, B asks C (the broker before it now), not A until the handoff timeout
    # (a new epoch without the room's members).
    seen = {"A", "B", "C"}
    carrier = owning("C", None, owns=False)
    for session in ("a", "b"):
        restore(carrier, session, True)
    previous = owning("A", None)
    for session in ("a", "b"):
        previous.handle(join(session, 1), 0.0)
    previous.handle(signal(2, 0), 0.0)
    carrier.handle(previous.hand_over("room", 0.5), 0.5)  # A stops: its room goes to C
    epoch, offset = previous.rooms["room"].epoch, previous.rooms["room"].offset
    new = owning("B", None)
    new.handoff_from = lambda room: "A" if "A" in seen else "C"
    new.in_view = lambda broker: broker in seen
    asked = new.handle(signal(3, 1), 1.0)
    assert [(t, type(e)) for t, e in asked] == [("A", HandoffRequest)]  # A never answers
    assert [t for t, _ in new.expire(1.3)] == ["A"]  # still in B's view: asked again
    seen.discard("A")  # its heartbeats stopped
    (again,) = new.expire(1.6)
    assert again[0] == "C" and isinstance(again[1], HandoffRequest)
    (answer,) = carrier.handle(again[1], 1.6)
    served = new.handle(answer[1], 1.6)
    room = new.rooms["room"]
    assert (room.epoch, room.active, set(room.members)) == (epoch, True, {"a", "b"})
    assert frames(served, "edge-a")[-1]["type"] == "ack" and room.offset == offset + 1


# ------------------------------------------------------------------ a flap: A, B, then A's new run

#: The room's rendezvous order of the three brokers (its owner is the first in a view).
RANK = ("A", "B", "C")


class Seen:
    """One broker's view of the brokers (a number and its members), changed by the test."""

    def __init__(self, number: int, members: set[str]) -> None:
        self.number, self.members = number, set(members)

    def placed(self, without: str = "") -> list[str]:
        return [b for b in RANK if b in self.members and b != without]


def viewing(node: str, seen: Seen) -> RoomTable:
    """A broker placing rooms by ``seen`` (as with Consul: terms from the view's number)."""

    def first(brokers: list[str]) -> str | None:
        return brokers[0] if brokers else None

    return broker(
        node,
        replica_for=lambda room: first(seen.placed(node)) if node in seen.members else None,
        owns=lambda room: first(seen.placed()) == node,
        handoff_from=lambda room: first(seen.placed(node)),
        new_term=lambda: seen.number,
        owner_of=lambda room: first(seen.placed()),
    )


def deliver(tables: dict[str, RoomTable], out: list[Outbound], now: float) -> list[Outbound]:
    """Carry broker-to-broker envelopes until only client output is left."""
    client_out: list[Outbound] = []
    queue = list(out)
    while queue:
        target, envelope = queue.pop(0)
        if target in tables:
            queue.extend(tables[target].handle(envelope, now))
        else:
            client_out.append((target, envelope))
    return client_out


def test_a_flapping_owner_does_not_apply_again_what_its_successor_applied() -> None:
    # Two-region chaos seed 11 (2026-12-03): eu-broker-1 (A) owned eu-room-3 and was
    # killed -9; the view without it (B owns, C its runner-up) lasted 0.6 s, then A's new
    # run was back. B's first batch never reached C (C read the view a moment later and
    # refused it), the next ones did: held behind the first, nothing released. The view
    # with A' deposed B's room and made A' its runner-up: B sent A' its whole history (the
    # events of every batch) and the batch C had not acked, and was acked. A' took the
    # room with that copy; B's handoff was no newer, so A' kept its copy, which had no
    # reply record of the requests C had acked: their resends were applied again
    # (offsets 318 and 322, again 323 and 324: 12 `duplicate`).
    seen = {n: Seen(1, {"A", "B", "C"}) for n in RANK}
    brokers = {n: viewing(n, seen[n]) for n in RANK}
    for session in ("a", "b"):
        restore(brokers["B"], session, True)  # the edges re-announce to the runner-up
        deliver(brokers, brokers["A"].handle(join(session, 1), 0.0), 0.0)
    deliver(brokers, brokers["A"].handle(signal(2, 0), 0.0), 0.0)
    # A is killed; the view without it: B owns the room, C is its runner-up.
    del brokers["A"]
    for n in ("B", "C"):
        seen[n].number, seen[n].members = 2, {"B", "C"}
    # B asks C, which has nothing of the room; B serves its replicated copy. Its first
    # batch (the whole history, C being new to the room) is lost.
    (asked,) = brokers["B"].handle(signal(3, 1), 1.0)
    (answer,) = brokers["C"].handle(asked[1], 1.0)
    out = brokers["B"].handle(answer[1], 1.0)
    assert [(t, type(e)) for t, e in out] == [("C", ReplicateCmd)]
    b_room = brokers["B"].rooms["room"]
    assert b_room.active and len(b_room.pending) == 1
    out = brokers["B"].handle(signal(4, 2), 1.0)
    assert [t for t, e in out if isinstance(e, ReplicateCmd)] == ["C"]
    assert deliver(brokers, out, 1.0) == []  # C acks it; it waits behind the first
    # A's new run: empty, reading the view without it (B owns the room there).
    seen["A"] = Seen(2, {"B", "C"})
    brokers["A"] = viewing("A", seen["A"])
    # B reads the view with A back first: deposed, its runner-up is A' now.
    seen["B"].number, seen["B"].members = 3, {"A", "B", "C"}
    released = deliver(brokers, brokers["B"].replicas_changed(1.5), 1.5)
    assert [r.ok for r in replies(released)] == [True, True]  # both acked (by B)
    offset = b_room.offset
    # A' reads it too and owns the room: the edge resends signal 4 (its view changed
    # before the ack came). A' asks B for the room, which hands over what A' has.
    for n in ("A", "C"):
        seen[n].number, seen[n].members = 3, {"A", "B", "C"}
    (asked,) = brokers["A"].handle(signal(4, 2), 1.6)
    assert asked[0] == "B" and isinstance(asked[1], HandoffRequest)
    resent = deliver(brokers, [asked], 1.6)
    room = brokers["A"].rooms["room"]
    assert room.active and room.epoch == b_room.epoch
    assert [f["type"] for f in frames(resent)] == ["ack"]  # answered, not applied again
    assert room.offset == offset


def test_a_new_runner_up_gets_the_reply_records_with_the_whole_history() -> None:
    # What a runner-up new to the room is sent (its whole history) comes with the reply
    # records of its events, a server API publish's too (its pseudo-session is no member):
    # the batches that carried them went to the runner-up before.
    owner, replica_name = owner_whose_replica_moves("B")
    first = table("B", None)
    for session in ("a", "b"):
        restore(first, session, True)
        pump(owner, first, owner.handle(join(session, 1), 0.0))
    pump(owner, first, owner.handle(signal(2, 0), 0.0))
    publish = SignalCmd(
        "~api.7", "api", "edge-api", 1, "k1", "room", None, b'{"api":"k"}', b'{"n":9}', server=True
    )
    (published,) = replies(pump(owner, first, owner.handle(publish, 0.0)))
    successor = table("C", None)
    replica_name[0] = "C"
    owner.replicas_changed(1.0)
    pump(owner, successor, owner.handle(signal(3, 1), 1.0))  # its whole history goes to C
    # The owner dies: C serves the room; the resends are answered, nothing applied again.
    for session in ("a", "b"):
        restore(successor, session, False)
    room = successor.rooms["room"]
    offset = room.offset
    assert [r.ok for r in replies(successor.handle(signal(2, 0), 2.0))] == [True]
    (again,) = replies(successor.handle(publish, 2.0))
    assert (again.ok, again.epoch, again.offset) == (True, published.epoch, published.offset)
    assert room.offset == offset


def test_a_copy_begun_by_a_batch_takes_what_an_older_handoff_has_that_it_lacks() -> None:
    # A stops (SIGTERM) while its last batch waits for B's ack: its handoff is one event
    # behind B's copy (begun by a batch: a hole before it), so B keeps its copy. What the
    # handoff holds before the hole (history, reply records) is the same owner's and goes
    # into the copy: a resume from before the hole recovers, a resend is not applied again.
    owner, restarted, position = restarted_runner_up_sent_a_batch()
    held = owner.handle(signal(7, 5), 1.0)
    (batch,) = [e for _, e in held if isinstance(e, ReplicateCmd)]
    restarted.handle(batch, 1.0)  # acked, but A hands over before it reads the ack
    handoff = owner.hand_over("room", 1.0)
    assert handoff.offset == restarted.rooms["room"].offset - 1
    restarted.handle(handoff, 1.0)
    offset = restarted.rooms["room"].offset
    # B serves the room: a's signal 2, acked before B restarted, is resent (its ack lost).
    restore(restarted, "a", False)
    assert [r.ok for r in replies(restarted.handle(signal(2, 0), 2.0))] == [True]
    assert restarted.rooms["room"].offset == offset
    replayed, synced = resumed_at(restarted, position)
    assert (synced.recovered, synced.epoch) == (True, position.epoch)
    assert replayed == [{"n": n} for n in range(6)]
