"""RoomTable, the broker's sans-I/O core, driven command by command (no sockets, no clock).

Commands are the wire envelopes the edges send; what comes back is decoded with ``json``
and checked as the client frames PROTOCOL.md defines.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from broker.rooms import (
    REPLY_RECORD_TTL,
    REPLY_RECORDS_PER_SESSION,
    RESEND_AFTER,
    Outbound,
    RoomTable,
)
from signalpost.tickets import SeatTickets
from signalpost.wire import (
    AttachCmd,
    Confirm,
    Deliver,
    DetachCmd,
    Handoff,
    JoinCmd,
    LeaveCmd,
    Reply,
    RequestId,
    RestoreCmd,
    RoomPosition,
    SignalCmd,
    Synced,
    peer_object,
    sender_object,
)

Frame = dict[str, Any]

WINDOW = 30.0


def make_table(
    *,
    capacity: int = 2,
    resume_window: float = WINDOW,
    history_max_events: int = 1024,
    history_max_age: float = 120.0,
    confirming: bool = False,
) -> RoomTable:
    """A table whose epochs are ``epoch-0``, ``epoch-1`` ... in creation order.

    Without ``confirming`` (the dev topology) nothing is resent for want of confirmation;
    the delivery-stream tests turn it on."""
    counter = itertools.count()
    return RoomTable(
        capacity=capacity,
        resume_window=resume_window,
        history_max_events=history_max_events,
        history_max_age=history_max_age,
        new_epoch=lambda: f"epoch-{next(counter)}",
        confirming=confirming,
    )


_AUTO: Any = object()


@dataclass
class Sess:
    """One client session as an edge would present it to the broker."""

    session: str
    user: str
    conn: str
    edge: str
    meta: dict[str, Any] | None = None
    seq: int = 0

    @property
    def peer(self) -> bytes:
        return peer_object(self.session, self.user, self.meta, None)

    @property
    def sender(self) -> bytes:
        return sender_object(self.session, self.user)

    def _next(self, req: Any) -> tuple[int, RequestId | None]:
        self.seq += 1
        return self.seq, (self.seq if req is _AUTO else req)

    def join(self, room: str, req: Any = _AUTO) -> JoinCmd:
        seq, rid = self._next(req)
        return JoinCmd(self.session, self.conn, self.edge, seq, rid, room, self.peer)

    def leave(self, room: str, req: Any = _AUTO) -> LeaveCmd:
        seq, rid = self._next(req)
        return LeaveCmd(self.session, self.conn, self.edge, seq, rid, room)

    def signal(self, room: str, to: str | None, data: Any = None, req: Any = _AUTO) -> SignalCmd:
        seq, rid = self._next(req)
        payload = json.dumps({"n": seq} if data is None else data).encode()
        return SignalCmd(
            self.session, self.conn, self.edge, seq, rid, room, to, self.sender, payload
        )

    def detach(self, ended: bool) -> DetachCmd:
        return DetachCmd(self.session, self.conn, self.edge, ended)

    def moved(self, conn: str, edge: str | None = None) -> Sess:
        """The same session on a new connection (and maybe a new edge)."""
        return Sess(self.session, self.user, conn, edge or self.edge, self.meta, self.seq)

    def attach(self, positions: dict[str, RoomPosition]) -> AttachCmd:
        return AttachCmd(self.session, self.conn, self.edge, positions)


def sess(name: str, edge: str | None = None) -> Sess:
    return Sess(name, f"user-{name}", f"conn-{name}", edge or f"edge-{name}")


def to(s: Sess, out: list[Outbound]) -> list[Frame]:
    """Frames delivered to ``s`` (at its current edge), in order; replies excluded.

    A ``Synced`` that reports is the ``recovered`` frame its edge writes."""
    frames = []
    for target, envelope in out:
        if isinstance(envelope, Synced) and envelope.session == s.session and envelope.report:
            assert target == s.edge
            frames.append(
                {"type": "recovered", "room": envelope.room, "recovered": envelope.recovered}
            )
        if isinstance(envelope, Deliver) and s.session in envelope.sessions:
            assert target == s.edge, f"{s.session} is on {s.edge}, delivery went to {target}"
            assert len(set(envelope.sessions)) == len(envelope.sessions)
            frames.append(json.loads(envelope.payload))
    return frames


def replies(out: list[Outbound]) -> list[tuple[str, Reply]]:
    return [(t, e) for t, e in out if isinstance(e, Reply)]


def reply(out: list[Outbound], s: Sess) -> Frame:
    """The one reply of a request of ``s``: routed to its edge, echoing conn and seq."""
    found = replies(out)
    assert len(found) == 1, out
    target, envelope = found[0]
    assert (target, envelope.session, envelope.conn, envelope.seq) == (
        s.edge,
        s.session,
        s.conn,
        s.seq,
    )
    assert envelope.payload, "this request carried an id: its reply must not be empty"
    frame: Frame = json.loads(envelope.payload)
    return frame


def deliveries(out: list[Outbound]) -> list[tuple[str, Deliver]]:
    return [(t, e) for t, e in out if isinstance(e, Deliver)]


def joined(table: RoomTable, s: Sess, room: str, now: float = 0.0) -> Frame:
    frame = reply(table.handle(s.join(room), now), s)
    assert frame["type"] == "joined", frame
    return frame


def last_offset(table: RoomTable, probe_room: str, a: Sess, b: Sess, now: float = 0.0) -> int:
    """Observe the room's current offset: ``a`` signals ``b``; the event takes offset+1."""
    out = table.handle(a.signal(probe_room, b.session), now)
    (frame,) = to(b, out)
    return int(frame["offset"]) - 1


# ------------------------------------------------------------------------------------ join


def test_first_join_replies_joined_with_epoch_offset_and_no_members() -> None:
    table = make_table()
    a = sess("a")
    out = table.handle(a.join("r1", req=1), 0.0)
    frame = reply(out, a)
    assert frame == {
        "type": "joined",
        "id": 1,
        "room": "r1",
        "epoch": "epoch-0",
        "offset": frame["offset"],
        "members": [],
    }
    assert isinstance(frame["offset"], int)
    assert deliveries(out) == []  # nobody else to tell


def test_second_join_lists_the_member_and_tells_it_with_the_same_offset() -> None:
    table = make_table()
    a, b = sess("a"), Sess("b", "bob", "conn-b", "edge-b", meta={"role": "callee"})
    first = joined(table, a, "r1")
    out = table.handle(b.join("r1"), 0.0)
    frame = reply(out, b)
    assert frame["type"] == "joined"
    assert frame["epoch"] == first["epoch"]
    assert frame["offset"] == first["offset"] + 1
    assert frame["members"] == [{"session": "a", "user": "user-a", "meta": {}}]
    assert to(a, out) == [
        {
            "type": "peer-joined",
            "room": "r1",
            "peer": {"session": "b", "user": "bob", "meta": {"role": "callee"}},
            "offset": frame["offset"],
        }
    ]
    assert to(b, out) == []
    assert [(t, e.sessions) for t, e in deliveries(out)] == [("edge-a", ["a"])]


def test_peer_object_with_a_name_is_passed_through() -> None:
    table = make_table()
    a = sess("a")
    joined(table, a, "r")
    named = JoinCmd("b", "conn-b", "edge-b", 1, 1, "r", peer_object("b", "bob", None, "Bob B."))
    out = table.handle(named, 0.0)
    assert to(a, out)[0]["peer"] == {"session": "b", "user": "bob", "meta": {}, "name": "Bob B."}
    table.handle(a.leave("r"), 0.0)
    assert joined(table, sess("c"), "r")["members"][0]["name"] == "Bob B."


def test_default_capacity_is_two_and_a_third_gets_room_full() -> None:
    table = make_table()
    a, b, c = sess("a"), sess("b"), sess("c")
    joined(table, a, "r")
    before = joined(table, b, "r")["offset"]
    out = table.handle(c.join("r", req="c-1"), 0.0)
    error = reply(out, c)
    assert error["type"] == "error"
    assert error["code"] == "room_full"
    assert error["id"] == "c-1"
    assert isinstance(error["message"], str) and error["message"]
    assert deliveries(out) == []  # nobody hears of a refused join
    # The refused join recorded no event: the next one takes the next offset.
    assert last_offset(table, "r", a, b) == before
    # c is not a member: it cannot signal there.
    assert reply(table.handle(c.signal("r", None), 0.0), c)["code"] == "not_in_room"


@pytest.mark.parametrize("capacity", [1, 3, 5])
def test_capacity_is_configurable(capacity: int) -> None:
    table = make_table(capacity=capacity)
    members = [sess(f"s{i}") for i in range(capacity)]
    for s in members:
        joined(table, s, "r")
    late = sess("late")
    assert reply(table.handle(late.join("r"), 0.0), late)["code"] == "room_full"
    # A seat frees up when someone leaves.
    table.handle(members[0].leave("r"), 0.0)
    assert joined(table, late, "r")["room"] == "r"


def test_capacity_counts_suspended_members() -> None:
    table = make_table()
    a, b, c = sess("a"), sess("b"), sess("c")
    joined(table, a, "r")
    joined(table, b, "r")
    table.handle(b.detach(ended=False), 0.0)
    assert reply(table.handle(c.join("r"), 1.0), c)["code"] == "room_full"


def test_joining_twice_is_a_noop_success() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    first = joined(table, b, "r")
    out = table.handle(b.join("r", req="again"), 5.0)
    again = reply(out, b)
    assert again == {**first, "id": "again"}
    assert deliveries(out) == []  # no second peer-joined
    assert last_offset(table, "r", a, b) == first["offset"]  # no event recorded


def test_the_table_has_no_notion_of_grants_forbidden_is_decided_at_the_edge() -> None:
    # The token's ``rooms`` claim is checked by the edge; the broker serves any room name.
    table = make_table()
    a = sess("a")
    for room in ("admin", "secret/*", "r" * 128):
        assert joined(table, a, room)["room"] == room


def test_rooms_are_created_lazily_with_their_own_epoch() -> None:
    table = make_table()
    a = sess("a")
    assert joined(table, a, "r1")["epoch"] == "epoch-0"
    assert joined(table, a, "r2")["epoch"] == "epoch-1"


# ----------------------------------------------------------------------------------- leave


def test_leave_replies_left_and_tells_the_others_reason_left() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    offset = joined(table, b, "r")["offset"]
    out = table.handle(b.leave("r", req=2), 1.0)
    assert reply(out, b) == {"type": "left", "id": 2, "room": "r"}
    assert to(a, out) == [
        {
            "type": "peer-left",
            "room": "r",
            "peer": {"session": "b", "user": "user-b", "meta": {}},
            "reason": "left",
            "offset": offset + 1,
        }
    ]
    assert to(b, out) == []


def test_after_leaving_a_session_hears_nothing_from_the_room() -> None:
    table = make_table(capacity=3)
    a, b, c = sess("a"), sess("b"), sess("c")
    for s in (a, b, c):
        joined(table, s, "r")
    table.handle(c.leave("r"), 0.0)
    out = table.handle(a.signal("r", None), 0.0)
    assert to(c, out) == []
    assert [f["type"] for f in to(b, out)] == ["signal"]


@pytest.mark.parametrize("room_exists", [True, False])
def test_leave_when_not_a_member_is_not_in_room(room_exists: bool) -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    if room_exists:
        joined(table, a, "r")
    out = table.handle(b.leave("r", req="x"), 0.0)
    error = reply(out, b)
    assert (error["type"], error["code"], error["id"]) == ("error", "not_in_room", "x")
    assert deliveries(out) == []


def test_leaving_twice_is_not_in_room_the_second_time() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    assert reply(table.handle(b.leave("r"), 0.0), b)["type"] == "left"
    out = table.handle(b.leave("r"), 0.0)
    assert reply(out, b)["code"] == "not_in_room"
    assert deliveries(out) == []


# ---------------------------------------------------------------------------------- signal


def test_signal_reaches_its_target_with_the_server_set_from_and_the_sender_gets_ack() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    offset = joined(table, b, "r")["offset"]
    data = {"sdp": "v=0\r\n", "type": "offer", "from": "mallory"}
    out = table.handle(a.signal("r", "b", data, req=3), 0.0)
    assert reply(out, a) == {"type": "ack", "id": 3}
    assert to(b, out) == [
        {
            "type": "signal",
            "room": "r",
            "from": {"session": "a", "user": "user-a"},
            "data": data,  # a ``from`` inside data stays inside data
            "offset": offset + 1,
        }
    ]
    assert to(a, out) == []


def test_from_is_exactly_the_sender_bytes_the_edge_put_in_the_command() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    # The edge sets ``sender`` from the verified token; the broker must not rebuild it.
    sender = b'{"session":"a","user":"alice@example","name":"Alice"}'
    command = SignalCmd("a", "conn-a", "edge-a", 50, 50, "r", "b", sender, b'{"k":1}')
    out = table.handle(command, 0.0)
    ((_, delivered),) = deliveries(out)
    assert sender in delivered.payload
    assert json.loads(delivered.payload)["from"] == json.loads(sender)


def test_signal_data_is_relayed_verbatim() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    data = b'{"candidate":"candidate:1 1 UDP 2122252543 10.0.0.1 54321 typ host","n":[1,2.5,null]}'
    command = SignalCmd("a", "conn-a", "edge-a", 7, 7, "r", "b", a.sender, data)
    ((_, delivered),) = deliveries(table.handle(command, 0.0))
    assert data in delivered.payload


@pytest.mark.parametrize("target", ["nobody", "c"])
def test_signal_to_a_non_member_is_unknown_peer(target: str) -> None:
    table = make_table(capacity=3)
    a, b, c = sess("a"), sess("b"), sess("c")
    joined(table, a, "r")
    offset = joined(table, b, "r")["offset"]
    joined(table, c, "other")  # c exists, but in another room
    out = table.handle(a.signal("r", target, req="s"), 0.0)
    error = reply(out, a)
    assert (error["type"], error["code"], error["id"]) == ("error", "unknown_peer", "s")
    assert deliveries(out) == []
    assert last_offset(table, "r", a, b) == offset  # no event recorded


def test_signal_to_self_is_unknown_peer() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    out = table.handle(a.signal("r", "a"), 0.0)
    assert reply(out, a)["code"] == "unknown_peer"
    assert deliveries(out) == []


@pytest.mark.parametrize("room_exists", [True, False])
def test_signal_when_not_a_member_is_not_in_room(room_exists: bool) -> None:
    table = make_table(capacity=3)
    a, b, c = sess("a"), sess("b"), sess("c")
    if room_exists:
        joined(table, a, "r")
        joined(table, b, "r")
    out = table.handle(c.signal("r", "a" if room_exists else None, req=9), 0.0)
    error = reply(out, c)
    assert (error["type"], error["code"], error["id"]) == ("error", "not_in_room", 9)
    assert deliveries(out) == []


def test_signal_without_to_fans_out_to_every_other_member() -> None:
    table = make_table(capacity=5)
    members = [sess(f"s{i}", edge="edge-x" if i % 2 else "edge-y") for i in range(5)]
    for s in members:
        joined(table, s, "r")
    sender, others = members[0], members[1:]
    out = table.handle(sender.signal("r", None, {"hello": "all"}), 0.0)
    assert to(sender, out) == []
    offsets = set()
    for s in others:
        (frame,) = to(s, out)
        assert frame["data"] == {"hello": "all"}
        assert frame["from"] == {"session": "s0", "user": "user-s0"}
        offsets.add(frame["offset"])
    assert len(offsets) == 1  # one event, one offset
    # One Deliver per edge, listing that edge's recipients.
    by_edge = {t: sorted(e.sessions) for t, e in deliveries(out)}
    assert by_edge == {"edge-x": ["s1", "s3"], "edge-y": ["s2", "s4"]}


def test_a_targeted_signal_reaches_only_its_target() -> None:
    table = make_table(capacity=5)
    members = [sess(f"s{i}", edge="edge-shared") for i in range(5)]
    for s in members:
        joined(table, s, "r")
    out = table.handle(members[1].signal("r", "s3"), 0.0)
    assert [(t, e.sessions) for t, e in deliveries(out)] == [("edge-shared", ["s3"])]


@pytest.mark.parametrize("with_target", [True, False])
def test_ack_only_when_the_request_has_an_id(with_target: bool) -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    out = table.handle(a.signal("r", "b" if with_target else None, req=None), 0.0)
    ((edge, envelope),) = replies(out)
    # Still a Reply (it tells the edge the request was routed), but nothing to write.
    assert (edge, envelope.session, envelope.conn, envelope.seq) == ("edge-a", "a", "conn-a", a.seq)
    assert envelope.payload == b""
    assert [f["type"] for f in to(b, out)] == ["signal"]


def test_errors_without_an_id_carry_no_id() -> None:
    table = make_table()
    a = sess("a")
    ((_, envelope),) = replies(table.handle(a.signal("r", None, req=None), 0.0))
    frame = json.loads(envelope.payload)
    assert frame["type"] == "error" and frame["code"] == "not_in_room"
    assert "id" not in frame


@pytest.mark.parametrize("req", [0, 1, -7, 2**53, "a", "req-\u00e9\u4e2d", "x" * 64])
def test_every_reply_and_error_echoes_the_request_id(req: RequestId) -> None:
    table = make_table()
    a, b, c = sess("a"), sess("b"), sess("c")

    def rid(i: int) -> RequestId:
        # One id per request of a session (the same id is the same request): ``req`` first.
        if i == 0:
            return req
        return req + i if isinstance(req, int) else f"{i}{req}"[:64]

    cases = [
        (a, lambda: a.join("r", req=rid(0)), "joined"),
        (b, lambda: b.join("r", req=rid(0)), "joined"),
        (b, lambda: b.join("r", req=rid(1)), "joined"),  # again: no-op
        (c, lambda: c.join("r", req=rid(0)), "room_full"),
        (a, lambda: a.signal("r", "b", req=rid(1)), "ack"),
        (a, lambda: a.signal("r", None, req=rid(2)), "ack"),  # fan-out
        (a, lambda: a.signal("r", "zz", req=rid(3)), "unknown_peer"),
        (c, lambda: c.signal("r", "a", req=rid(1)), "not_in_room"),
        (c, lambda: c.leave("r", req=rid(2)), "not_in_room"),
        (b, lambda: b.leave("r", req=rid(2)), "left"),
    ]
    for s, make_command, kind in cases:
        command = make_command()
        frame = reply(table.handle(command, 0.0), s)
        assert kind in (frame["type"], frame.get("code")), (command, frame)
        assert frame["id"] == command.req
        assert type(frame["id"]) is type(req)


# ------------------------------------------------------------------------ offsets, routing


def test_offsets_grow_by_one_per_event_and_each_room_counts_alone() -> None:
    table = make_table(capacity=3)
    a, b, c = sess("a"), sess("b"), sess("c")
    seen: list[int] = []
    joined(table, a, "r1")
    joined(table, a, "r2")
    seen.append(joined(table, b, "r1")["offset"])  # peer-joined b
    r2_before = joined(table, c, "r2")["offset"]
    for _ in range(3):
        (frame,) = to(b, table.handle(a.signal("r1", "b"), 0.0))
        seen.append(frame["offset"])
    (frame,) = to(a, table.handle(c.join("r1"), 0.0))  # peer-joined c
    seen.append(frame["offset"])
    (frame,) = to(a, table.handle(b.leave("r1"), 0.0))  # peer-left b
    seen.append(frame["offset"])
    assert seen == list(range(seen[0], seen[0] + 6))
    # r2 recorded nothing meanwhile.
    (frame,) = to(c, table.handle(a.signal("r2", "c"), 0.0))
    assert frame["offset"] == r2_before + 1


def test_a_session_only_receives_events_meant_for_it_so_its_offsets_have_gaps() -> None:
    table = make_table(capacity=3)
    a, b, c = sess("a"), sess("b"), sess("c")
    for s in (a, b, c):
        joined(table, s, "r")
    out = []
    for target in ("b", "c", "b", None, "c"):
        out += table.handle(a.signal("r", target), 0.0)
    b_offsets = [f["offset"] for f in to(b, out)]
    c_offsets = [f["offset"] for f in to(c, out)]
    assert len(b_offsets) == 3 and len(c_offsets) == 3
    assert b_offsets == sorted(b_offsets) and c_offsets == sorted(c_offsets)
    assert set(b_offsets) & set(c_offsets) == {b_offsets[2]}  # only the fan-out is shared
    assert to(a, out) == []


def test_the_reply_leaves_last_after_the_deliveries_it_acknowledges() -> None:
    # "ack once the cluster has accepted the signal for routing": the deliveries are handed
    # over first, so a broker that dies before the reply leaves has not acked (the edge then
    # retries and the target's edge drops the copy). See broker/rooms.py ``_request``.
    table = make_table(capacity=4)
    members = [sess(f"s{i}") for i in range(4)]
    for s in members[:3]:
        joined(table, s, "r")
    for out in (
        table.handle(members[3].join("r"), 0.0),
        table.handle(members[0].signal("r", None), 0.0),
        table.handle(members[0].signal("r", "s2"), 0.0),
        table.handle(members[1].leave("r"), 0.0),
    ):
        kinds = [type(e) for _, e in out]
        assert kinds[-1] is Reply and kinds.count(Reply) == 1
        assert Deliver in kinds


# ---------------------------------------------------------------------- detach and expire


def test_a_dropped_connection_suspends_then_times_out_after_the_resume_window() -> None:
    table = make_table(capacity=3)
    a, b, c = sess("a"), sess("b"), sess("c")
    for s in (a, b, c):
        joined(table, s, "r")
    assert table.handle(b.detach(ended=False), 100.0) == []  # nobody is told
    assert table.next_deadline() == 100.0 + WINDOW
    # Suspended: still a member (signals to it are accepted), but nothing is sent to it.
    out = table.handle(a.signal("r", "b"), 110.0)
    assert reply(out, a)["type"] == "ack"
    assert deliveries(out) == []
    assert table.expire(100.0 + WINDOW - 0.001) == []
    out = table.expire(100.0 + WINDOW)
    for s in (a, c):
        (frame,) = to(s, out)
        assert frame["type"] == "peer-left"
        assert frame["reason"] == "timeout"
        assert frame["peer"]["session"] == "b"
    assert to(b, out) == []
    assert table.next_deadline() is None
    assert table.expire(1000.0) == []  # only once
    assert reply(table.handle(b.signal("r", "a"), 200.0), b)["code"] == "not_in_room"


def test_a_clean_close_ends_the_session_in_every_room_at_once() -> None:
    table = make_table()
    a, b, c = sess("a"), sess("b"), sess("c")
    joined(table, a, "r1")
    joined(table, b, "r1")
    joined(table, c, "r2")
    joined(table, b, "r2")
    out = table.handle(b.detach(ended=True), 5.0)
    for s, room in ((a, "r1"), (c, "r2")):
        (frame,) = to(s, out)
        assert (frame["type"], frame["room"], frame["reason"]) == (
            "peer-left",
            room,
            "disconnected",
        )
        assert frame["peer"]["session"] == "b"
    assert replies(out) == []
    assert table.next_deadline() is None
    assert table.expire(1e9) == []


def test_ending_a_suspended_session_reports_disconnected() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    table.handle(b.detach(ended=False), 0.0)
    (frame,) = to(a, table.handle(b.detach(ended=True), 1.0))
    assert frame["reason"] == "disconnected"
    assert table.next_deadline() is None


@pytest.mark.parametrize("ended", [True, False])
def test_a_stale_detach_from_another_connection_is_ignored(ended: bool) -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    b2 = b.moved("conn-b2", "edge-b2")
    table.handle(b2.attach({}), 1.0)
    assert table.handle(b.detach(ended), 2.0) == []  # the old connection's report
    assert table.next_deadline() is None
    assert table.expire(1e9) == []
    out = table.handle(a.signal("r", "b"), 3.0)
    assert [f["type"] for f in to(b2, out)] == ["signal"]


def test_detach_of_an_unknown_session_does_nothing() -> None:
    table = make_table()
    assert table.handle(sess("ghost").detach(ended=True), 0.0) == []
    assert table.handle(sess("ghost").detach(ended=False), 0.0) == []
    assert table.next_deadline() is None


def test_next_deadline_is_the_earliest_suspension() -> None:
    table = make_table(capacity=3)
    a, b, c = sess("a"), sess("b"), sess("c")
    assert table.next_deadline() is None
    for s in (a, b, c):
        joined(table, s, "r")
    assert table.next_deadline() is None
    table.handle(b.detach(ended=False), 20.0)
    table.handle(c.detach(ended=False), 10.0)
    assert table.next_deadline() == 10.0 + WINDOW
    table.expire(10.0 + WINDOW)
    assert table.next_deadline() == 20.0 + WINDOW
    table.handle(b.moved("conn-b2").attach({}), 21.0)
    assert table.next_deadline() is None


def test_edge_lost_suspends_the_sessions_of_that_edge_only() -> None:
    table = make_table(capacity=4)
    a, b = sess("a", "edge-1"), sess("b", "edge-1")
    c, d = sess("c", "edge-2"), sess("d", "edge-2")
    for s in (a, b, c, d):
        joined(table, s, "r")
    assert table.edge_lost("edge-1", 50.0) == []
    assert table.next_deadline() == 50.0 + WINDOW
    assert sorted(table.sessions_on("edge-1")) == []
    assert sorted(table.sessions_on("edge-2")) == ["c", "d"]
    out = table.handle(c.signal("r", None), 51.0)
    assert [t for t, _ in deliveries(out)] == ["edge-2"]  # only d, nothing to edge-1
    assert to(d, out)[0]["type"] == "signal"
    out = table.expire(50.0 + WINDOW)
    left = sorted(f["peer"]["session"] for f in to(c, out))
    assert left == ["a", "b"]
    assert all(f["reason"] == "timeout" for f in to(c, out) + to(d, out))


def test_edge_lost_does_not_extend_an_earlier_suspension() -> None:
    table = make_table()
    a, b = sess("a", "edge-1"), sess("b", "edge-2")
    joined(table, a, "r")
    joined(table, b, "r")
    table.handle(a.detach(ended=False), 0.0)
    table.edge_lost("edge-1", 20.0)
    assert table.next_deadline() == WINDOW
    (frame,) = to(b, table.expire(WINDOW))
    assert frame["reason"] == "timeout"


# ------------------------------------------------------------------------------ attach


def position(frame: Frame, epoch: str) -> RoomPosition:
    return RoomPosition(epoch, int(frame["offset"]))


def test_attach_rehomes_replays_what_was_missed_in_order_then_recovered_true() -> None:
    table = make_table(capacity=3)
    a, b, c = sess("a"), sess("b"), sess("c")
    first = joined(table, a, "r")
    joined(table, b, "r")
    last_seen = to(b, table.handle(a.signal("r", "b", {"i": 0}), 1.0))[-1]
    epoch = first["epoch"]
    table.handle(b.detach(ended=False), 2.0)
    missed = []
    for i in range(1, 4):
        out = table.handle(a.signal("r", "b", {"i": i}), 3.0)
        assert deliveries(out) == []
        missed.append({"i": i})
    out = table.handle(c.join("r"), 4.0)  # a peer-joined meant for b (and a)
    c_joined_at = to(a, out)[0]["offset"]
    table.handle(a.signal("r", "c", {"not": "for b"}), 5.0)  # not meant for b

    b2 = b.moved("conn-b2", "edge-b2")
    out = table.handle(b2.attach({"r": position(last_seen, epoch)}), 6.0)
    assert all(t == "edge-b2" for t, _ in out)  # everything goes to the new edge
    frames = to(b2, out)
    assert [f["type"] for f in frames] == ["signal"] * 3 + ["peer-joined", "recovered"]
    assert [f["data"] for f in frames[:3]] == missed
    assert frames[3]["peer"]["session"] == "c"
    assert frames[3]["offset"] == c_joined_at
    # In order, without duplicates, starting right after the position.
    start = last_seen["offset"] + 1
    assert [f["offset"] for f in frames[:4]] == list(range(start, start + 4))
    assert frames[-1] == {"type": "recovered", "room": "r", "recovered": True}
    # Live events now follow the session to its new edge and connection.
    out = table.handle(a.signal("r", "b"), 7.0)
    assert [t for t, _ in deliveries(out)] == ["edge-b2"]
    assert table.next_deadline() is None


def test_attach_replays_events_after_the_position_even_those_sent_live_before_the_drop() -> None:
    # Frames in flight when the connection dropped never reached the client: the client's
    # position, not what the broker sent, decides the replay.
    table = make_table()
    a, b = sess("a"), sess("b")
    epoch = joined(table, a, "r")["epoch"]
    base = joined(table, b, "r")
    live = [to(b, table.handle(a.signal("r", "b", {"i": i}), 1.0))[0] for i in range(3)]
    table.handle(b.detach(ended=False), 2.0)
    b2 = b.moved("conn-b2")
    frames = to(b2, table.handle(b2.attach({"r": position(live[0], epoch)}), 3.0))
    assert frames == [*live[1:], {"type": "recovered", "room": "r", "recovered": True}]
    # From the joined offset: everything since joining.
    b3 = b2.moved("conn-b3")
    table.handle(b2.detach(ended=False), 4.0)
    frames = to(b3, table.handle(b3.attach({"r": position(base, epoch)}), 5.0))
    assert frames == [*live, {"type": "recovered", "room": "r", "recovered": True}]


def test_attach_at_the_latest_offset_replays_nothing_and_recovers() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    epoch = joined(table, a, "r")["epoch"]
    joined(table, b, "r")
    last = to(b, table.handle(a.signal("r", "b"), 1.0))[0]
    table.handle(b.detach(ended=False), 2.0)
    b2 = b.moved("conn-b2")
    assert to(b2, table.handle(b2.attach({"r": position(last, epoch)}), 3.0)) == [
        {"type": "recovered", "room": "r", "recovered": True}
    ]


def test_attach_without_a_drop_rehomes_an_attached_session() -> None:
    # The client reconnected before its old connection's drop was noticed.
    table = make_table()
    a, b = sess("a"), sess("b")
    epoch = joined(table, a, "r")["epoch"]
    base = joined(table, b, "r")
    b2 = b.moved("conn-b2", "edge-b2")
    assert to(b2, table.handle(b2.attach({"r": position(base, epoch)}), 1.0)) == [
        {"type": "recovered", "room": "r", "recovered": True}
    ]
    assert [t for t, _ in deliveries(table.handle(a.signal("r", "b"), 2.0))] == ["edge-b2"]


@pytest.mark.parametrize(
    "make_position",
    [
        pytest.param(lambda epoch, offset: RoomPosition("epoch-999", offset), id="wrong-epoch"),
        pytest.param(lambda epoch, offset: RoomPosition(epoch, offset + 50), id="future-offset"),
        pytest.param(lambda epoch, offset: None, id="no-position"),
    ],
)
def test_attach_that_cannot_recover_says_false_and_replays_nothing(make_position: Any) -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    epoch = joined(table, a, "r")["epoch"]
    base = joined(table, b, "r")
    table.handle(b.detach(ended=False), 1.0)
    table.handle(a.signal("r", "b"), 2.0)
    given = make_position(epoch, base["offset"])
    b2 = b.moved("conn-b2", "edge-b2")
    out = table.handle(b2.attach({} if given is None else {"r": given}), 3.0)
    assert to(b2, out) == [{"type": "recovered", "room": "r", "recovered": False}]
    # Still re-homed: the session stays a member and live events reach its new edge.
    assert table.next_deadline() is None
    assert [t for t, _ in deliveries(table.handle(a.signal("r", "b"), 4.0))] == ["edge-b2"]


def test_attach_for_a_room_the_session_is_not_in_is_recovered_false() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    epoch = joined(table, a, "r")["epoch"]
    joined(table, b, "other")
    out = table.handle(b.moved("conn-b2").attach({"r": RoomPosition(epoch, 0)}), 1.0)
    frames = to(b.moved("conn-b2"), out)
    assert {"type": "recovered", "room": "r", "recovered": False} in frames
    assert all(f["type"] == "recovered" for f in frames)
    assert to(a, out) == []
    # Attach did not make b a member of r.
    assert reply(table.handle(a.signal("r", "b"), 2.0), a)["code"] == "unknown_peer"


def test_attach_for_a_room_that_does_not_exist_is_recovered_false_and_creates_nothing() -> None:
    table = make_table()
    b = sess("b")
    out = table.handle(b.attach({"gone": RoomPosition("epoch-0", 3)}), 0.0)
    assert to(b, out) == [{"type": "recovered", "room": "gone", "recovered": False}]
    assert "gone" not in table.rooms


def test_attach_after_the_resume_window_lapsed_is_recovered_false() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    epoch = joined(table, a, "r")["epoch"]
    base = joined(table, b, "r")
    table.handle(b.detach(ended=False), 0.0)
    table.expire(WINDOW)
    b2 = b.moved("conn-b2")
    out = table.handle(b2.attach({"r": position(base, epoch)}), WINDOW + 1)
    assert to(b2, out) == [{"type": "recovered", "room": "r", "recovered": False}]
    assert to(a, out) == []


def test_attach_with_nothing_to_report_sends_nothing() -> None:
    table = make_table()
    assert table.handle(sess("b").attach({}), 0.0) == []


def test_a_lost_report_of_a_resume_naming_no_room_is_sent_again_until_confirmed() -> None:
    # The edge has no position in a room its client did not name: only the owner's Synced
    # tells it where the stream starts (and that events may be lost). The delivery model
    # found it lost for good (seeds 1809, 2638): events went undelivered and unreported.
    table = make_table(confirming=True)
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    table.handle(b.detach(ended=False), 1.0)
    table.handle(a.signal("r", "b"), 2.0)
    b2 = b.moved("conn-b2", "edge-b2")
    (first,) = [e for _, e in table.handle(b2.attach({}), 3.0) if isinstance(e, Synced)]
    assert (first.conn, first.room, first.recovered) == ("conn-b2", "r", False)

    # That report is lost on the way: it comes again after the resend interval.
    def reports(out: list[Outbound]) -> list[Synced]:
        return [e for _, e in out if isinstance(e, Synced)]

    assert reports(table.resend_unconfirmed(3.5)) == []
    assert reports(table.resend_unconfirmed(3.0 + RESEND_AFTER)) == [first]
    # The edge took it and confirms where it stands: nothing more is sent to it.
    table.handle(Confirm("edge-b2", [("r", "b", first.epoch, first.offset, False)]), 5.0)
    assert [t for t, _ in table.resend_unconfirmed(5.0 + 10 * RESEND_AFTER)] == ["edge-a"]


def test_attach_reports_each_room_after_its_own_replay() -> None:
    table = make_table()
    a, b, c = sess("a"), sess("b"), sess("c")
    e1 = joined(table, a, "r1")["epoch"]
    p1 = joined(table, b, "r1")
    e2 = joined(table, c, "r2")["epoch"]
    p2 = joined(table, b, "r2")
    table.handle(b.detach(ended=False), 1.0)
    table.handle(a.signal("r1", "b", {"from": "r1"}), 2.0)
    table.handle(c.signal("r2", "b", {"from": "r2"}), 3.0)
    b2 = b.moved("conn-b2")
    frames = to(b2, table.handle(b2.attach({"r1": position(p1, e1), "r2": position(p2, e2)}), 4))
    assert [(f["type"], f["room"]) for f in frames] == [
        ("signal", "r1"),
        ("recovered", "r1"),
        ("signal", "r2"),
        ("recovered", "r2"),
    ]
    assert all(f["recovered"] for f in frames if f["type"] == "recovered")


def test_attach_replays_each_event_once_per_attach() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    epoch = joined(table, a, "r")["epoch"]
    base = joined(table, b, "r")
    table.handle(b.detach(ended=False), 1.0)
    for _ in range(5):
        table.handle(a.signal("r", "b"), 2.0)
    table.handle(a.signal("r", None), 2.0)
    b2 = b.moved("conn-b2")
    frames = to(b2, table.handle(b2.attach({"r": position(base, epoch)}), 3.0))
    offsets = [f["offset"] for f in frames if f["type"] == "signal"]
    assert offsets == list(range(base["offset"] + 1, base["offset"] + 7))


# ---------------------------------------------------------------------------------- history


def test_history_is_trimmed_by_count() -> None:
    table = make_table(history_max_events=3)
    a, b = sess("a"), sess("b")
    epoch = joined(table, a, "r")["epoch"]
    joined(table, b, "r")
    seen = [to(b, table.handle(a.signal("r", "b", {"i": i}), 1.0))[0] for i in range(6)]
    table.handle(b.detach(ended=False), 2.0)
    b2 = b.moved("conn-b2")
    # History holds the last 3 events (i=3, 4, 5): from i=2 on is complete ...
    frames = to(b2, table.handle(b2.attach({"r": position(seen[2], epoch)}), 3.0))
    assert [f.get("data") for f in frames] == [{"i": 3}, {"i": 4}, {"i": 5}, None]
    assert frames[-1]["recovered"] is True
    # ... from i=1 on, event i=2 is gone: cannot recover.
    table.handle(b2.detach(ended=False), 4.0)
    b3 = b2.moved("conn-b3")
    frames = to(b3, table.handle(b3.attach({"r": position(seen[1], epoch)}), 5.0))
    assert frames == [{"type": "recovered", "room": "r", "recovered": False}]


def test_history_is_trimmed_by_age() -> None:
    table = make_table(history_max_age=10.0)
    a, b = sess("a"), sess("b")
    epoch = joined(table, a, "r")["epoch"]
    base = joined(table, b, "r", now=0.0)
    table.handle(b.detach(ended=False), 0.0)
    table.handle(a.signal("r", "b", {"old": True}), 1.0)
    table.handle(a.signal("r", "b", {"new": True}), 8.0)
    table.expire(10.5)  # only the joins (t=0) are older than 10 s: b's events are all kept
    b2 = b.moved("conn-b2")
    frames = to(b2, table.handle(b2.attach({"r": position(base, epoch)}), 10.5))
    assert [f.get("data") for f in frames] == [{"old": True}, {"new": True}, None]
    assert frames[-1]["recovered"] is True
    table.handle(b2.detach(ended=False), 10.5)
    table.expire(11.5)  # now the old signal (t=1) is too old as well
    b3 = b2.moved("conn-b3")
    frames = to(b3, table.handle(b3.attach({"r": position(base, epoch)}), 11.5))
    assert frames == [{"type": "recovered", "room": "r", "recovered": False}]
    # The recent event is still there for a client that saw the old one.
    table.handle(b3.detach(ended=False), 11.5)
    b4 = b3.moved("conn-b4")
    old_offset = base["offset"] + 1
    frames = to(b4, table.handle(b4.attach({"r": RoomPosition(epoch, old_offset)}), 12.0))
    assert [f.get("data") for f in frames] == [{"new": True}, None]
    assert frames[-1]["recovered"] is True


def test_recording_an_event_also_trims_by_age() -> None:
    table = make_table(history_max_age=10.0)
    a, b = sess("a"), sess("b")
    epoch = joined(table, a, "r", now=0.0)["epoch"]
    base = joined(table, b, "r", now=0.0)
    table.handle(b.detach(ended=False), 0.0)
    table.handle(a.signal("r", "b"), 1.0)
    table.handle(a.signal("r", "b"), 20.0)  # no expire() call in between
    b2 = b.moved("conn-b2")
    frames = to(b2, table.handle(b2.attach({"r": position(base, epoch)}), 20.0))
    assert frames == [{"type": "recovered", "room": "r", "recovered": False}]


# --------------------------------------------------------------------------- room lifetime


@pytest.mark.parametrize("how", ["leave", "ended", "timeout"])
def test_an_empty_room_is_deleted_and_recreated_with_a_new_epoch(how: str) -> None:
    table = make_table()
    a = sess("a")
    old = joined(table, a, "r")
    if how == "leave":
        table.handle(a.leave("r"), 0.0)
    elif how == "ended":
        table.handle(a.detach(ended=True), 0.0)
    else:
        table.handle(a.detach(ended=False), 0.0)
        table.expire(WINDOW)
    assert "r" not in table.rooms
    b = sess("b")
    new = joined(table, b, "r", now=WINDOW + 1)
    assert new["epoch"] != old["epoch"]
    assert new["members"] == []
    # A client resuming with the old epoch cannot recover.
    out = table.handle(a.moved("conn-a2").attach({"r": position(old, old["epoch"])}), 40.0)
    assert to(a.moved("conn-a2"), out) == [{"type": "recovered", "room": "r", "recovered": False}]


def test_a_room_with_a_suspended_member_is_kept() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    first = joined(table, a, "r")
    joined(table, b, "r")
    table.handle(b.detach(ended=False), 0.0)
    table.handle(a.leave("r"), 1.0)
    assert "r" in table.rooms
    c = sess("c")
    assert joined(table, c, "r", now=2.0)["epoch"] == first["epoch"]


# -------------------------------------------------------------------------------- dedup


def test_a_retried_signal_gets_the_same_reply_and_records_no_second_event() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    offset = joined(table, b, "r")["offset"]
    command = a.signal("r", "b", req="s1")
    first = table.handle(command, 1.0)
    again = table.handle(command, 2.0)
    assert replies(again) == replies(first)
    # Its event reaches b through b's delivery stream (resent until confirmed), not again.
    assert deliveries(again) == []
    assert last_offset(table, "r", a, b) == offset + 1


def test_a_retried_join_gets_the_same_joined_and_records_no_second_event() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    command = b.join("r")
    first = reply(table.handle(command, 0.0), b)
    table.handle(a.signal("r", "b"), 1.0)  # the room moves on meanwhile
    again = reply(table.handle(command, 2.0), b)
    assert again == first
    assert last_offset(table, "r", a, b) == first["offset"] + 1


def test_a_retried_join_delivers_no_second_peer_joined() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    command = b.join("r")
    assert len(to(a, table.handle(command, 0.0))) == 1
    assert deliveries(table.handle(command, 1.0)) == []


def test_a_retried_leave_delivers_no_second_peer_left() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    command = b.leave("r")
    assert len(to(a, table.handle(command, 0.0))) == 1
    assert deliveries(table.handle(command, 1.0)) == []


def test_a_retried_leave_gets_left_again_not_an_error() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    command = b.leave("r", req="bye")
    first = reply(table.handle(command, 0.0), b)
    assert (
        reply(table.handle(command, 1.0), b) == first == {"type": "left", "id": "bye", "room": "r"}
    )


def test_a_retried_refusal_gets_the_same_error() -> None:
    table = make_table()
    a, b, c = sess("a"), sess("b"), sess("c")
    joined(table, a, "r")
    joined(table, b, "r")
    command = c.join("r")
    first = reply(table.handle(command, 0.0), c)
    table.handle(b.leave("r"), 1.0)  # a seat is free now, but a retry is not a new request
    out = table.handle(command, 2.0)
    assert reply(out, c) == first
    assert deliveries(out) == []


def test_the_same_client_id_on_a_new_connection_is_the_same_request() -> None:
    # A client that resumes resends what was not answered with the same id: applied once.
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    first = table.handle(a.signal("r", "b", {"sdp": 1}, req="x1"), 0.0)
    a2 = a.moved("conn-a2", "edge-z")
    table.handle(a2.attach({}), 1.0)
    again = table.handle(a2.signal("r", "b", {"sdp": 1}, req="x1"), 2.0)
    assert reply(again, a2) == reply(first, a)
    assert deliveries(again) == []
    assert last_offset(table, "r", a2, b) == to(b, first)[0]["offset"]


def test_without_an_id_the_same_seq_on_a_new_connection_is_a_new_request() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    first = table.handle(a.signal("r", "b", req=None), 0.0)
    a2 = a.moved("conn-a2")
    table.handle(a2.attach({}), 1.0)
    a2.seq = a.seq - 1  # a new connection numbers its requests from the same point
    second = table.handle(a2.signal("r", "b", req=None), 2.0)
    assert to(b, second)[0]["offset"] == to(b, first)[0]["offset"] + 1


def test_an_id_used_again_for_another_request_is_refused_and_changes_nothing() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    table.handle(a.signal("r", "b", {"sdp": 1}, req=7), 0.0)
    offset = last_offset(table, "r", a, b)
    for other in (lambda: a.leave("r", req=7), lambda: a.signal("r", "b", {"sdp": 2}, req=7)):
        out = table.handle(other(), 1.0)
        assert reply(out, a)["code"] == "bad_request"
        assert deliveries(out) == []
    assert last_offset(table, "r", a, b) == offset + 1  # a is still a member, nothing sent
    # The same id in another room is another request.
    assert reply(table.handle(a.join("r2", req="j"), 2.0), a)["type"] == "joined"
    assert reply(table.handle(a.signal("r2", None, req=7), 2.0), a)["type"] == "ack"


@pytest.mark.parametrize("req", [7, "seven", None])
def test_a_resent_signal_is_answered_with_the_same_ack_and_applied_once(req: Any) -> None:
    # A record keeps no ack frame (it is made again from the resend's id): the answer to a
    # resend must still be byte for byte the first one.
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    command = a.signal("r", "b", req=req)
    first = table.handle(command, 1.0)
    again = table.handle(command, 2.0)
    assert [r.payload for _, r in replies(again)] == [r.payload for _, r in replies(first)]
    assert len(to(b, first)) == 1 and to(b, again) == []
    if req is not None:
        assert reply(again, a) == {"type": "ack", "id": req}


def test_reply_records_are_bounded_by_count_and_age() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r", now=0.0)
    joined(table, b, "r", now=0.0)
    first = a.signal("r", "b", req="first")
    table.handle(first, 0.0)
    for n in range(REPLY_RECORDS_PER_SESSION - 1):
        table.handle(a.signal("r", "b", req=f"n{n}"), 0.0)
    assert deliveries(table.handle(first, 1.0)) == []  # still recorded: the 256th
    table.handle(a.signal("r", "b", req="one-more"), 1.0)
    assert len(to(b, table.handle(first, 2.0))) == 1  # pushed out: applied anew
    late = a.signal("r", "b", req="late")
    table.handle(late, 3.0)
    assert deliveries(table.handle(late, 3.0 + REPLY_RECORD_TTL - 1)) == []
    assert len(to(b, table.handle(late, 3.0 + REPLY_RECORD_TTL))) == 1  # too old: anew


def test_a_stale_ended_detach_keeps_the_live_connections_retry_cache() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    a2 = a.moved("conn-a2", "edge-a2")
    table.handle(a2.attach({}), 1.0)
    command = a2.signal("r", "b")
    first = table.handle(command, 2.0)
    offset = to(b, first)[0]["offset"]
    table.handle(a.detach(ended=True), 3.0)  # late report of the old connection's close
    table.handle(command, 4.0)  # the edge retries (e.g. after a broker set change)
    assert last_offset(table, "r", a2, b) == offset


def test_many_requests_later_a_retry_is_still_recognised() -> None:
    table = make_table()
    a, b = sess("a"), sess("b")
    joined(table, a, "r")
    joined(table, b, "r")
    command = a.signal("r", "b")
    table.handle(command, 0.0)
    for _ in range(10):
        table.handle(a.signal("r", "b"), 0.0)
    offset = last_offset(table, "r", a, b)
    table.handle(command, 1.0)
    assert last_offset(table, "r", a, b) == offset + 1


# ------------------------------------------------------------------ property: isolation
# Random command sequences against an independent reference model of membership and of
# every event's recipients. After each command: every Deliver is an event of the room it
# names, meant for (and sent to the edge of) each listed session, and delivered once; what
# an attached member is owed has arrived; the table's membership equals the model's.


@dataclass
class _Seat:
    conn: str
    edge: str
    suspended_until: float | None = None


@dataclass
class _Model:
    """Who is a member of what, where they are, and which events each one is owed."""

    rooms: dict[str, dict[str, _Seat]] = field(default_factory=dict)
    epochs: dict[str, str] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)
    # (room, epoch, offset) -> (frame type, session the event is about, recipients)
    events: dict[tuple[str, str, int], tuple[str, str, frozenset[str]]] = field(
        default_factory=dict
    )
    # (session, room) -> offsets of events meant for it that it has not received
    owed: dict[tuple[str, str], set[int]] = field(default_factory=dict)
    # (session, room) -> offsets it was told it lost (recovered: false); may still come
    lost: dict[tuple[str, str], set[int]] = field(default_factory=dict)

    def of(self, session: str) -> list[str]:
        return sorted(r for r, seats in self.rooms.items() if session in seats)

    def record(self, room: str, kind: str, subject: str, recipients: set[str]) -> None:
        self.offsets[room] += 1
        offset = self.offsets[room]
        self.events[room, self.epochs[room], offset] = (kind, subject, frozenset(recipients))
        for session in recipients:
            self.owed.setdefault((session, room), set()).add(offset)

    def create(self, room: str, epoch: str) -> None:
        assert room not in self.rooms
        assert epoch not in self.epochs.values()
        self.rooms[room], self.epochs[room], self.offsets[room] = {}, epoch, 0

    def add(self, room: str, session: str, seat: _Seat) -> None:
        self.record(room, "peer-joined", session, set(self.rooms[room]))
        self.rooms[room][session] = seat

    def remove(self, room: str, session: str) -> None:
        del self.rooms[room][session]
        self.owed.pop((session, room), None)
        self.lost.pop((session, room), None)
        if self.rooms[room]:
            self.record(room, "peer-left", session, set(self.rooms[room]))
        else:
            del self.rooms[room], self.epochs[room], self.offsets[room]

    def suspend(self, seat: _Seat, now: float) -> None:
        seat.suspended_until = now + WINDOW


@dataclass
class _Client:
    session: Sess
    connected: bool = True
    old_conns: list[str] = field(default_factory=list)
    # room -> (epoch, last offset seen): what a real client resumes with
    seen: dict[str, tuple[str, int]] = field(default_factory=dict)


def _check_output(out: list[Outbound], model: _Model, clients: dict[str, _Client]) -> int:
    """Check every Deliver against the model (after the command); return how many."""
    count = 0
    for target, envelope in out:
        if isinstance(envelope, Synced):
            if not envelope.report:
                continue
            sessions = [envelope.session]  # the recovered frame its edge writes
            frame = {"type": "recovered", "room": envelope.room, "recovered": envelope.recovered}
        elif isinstance(envelope, Deliver):
            sessions = envelope.sessions
            frame = json.loads(envelope.payload)
        else:
            continue
        count += 1
        room = frame["room"]
        assert len(set(sessions)) == len(sessions)
        for session in sessions:
            client = clients[session]
            assert target == client.session.edge, (session, target, frame)
            key = (session, room)
            if frame["type"] == "recovered":
                if frame["recovered"]:
                    assert not model.owed.get(key), (session, "recovered but owed", model.owed)
                else:
                    model.lost.setdefault(key, set()).update(model.owed.pop(key, set()))
                continue
            seat = model.rooms.get(room, {}).get(session)
            assert seat is not None, f"{session} got {frame} from {room}, not its room"
            assert seat.suspended_until is None, f"{session} is suspended in {room}"
            kind, subject, recipients = model.events[room, model.epochs[room], frame["offset"]]
            assert frame["type"] == kind
            about = frame["from"] if kind == "signal" else frame["peer"]
            assert about["session"] == subject
            assert session in recipients, f"{session} got {frame}, meant for {recipients}"
            if frame["offset"] in model.owed.get(key, set()):
                model.owed[key].discard(frame["offset"])
            else:
                assert frame["offset"] in model.lost.get(key, set()), ("duplicate", session, frame)
                model.lost[key].discard(frame["offset"])
            # Per room and epoch, a client's offsets only move forward.
            epoch, last = client.seen.get(room, ("", -1))
            if epoch == model.epochs[room]:
                assert frame["offset"] > last, (session, frame, last)
            client.seen[room] = (model.epochs[room], frame["offset"])
    # What an attached member is owed reached it in this very command.
    for room, seats in model.rooms.items():
        for session, seat in seats.items():
            if seat.suspended_until is None:
                assert not model.owed.get((session, room)), (session, room, model.owed)
    return count


def _run_random_scenario(seed: int, history_max_events: int) -> int:
    rng = random.Random(seed)
    capacity = rng.randint(2, 4)
    long_history = history_max_events >= 10_000
    table = make_table(
        capacity=capacity,
        history_max_events=history_max_events,
        history_max_age=1e9 if long_history else 20.0,
    )
    model = _Model()
    rooms = ["r0", "r1", "r2"]
    edges = ["e0", "e1", "e2"]
    clients: dict[str, _Client] = {}
    names = itertools.count()
    conns = itertools.count()
    now = 0.0
    delivered = 0

    def new_client() -> None:
        name = f"s{next(names)}"
        clients[name] = _Client(Sess(name, f"u{name}", f"c{next(conns)}", rng.choice(edges)))

    for _ in range(6):
        new_client()

    for _step in range(300):
        now += rng.choice([0.0, 0.5, 3.0, 12.0])
        live = [c for c in clients.values() if c.connected]
        waiting = [c for c in clients.values() if not c.connected and model.of(c.session.session)]
        kind = rng.choices(
            ["join", "leave", "signal", "drop", "end", "attach", "stale", "edge", "expire", "new"],
            weights=[14, 5, 30, 5, 3, 6, 3, 1, 4, 2],
        )[0]
        out: list[Outbound] = []
        if kind == "new" or (not live and kind in {"join", "leave", "signal", "drop", "end"}):
            new_client()
        elif kind == "join":
            c = rng.choice(live)
            s, room = c.session, rng.choice(rooms)
            out = table.handle(s.join(room), now)
            frame = reply(out, s)
            seats = model.rooms.get(room, {})
            if s.session in seats:
                assert frame["type"] == "joined"
                seats[s.session] = _Seat(s.conn, s.edge)
            elif len(seats) >= capacity:
                assert frame["code"] == "room_full"
            else:
                assert frame["type"] == "joined", frame
                assert {m["session"] for m in frame["members"]} == set(seats)
                if not seats:
                    model.create(room, frame["epoch"])
                model.add(room, s.session, _Seat(s.conn, s.edge))
            if frame["type"] == "joined":
                assert (frame["epoch"], frame["offset"]) == (
                    model.epochs[room],
                    model.offsets[room],
                )
                c.seen[room] = (frame["epoch"], frame["offset"])
        elif kind == "leave":
            s = rng.choice(live).session
            room = rng.choice(model.of(s.session) or rooms)
            out = table.handle(s.leave(room), now)
            frame = reply(out, s)
            if s.session in model.rooms.get(room, {}):
                assert frame["type"] == "left"
                model.remove(room, s.session)
            else:
                assert frame["code"] == "not_in_room"
        elif kind == "signal":
            s = rng.choice(live).session
            room = rng.choice(model.of(s.session) or rooms)
            seats = model.rooms.get(room, {})
            target = rng.choice([None, *clients])
            out = table.handle(s.signal(room, target), now)
            frame = reply(out, s)
            if s.session not in seats:
                assert frame["code"] == "not_in_room"
            elif target is not None and (target not in seats or target == s.session):
                assert frame["code"] == "unknown_peer"
            else:
                assert frame["type"] == "ack"
                model.record(
                    room, "signal", s.session, {target} if target else set(seats) - {s.session}
                )
        elif kind in {"drop", "end"}:
            c = rng.choice(live)
            s = c.session
            out = table.handle(s.detach(ended=kind == "end"), now)
            c.connected = False
            for room in model.of(s.session):
                if kind == "end":
                    model.remove(room, s.session)
                else:
                    model.suspend(model.rooms[room][s.session], now)
        elif kind == "attach" and waiting:
            c = rng.choice(waiting)
            c.old_conns.append(c.session.conn)
            c.session = c.session.moved(f"c{next(conns)}", rng.choice(edges))
            c.connected = True
            positions = {r: RoomPosition(*c.seen[r]) for r in c.seen if rng.random() < 0.9}
            mine = model.of(c.session.session)
            for room in mine:
                model.rooms[room][c.session.session] = _Seat(c.session.conn, c.session.edge)
            out = table.handle(c.session.attach(positions), now)
            frames = to(c.session, out)
            reported = {f["room"]: f["recovered"] for f in frames if f["type"] == "recovered"}
            assert set(reported) == set(mine) | set(positions)
            for room, recovered in reported.items():
                if room not in mine or room not in positions:
                    assert recovered is False
                elif long_history and positions[room].epoch == model.epochs[room]:
                    assert recovered is True  # nothing was ever trimmed
        elif kind == "stale":
            stale = [c for c in clients.values() if c.old_conns]
            if stale:
                c = rng.choice(stale)
                old = c.session.moved(rng.choice(c.old_conns))
                assert table.handle(old.detach(ended=rng.random() < 0.5), now) == []
        elif kind == "edge":
            edge = rng.choice(edges)
            out = table.edge_lost(edge, now)
            for seats in model.rooms.values():
                for seat in seats.values():
                    if seat.edge == edge and seat.suspended_until is None:
                        model.suspend(seat, now)
            for c in clients.values():
                if c.session.edge == edge:
                    c.connected = False
        elif kind == "expire":
            out = table.expire(now)
            for room in list(model.rooms):
                lapsed = [
                    session
                    for session, seat in model.rooms[room].items()
                    if seat.suspended_until is not None and seat.suspended_until <= now
                ]
                for session in lapsed:
                    model.remove(room, session)
        for c in [c for c in clients.values() if not c.connected]:
            if not model.of(c.session.session) and kind in {"end", "expire"}:
                del clients[c.session.session]  # gone for good
        delivered += _check_output(out, model, {**clients, **_everyone(out, clients)})
        # The table agrees with the model on every membership and epoch.
        assert set(table.rooms) == set(model.rooms)
        for room, seats in model.rooms.items():
            assert set(table.rooms[room].members) == set(seats), room
            assert table.rooms[room].epoch == model.epochs[room]
        assert table.next_deadline() == min(
            (
                seat.suspended_until
                for seats in model.rooms.values()
                for seat in seats.values()
                if seat.suspended_until is not None
            ),
            default=None,
        )
    return delivered


def _everyone(out: list[Outbound], clients: dict[str, _Client]) -> dict[str, _Client]:
    """Sessions named in ``out`` that the driver no longer tracks: a Deliver to one fails."""
    named = {s for _, e in deliveries(out) for s in e.sessions}
    return {s: _Client(Sess(s, "", "", "<gone>"), False) for s in named - clients.keys()}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("history_max_events", [4, 100_000], ids=["short-history", "long"])
def test_nobody_receives_anything_from_a_room_it_is_not_in(
    seed: int, history_max_events: int
) -> None:
    assert _run_random_scenario(seed, history_max_events) > 30  # the scenario did deliver


def test_only_the_edge_holding_a_seat_speaks_for_its_session() -> None:
    # An edge (admitted, sending under its own name) names a session whose seat is on
    # another edge: its signal, leave and detach are refused, not answered, reported, and
    # leave no reply record behind; the session's own edge is served as before.
    table = make_table()
    refusals: list[tuple[str, str]] = []
    table.refused = lambda edge, why, what: refusals.append((edge, why))
    alice, bob = sess("alice"), sess("bob")
    table.handle(alice.join("call"), 0.0)
    table.handle(bob.join("call"), 0.0)
    rogue = Sess(alice.session, alice.user, "rogue.99", "edge-rogue")
    for command in (
        rogue.signal("call", bob.session, {"forged": True}, req=7),
        rogue.leave("call"),
        rogue.detach(ended=True),  # (another connection's: ignored, as it always was)
        DetachCmd(alice.session, alice.conn, "edge-rogue", True),  # even with the conn
    ):
        assert table.handle(command, 1.0) == []
    assert [edge for edge, _ in refusals] == ["edge-rogue"] * 3
    assert "whose seat is on 'edge-alice'" in refusals[0][1]
    assert set(table.rooms["call"].members) == {alice.session, bob.session}
    out = table.handle(alice.signal("call", bob.session, {"real": True}, req=7), 2.0)
    assert [f["data"] for f in to(bob, out)] == [{"real": True}]  # id 7 is still free
    # A resume on another edge (attach from its newer connection) moves the seat; from
    # then on that edge speaks for the session and the old one does not.
    moved = alice.moved("conn-alice.2", "edge-other")
    table.handle(moved.attach({}), 3.0)
    out = table.handle(moved.signal("call", bob.session, {"after": "resume"}), 3.0)
    assert [f["data"] for f in to(bob, out)] == [{"after": "resume"}]
    assert table.handle(alice.signal("call", bob.session, {"late": True}), 3.0) == []
    assert refusals[-1][0] == "edge-alice"


def test_a_seat_moves_to_another_edge_only_on_presences_ticket() -> None:
    tickets = SeatTickets("unit-ticket-secret-0123456789abcdef")
    table = make_table()
    table.tickets = tickets
    refusals: list[str] = []
    table.refused = lambda edge, why, what: refusals.append(why)
    alice, bob = sess("alice"), sess("bob")
    table.handle(alice.join("call"), 0.0)  # the first edge heard of needs no ticket
    table.handle(bob.join("call"), 0.0)
    moved = alice.moved("conn-alice.2", "edge-other")

    def attach(ticket: bytes) -> AttachCmd:
        return AttachCmd(moved.session, moved.conn, moved.edge, {}, ticket)

    wrong = [
        moved.attach({}),  # no ticket
        attach(bytes(16)),  # made up
        attach(tickets.issue(moved.session, "edge-bob", moved.conn)),  # another edge's
        attach(tickets.issue(moved.session, moved.edge, "conn-alice.3")),  # another conn's
        moved.join("call2"),
        RestoreCmd(moved.session, moved.conn, moved.edge, "call", moved.peer, False),
        RestoreCmd(moved.session, moved.conn, moved.edge, "call", moved.peer, True),
    ]
    for command in wrong:
        assert table.handle(command, 1.0) == []
    assert len(refusals) == len(wrong)
    assert all("without presence's ticket" in why for why in refusals)
    seat = table.rooms["call"].members[alice.session]
    assert (seat.edge, seat.conn) == ("edge-alice", "conn-alice")
    assert "call2" not in table.rooms
    # With the ticket presence granted that connection on that edge: the seat moves.
    table.handle(attach(tickets.issue(moved.session, moved.edge, moved.conn)), 2.0)
    assert (seat.edge, seat.conn) == ("edge-other", "conn-alice.2")
    out = table.handle(moved.signal("call", bob.session, {"after": "resume"}), 2.0)
    assert [f["data"] for f in to(bob, out)] == [{"after": "resume"}]
    # From then on that edge needs no ticket for the session; the old edge would.
    assert table.handle(moved.join("call2"), 3.0) != []
    back = alice.moved("conn-alice.3", "edge-alice")
    assert table.handle(back.attach({}), 4.0) == []
    assert seat.edge == "edge-other"


def test_a_ticketed_restore_from_a_newer_connection_moves_a_suspended_seat() -> None:
    # A new owner whose copy has a session suspended on its old (dead) edge; the session
    # lives on another edge now, which re-announces it with presence's ticket: the seat
    # moves there and its signals are served (chaos seed 21 refused them until the seat's
    # resume window lapsed).
    tickets = SeatTickets("unit-ticket-secret-0123456789abcdef")
    table = make_table()
    table.tickets = tickets
    refusals: list[str] = []
    table.refused = lambda edge, why, what: refusals.append(why)
    alice, bob = sess("alice"), sess("bob")
    table.handle(alice.join("call"), 0.0)
    table.handle(bob.join("call"), 0.0)
    table.edge_lost(alice.edge, 1.0)
    moved = alice.moved("conn-alice.2", "edge-other")
    ticket = tickets.issue(moved.session, moved.edge, moved.conn)
    table.handle(
        RestoreCmd(moved.session, moved.conn, moved.edge, "call", moved.peer, False, ticket=ticket),
        2.0,
    )
    seat = table.rooms["call"].members[alice.session]
    assert (seat.edge, seat.conn, seat.suspended_until) == ("edge-other", "conn-alice.2", None)
    out = table.handle(moved.signal("call", bob.session, {"after": "takeover"}), 3.0)
    assert [f["data"] for f in to(bob, out)] == [{"after": "takeover"}]
    assert refusals == []
    # An older connection's re-announcement moves nothing back.
    table.handle(RestoreCmd(alice.session, alice.conn, alice.edge, "call", alice.peer, False), 4.0)
    assert (seat.edge, seat.conn) == ("edge-other", "conn-alice.2")


# ------------------------------------------------------------------ rebuilt from re-announcements


def ordered(command: SignalCmd | LeaveCmd, rseq: int) -> SignalCmd | LeaveCmd:
    """As an edge of the cluster sends it: in its connection's order to the room."""
    return msgspec.structs.replace(command, rseq=rseq, rbase=rseq)


def restore(s: Sess, room: str) -> RestoreCmd:
    return RestoreCmd(s.session, s.conn, s.edge, room, s.peer, False)


def test_a_broker_that_began_serving_leaves_a_member_it_does_not_know_unanswered() -> None:
    """A broker that restarted knows no room: a member's signal that reaches it before
    its edge's re-announcement is not refused ``not_in_room`` (the edge resends it after
    the re-announcement); once the grace is over, a stranger is refused."""
    table = make_table(confirming=True)
    table.rebuild_grace = 3.0
    table.began_serving(0.0)
    alice, bob = sess("alice"), sess("bob")
    signal = ordered(alice.signal("call", bob.session), 1)
    assert table.handle(signal, 0.5) == []  # not answered, nothing recorded
    assert table.deferred == 1
    table.handle(restore(alice, "call"), 0.6)
    assert table.handle(signal, 0.7) == []  # bob is not re-announced yet
    table.handle(restore(bob, "call"), 0.8)
    out = table.handle(signal, 1.0)  # the edge's resend
    assert reply(out, alice)["type"] == "ack"
    assert [f["data"] for f in to(bob, out) if f["type"] == "signal"] == [{"n": 1}]
    assert table.deferred == 2
    # Past the grace (the room was rebuilt at 0.6) a stranger is refused, as always.
    carol = sess("carol")
    late = ordered(carol.signal("call", bob.session), 1)
    assert reply(table.handle(late, 4.0), carol)["code"] == "not_in_room"
    assert table.deferred == 2


def test_a_room_rebuilt_by_a_re_announcement_waits_for_its_other_members() -> None:
    """A room created here by a re-announcement (its state was lost) knows only the
    members re-announced so far: a signal naming another one waits (unanswered) for the
    grace, then is refused ``unknown_peer``; a broker serving as usual refuses at once."""
    table = make_table(confirming=True)
    table.rebuild_grace = 3.0
    alice, bob = sess("alice"), sess("bob")
    table.handle(restore(alice, "call"), 10.0)
    signal = ordered(alice.signal("call", bob.session), 1)
    assert table.handle(signal, 10.5) == []
    assert reply(table.handle(signal, 13.5), alice)["code"] == "unknown_peer"
    # A room created by a join outside any rebuild: refused at once.
    dave, erin = sess("dave"), sess("erin")
    joined(table, dave, "other", 20.0)
    assert (
        reply(table.handle(ordered(dave.signal("other", erin.session), 2), 20.5), dave)["code"]
        == "unknown_peer"
    )


def test_a_leave_for_a_room_nobody_had_is_answered_not_left_waiting() -> None:
    """A leave for a room this broker takes with nothing handed over (its previous server
    says it has none) is refused ``not_in_room`` at once: the room made for the leave is
    not one being rebuilt (a grace renewed with each resend left it unanswered for ever:
    tests/cluster/test_webhooks.py, an edge kill)."""
    counter = itertools.count()
    table = RoomTable(
        capacity=4,
        resume_window=WINDOW,
        history_max_events=1024,
        history_max_age=120.0,
        new_epoch=lambda: f"epoch-{next(counter)}",
        handoff_from=lambda room: "broker-0",
    )
    alice = sess("alice")
    leave = ordered(alice.leave("gone"), 1)
    asked = table.handle(leave, 1.0)
    assert [type(e).__name__ for _, e in asked] == ["HandoffRequest"]
    out = table.handle(Handoff("gone", "broker-0", False), 1.1)
    assert reply(out, alice)["code"] == "not_in_room"
    assert table.deferred == 0
