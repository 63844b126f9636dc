"""PresenceTable, the presence service's sans-I/O core, driven by hand (no sockets, no clock)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from presence.table import EVICT_WAIT, Outbound, PresenceTable
from signalpost.tickets import SeatTickets
from signalpost.wire import (
    ClaimCmd,
    ClaimReply,
    Deliver,
    EdgeSync,
    Evict,
    Evicted,
    Heartbeat,
    Reply,
    RequestId,
    SessionDown,
    SessionUp,
    UnwatchCmd,
    WatchCmd,
)

WINDOW = 30.0
_seqs = itertools.count(1)


def make_table() -> PresenceTable:
    return PresenceTable(resume_window=WINDOW)


def up(session: str, user: str, edge: str = "edge-1", conn: str | None = None) -> SessionUp:
    return SessionUp(session, user, edge, conn or f"conn-{session}")


def down(session: str, ended: bool, edge: str = "edge-1", conn: str | None = None) -> SessionDown:
    return SessionDown(session, edge, conn or f"conn-{session}", ended)


def watch(
    session: str, users: list[str], edge: str = "edge-1", req: RequestId | None = 1
) -> WatchCmd:
    return WatchCmd(session, f"conn-{session}", edge, next(_seqs), req, users)


def unwatch(
    session: str, users: list[str], edge: str = "edge-1", req: RequestId | None = 1
) -> UnwatchCmd:
    return UnwatchCmd(session, f"conn-{session}", edge, next(_seqs), req, users)


def claim(session: str, user: str, edge: str, conn: str) -> ClaimCmd:
    return ClaimCmd(session, user, edge, conn)


def unversioned(frame: dict[str, Any]) -> dict[str, Any]:
    """A frame without its status versions (tested on their own: test_presence_versions)."""
    return {k: v for k, v in frame.items() if k not in ("version", "versions")}


def presence_to(out: list[Outbound], session: str, edge: str = "edge-1") -> list[dict[str, Any]]:
    """Presence frames delivered to ``session``; each must go to ``edge``."""
    frames = []
    for target, envelope in out:
        if isinstance(envelope, Deliver) and session in envelope.sessions:
            assert target == edge, f"{session} is on {edge}, not {target}"
            frames.append(unversioned(json.loads(envelope.payload)))
    return frames


def acked(table: PresenceTable, out: list[Outbound], now: float) -> list[Outbound]:
    """``out`` and what the table sends once each evicted connection's edge confirmed
    that connection closed (``Evicted``), as edges do at once."""
    answered = list(out)
    for edge, envelope in out:
        if isinstance(envelope, Evict):
            answered += table.handle(Evicted(envelope.session, envelope.conn, edge), now)
    return answered


def delivers(out: list[Outbound]) -> list[tuple[str, Deliver]]:
    return [(t, e) for t, e in out if isinstance(e, Deliver)]


def the_reply(out: list[Outbound], command: WatchCmd | UnwatchCmd) -> dict[str, Any]:
    ((target, envelope),) = out
    assert isinstance(envelope, Reply)
    assert (target, envelope.session, envelope.conn, envelope.seq) == (
        command.edge,
        command.session,
        command.conn,
        command.seq,
    )
    return unversioned(json.loads(envelope.payload))


def online(user: str) -> dict[str, str]:
    return {"type": "presence", "user": user, "status": "online"}


def offline(user: str) -> dict[str, str]:
    return {"type": "presence", "user": user, "status": "offline"}


def watching(table: PresenceTable, session: str, users: list[str], edge: str = "edge-1") -> None:
    """``session`` (itself online as ``watcher-<session>``) watches ``users``."""
    table.handle(up(session, f"watcher-{session}", edge), 0.0)
    table.handle(watch(session, users, edge), 0.0)


# ---------------------------------------------------------------------------------- watch


def test_watch_replies_watching_with_a_snapshot() -> None:
    table = make_table()
    table.handle(up("s-eve", "eve"), 0.0)
    command = watch("w", ["eve", "bob"], edge="edge-9", req=4)
    frame = the_reply(table.handle(command, 0.0), command)
    assert frame == {"type": "watching", "id": 4, "presence": {"eve": "online", "bob": "offline"}}


@pytest.mark.parametrize("req", [0, 17, "w-1", "x" * 64])
def test_watching_and_unwatched_echo_the_request_id(req: RequestId) -> None:
    table = make_table()
    command = watch("w", ["eve"], req=req)
    assert the_reply(table.handle(command, 0.0), command)["id"] == req
    again = unwatch("w", ["eve"], req=req)
    assert the_reply(table.handle(again, 0.0), again) == {"type": "unwatched", "id": req}


def test_replies_without_an_id_carry_no_id() -> None:
    table = make_table()
    command = watch("w", ["eve"], req=None)
    assert "id" not in the_reply(table.handle(command, 0.0), command)
    again = unwatch("w", ["eve"], req=None)
    assert the_reply(table.handle(again, 0.0), again) == {"type": "unwatched"}


def test_session_up_tells_each_watcher_at_its_edge() -> None:
    table = make_table()
    watching(table, "w1", ["eve"], edge="edge-a")
    watching(table, "w2", ["eve"], edge="edge-a")
    watching(table, "w3", ["eve"], edge="edge-b")
    watching(table, "other", ["bob"], edge="edge-b")
    out = table.handle(up("s-eve", "eve", edge="edge-c"), 1.0)
    assert presence_to(out, "w1", "edge-a") == [online("eve")]
    assert presence_to(out, "w2", "edge-a") == [online("eve")]
    assert presence_to(out, "w3", "edge-b") == [online("eve")]
    assert presence_to(out, "other", "edge-b") == []
    # One Deliver per edge, naming that edge's watchers.
    assert sorted((t, sorted(e.sessions)) for t, e in delivers(out)) == [
        ("edge-a", ["w1", "w2"]),
        ("edge-b", ["w3"]),
    ]
    assert table.status("eve") == "online"


def test_a_user_without_watchers_changes_silently() -> None:
    table = make_table()
    assert table.handle(up("s-eve", "eve"), 0.0) == []
    assert table.handle(down("s-eve", ended=True), 1.0) == []
    assert table.status("eve") == "offline"


def test_status_is_offline_for_unknown_users() -> None:
    assert make_table().status("nobody") == "offline"


# ---------------------------------------------------------------------------- lifetimes


def test_a_user_with_several_sessions_goes_offline_after_the_last_ends() -> None:
    table = make_table()
    watching(table, "w", ["eve"])
    assert presence_to(table.handle(up("e1", "eve", edge="edge-x"), 0.0), "w") == [online("eve")]
    assert delivers(table.handle(up("e2", "eve", edge="edge-y"), 0.0)) == []  # no repeat
    assert delivers(table.handle(down("e1", ended=True, edge="edge-x"), 1.0)) == []
    assert table.status("eve") == "online"
    # The other one drops: still online within its window, offline once it lapses.
    assert delivers(table.handle(down("e2", ended=False, edge="edge-y"), 2.0)) == []
    assert table.expire(2.0 + WINDOW - 0.001) == []
    assert presence_to(table.expire(2.0 + WINDOW), "w") == [offline("eve")]
    assert table.status("eve") == "offline"


def test_session_down_ended_is_offline_at_once() -> None:
    table = make_table()
    watching(table, "w", ["eve"])
    table.handle(up("e1", "eve"), 0.0)
    assert presence_to(table.handle(down("e1", ended=True), 1.0), "w") == [offline("eve")]
    assert table.expire(1e9) == []


def test_session_down_not_ended_is_offline_only_after_the_resume_window() -> None:
    table = make_table()
    watching(table, "w", ["eve"])
    table.handle(up("e1", "eve"), 0.0)
    assert table.handle(down("e1", ended=False), 10.0) == []
    assert table.status("eve") == "online"
    assert table.expire(10.0 + WINDOW - 0.5) == []
    assert presence_to(table.expire(10.0 + WINDOW), "w") == [offline("eve")]
    assert table.expire(1e9) == []  # only once


def test_a_dropped_session_that_comes_back_stays_online() -> None:
    table = make_table()
    watching(table, "w", ["eve"])
    table.handle(up("e1", "eve"), 0.0)
    table.handle(down("e1", ended=False), 1.0)
    assert delivers(table.handle(up("e1", "eve", conn="conn-e1b"), 2.0)) == []
    assert table.expire(1e9) == []
    assert table.status("eve") == "online"


@pytest.mark.parametrize("ended", [True, False])
def test_a_stale_session_down_from_another_connection_is_ignored(ended: bool) -> None:
    table = make_table()
    watching(table, "w", ["eve"])
    table.handle(up("e1", "eve", edge="edge-1", conn="old"), 0.0)
    acked(table, table.handle(claim("e1", "eve", "edge-2", "new"), 1.0), 1.0)
    assert table.handle(down("e1", ended, edge="edge-1", conn="old"), 2.0) == []
    assert table.expire(1e9) == []
    assert table.status("eve") == "online"
    # The live connection's report still counts.
    assert presence_to(table.handle(down("e1", True, "edge-2", "new"), 3.0), "w") == [
        offline("eve")
    ]


def test_session_down_of_an_unknown_session_does_nothing() -> None:
    table = make_table()
    assert table.handle(down("ghost", ended=True), 0.0) == []
    assert table.handle(down("ghost", ended=False), 0.0) == []
    assert table.expire(1e9) == []


def test_a_second_connection_for_an_attached_session_evicts_the_first() -> None:
    table = make_table()
    table.handle(up("e1", "eve", edge="edge-1", conn="old"), 0.0)
    out = table.handle(up("e1", "eve", edge="edge-2", conn="new"), 1.0)
    assert out == [("edge-1", Evict("e1", "old", "eve"))]


def test_the_same_announcement_twice_evicts_nobody() -> None:
    table = make_table()
    table.handle(up("e1", "eve"), 0.0)
    assert table.handle(up("e1", "eve"), 1.0) == []


# ---------------------------------------------------------------------------------- claim


def test_claim_of_an_attached_session_is_live_and_evicts_the_old_connection() -> None:
    table = make_table()
    watching(table, "w", ["eve"])
    table.handle(up("e1", "eve", edge="edge-1", conn="old"), 0.0)
    out = table.handle(claim("e1", "eve", "edge-2", "new"), 1.0)
    assert ("edge-1", Evict("e1", "old", "eve")) in out
    # Welcomed only once the old connection is closed: never two live connections.
    assert not any(isinstance(e, ClaimReply) for _, e in out)
    assert table.handle(claim("e1", "eve", "edge-2", "new"), 1.5) == []  # asked again: waits
    assert table.handle(Evicted("e1", "other", "edge-1"), 1.6) == []  # not the one replaced
    assert table.handle(Evicted("e1", "old", "edge-1"), 1.7) == [
        ("edge-2", ClaimReply("e1", "new", True))
    ]
    assert presence_to(out, "w") == []  # eve never went offline


def test_claim_of_a_suspended_session_is_live_at_once_and_closes_the_old_connection() -> None:
    # The old connection should be gone; if its edge still holds it (chaos seed 31337: a
    # half-open socket whose lease was suspended at presence, open 43 s beside its
    # resume), the edge closes it. The answer does not wait for that.
    table = make_table()
    table.handle(up("e1", "eve", edge="edge-1", conn="old"), 0.0)
    table.handle(down("e1", ended=False, edge="edge-1", conn="old"), 1.0)
    out = table.handle(claim("e1", "eve", "edge-2", "new"), 2.0)
    assert out == [
        ("edge-1", Evict("e1", "old", "eve")),
        ("edge-2", ClaimReply("e1", "new", True)),
    ]
    assert table.expire(1e9) == []  # the resume window no longer runs
    assert table.status("eve") == "online"


def test_claim_of_an_unknown_session_is_not_live() -> None:
    table = make_table()
    out = table.handle(claim("nope", "eve", "edge-2", "new"), 0.0)
    assert out == [("edge-2", ClaimReply("nope", "new", False))]
    assert table.status("eve") == "offline"


def test_claim_after_the_session_expired_is_not_live() -> None:
    table = make_table()
    table.handle(up("e1", "eve"), 0.0)
    table.handle(down("e1", ended=False), 0.0)
    table.expire(WINDOW)
    out = table.handle(claim("e1", "eve", "edge-2", "new"), WINDOW + 1)
    assert out == [("edge-2", ClaimReply("e1", "new", False))]
    assert table.status("eve") == "offline"


def test_claim_after_the_session_ended_is_not_live() -> None:
    table = make_table()
    table.handle(up("e1", "eve"), 0.0)
    table.handle(down("e1", ended=True), 0.0)
    out = table.handle(claim("e1", "eve", "edge-2", "new"), 1.0)
    assert out == [("edge-2", ClaimReply("e1", "new", False))]


def test_claim_after_the_resume_window_is_not_live_even_before_expire_runs() -> None:
    table = make_table()
    table.handle(up("e1", "eve"), 0.0)
    table.handle(down("e1", ended=False), 0.0)
    out = table.handle(claim("e1", "eve", "edge-2", "new"), WINDOW + 5.0)
    assert out[-1] == ("edge-2", ClaimReply("e1", "new", False))


def test_claim_for_another_user_is_not_live_and_changes_nothing() -> None:
    table = make_table()
    table.handle(up("e1", "eve", edge="edge-1", conn="old"), 0.0)
    out = table.handle(claim("e1", "mallory", "edge-2", "new"), 1.0)
    assert out == [("edge-2", ClaimReply("e1", "new", False))]
    assert table.status("mallory") == "offline"
    # The lease still belongs to eve's connection: its own report still counts.
    table.handle(down("e1", ended=True, edge="edge-1", conn="old"), 2.0)
    assert table.status("eve") == "offline"


def test_after_a_claim_the_session_lives_on_the_new_edge() -> None:
    table = make_table()
    table.handle(up("w", "watcher", edge="edge-1", conn="old"), 0.0)
    table.handle(WatchCmd("w", "old", "edge-1", 1, 1, ["eve"]), 0.0)
    table.handle(claim("w", "watcher", "edge-2", "new"), 1.0)
    out = table.handle(up("e1", "eve", edge="edge-3"), 2.0)
    assert presence_to(out, "w", "edge-2") == [online("eve")]


# ------------------------------------------------------------------------------- edge lost


def test_edge_lost_suspends_its_sessions_until_the_window_lapses() -> None:
    table = make_table()
    watching(table, "w", ["eve", "bob"], edge="edge-2")
    table.handle(up("e1", "eve", edge="edge-1"), 0.0)
    table.handle(up("b1", "bob", edge="edge-3"), 0.0)
    assert table.edge_lost("edge-1", 10.0) == []
    assert table.status("eve") == "online"
    assert table.expire(10.0 + WINDOW - 1) == []
    out = table.expire(10.0 + WINDOW)
    assert presence_to(out, "w", "edge-2") == [offline("eve")]
    assert table.status("bob") == "online"


def test_a_session_of_a_lost_edge_can_resume_elsewhere() -> None:
    table = make_table()
    table.handle(up("e1", "eve", edge="edge-1", conn="old"), 0.0)
    table.edge_lost("edge-1", 1.0)
    out = table.handle(claim("e1", "eve", "edge-2", "new"), 2.0)
    # Answered at once; the old edge is told to close the old connection anyway: "lost"
    # is this node's word for "not heard from", and a node that was paused itself declares
    # live edges lost (their sessions suspended while still open there).
    assert out == [
        ("edge-1", Evict("e1", "old", "eve")),
        ("edge-2", ClaimReply("e1", "new", True)),
    ]
    assert table.expire(1e9) == []


def test_watchers_on_a_lost_edge_are_not_sent_to() -> None:
    table = make_table()
    watching(table, "w1", ["eve"], edge="edge-dead")
    watching(table, "w2", ["eve"], edge="edge-ok")
    table.edge_lost("edge-dead", 0.0)
    out = table.handle(up("e1", "eve", edge="edge-ok"), 1.0)
    assert [t for t, _ in delivers(out)] == ["edge-ok"]


def test_a_watcher_that_resumes_learns_what_changed_while_it_was_away() -> None:
    table = make_table()
    table.handle(up("e1", "eve", edge="edge-2"), 0.0)
    table.handle(up("b1", "bob", edge="edge-2"), 0.0)
    table.handle(up("w", "watcher", edge="edge-1", conn="old"), 0.0)
    table.handle(WatchCmd("w", "old", "edge-1", 1, 1, ["eve", "bob", "zoe"]), 0.0)
    table.handle(down("w", ended=False, edge="edge-1", conn="old"), 1.0)
    assert delivers(table.handle(down("e1", ended=True, edge="edge-2"), 2.0)) == []
    out = table.handle(claim("w", "watcher", "edge-3", "new"), 3.0)
    # resumed: true means the same session continues, watches included: the new edge
    # learns them, their status, and which changed while the watcher was away.
    assert out[-1] == (
        "edge-3",
        ClaimReply(
            "w",
            "new",
            True,
            {"bob": "online", "eve": "offline", "zoe": "offline"},
            ["eve"],
            versions={"bob": 1, "eve": 2, "zoe": 2},  # (a user never online: even, above 0)
        ),
    )
    # Told once: from now on, changes reach the watcher on its new edge as usual.
    out = table.handle(up("e2", "eve", edge="edge-2"), 4.0)
    assert presence_to(out, "w", "edge-3") == [online("eve")]
    out = acked(table, table.handle(claim("w", "watcher", "edge-4", "newer"), 5.0), 5.0)
    assert out[-1][1] == ClaimReply(
        "w",
        "newer",
        True,
        {"bob": "online", "eve": "online", "zoe": "offline"},
        [],
        versions={"bob": 1, "eve": 3, "zoe": 2},
    )


def test_an_unwatched_user_is_not_in_a_resumed_watchers_claim() -> None:
    table = make_table()
    table.handle(up("w", "watcher", edge="edge-1", conn="old"), 0.0)
    table.handle(WatchCmd("w", "old", "edge-1", 1, 1, ["eve", "bob"]), 0.0)
    table.handle(UnwatchCmd("w", "old", "edge-1", 2, 2, ["eve"]), 0.0)
    table.handle(down("w", ended=False, edge="edge-1", conn="old"), 1.0)
    table.handle(up("e1", "eve", edge="edge-2"), 2.0)
    out = table.handle(claim("w", "watcher", "edge-3", "new"), 3.0)
    assert out[-1][1] == ClaimReply("w", "new", True, {"bob": "offline"}, [], versions={"bob": 2})


# ------------------------------------------------------------------------------- edge sync


def test_edge_sync_rebuilds_a_restarted_presence_service() -> None:
    table = make_table()  # fresh: knows nothing
    sync = EdgeSync(
        "edge-1",
        [up("e1", "eve", "edge-1"), up("w", "watcher", "edge-1")],
        {"w": ["eve", "bob"]},
    )
    table.handle(sync, 0.0)
    assert table.status("eve") == "online"
    assert table.status("watcher") == "online"
    assert table.watched_by("w") == {"eve", "bob"}
    # Leases work again: the watcher hears of changes.
    out = table.handle(up("b1", "bob", edge="edge-2"), 1.0)
    assert presence_to(out, "w") == [online("bob")]
    out = table.handle(down("e1", ended=True, edge="edge-1"), 2.0)
    assert presence_to(out, "w") == [offline("eve")]


def test_edge_sync_from_a_second_edge_tells_the_first_edges_watchers() -> None:
    table = make_table()
    table.handle(EdgeSync("edge-1", [up("w", "watcher", "edge-1")], {"w": ["eve"]}), 0.0)
    out = table.handle(EdgeSync("edge-2", [up("e1", "eve", "edge-2")], {}), 0.0)
    assert presence_to(out, "w", "edge-1") == [online("eve")]


def test_repeating_an_edge_sync_changes_nothing() -> None:
    table = make_table()
    sync = EdgeSync("edge-1", [up("e1", "eve", "edge-1"), up("w", "w", "edge-1")], {"w": ["eve"]})
    table.handle(sync, 0.0)
    assert table.handle(sync, 1.0) == []
    assert table.watched_by("w") == {"eve"}


def test_edge_sync_after_edge_lost_cancels_the_suspension() -> None:
    table = make_table()
    table.handle(up("e1", "eve", "edge-1"), 0.0)
    table.edge_lost("edge-1", 0.0)
    table.handle(EdgeSync("edge-1", [up("e1", "eve", "edge-1")], {}), 1.0)
    assert table.expire(1e9) == []
    assert table.status("eve") == "online"


# ---------------------------------------------------------------------------------- unwatch


def test_unwatch_stops_notifications_for_those_users_only() -> None:
    table = make_table()
    watching(table, "w", ["eve", "bob"])
    command = unwatch("w", ["eve"], req=5)
    assert the_reply(table.handle(command, 0.0), command) == {"type": "unwatched", "id": 5}
    assert table.watched_by("w") == {"bob"}
    assert presence_to(table.handle(up("e1", "eve", edge="edge-2"), 1.0), "w") == []
    assert presence_to(table.handle(up("b1", "bob", edge="edge-2"), 1.0), "w") == [online("bob")]


def test_unwatch_of_users_never_watched_is_a_success() -> None:
    table = make_table()
    command = unwatch("w", ["nobody"])
    assert the_reply(table.handle(command, 0.0), command)["type"] == "unwatched"
    assert table.watched_by("w") == set()


def test_unwatching_one_watcher_keeps_the_others() -> None:
    table = make_table()
    watching(table, "w1", ["eve"])
    watching(table, "w2", ["eve"])
    table.handle(unwatch("w1", ["eve"]), 0.0)
    out = table.handle(up("e1", "eve", edge="edge-2"), 1.0)
    assert presence_to(out, "w1") == []
    assert presence_to(out, "w2") == [online("eve")]


@pytest.mark.parametrize("how", ["ended", "expired"])
def test_ending_a_watcher_session_removes_its_watches(how: str) -> None:
    table = make_table()
    watching(table, "w", ["eve"])
    watching(table, "w2", ["eve"])
    if how == "ended":
        table.handle(down("w", ended=True), 0.0)
    else:
        table.handle(down("w", ended=False), 0.0)
        table.expire(WINDOW)
    assert table.watched_by("w") == set()
    out = table.handle(up("e1", "eve", edge="edge-2"), 1.0)
    assert [e.sessions for _, e in delivers(out)] == [["w2"]]
    # A session that is gone for good does not come back as a watcher by reconnecting.
    table.handle(up("w", "watcher-w"), 2.0)
    assert presence_to(table.handle(down("e1", ended=True, edge="edge-2"), 3.0), "w") == []


def test_unknown_envelopes_are_ignored() -> None:
    assert make_table().handle(Heartbeat("edge-1", "inc"), 0.0) == []


# ------------------------------------------------------------------- expiry bookkeeping


def test_a_session_dropped_twice_expires_a_window_after_the_second_drop() -> None:
    table = make_table()
    watching(table, "w", ["eve"])
    table.handle(up("e1", "eve"), 0.0)
    table.handle(down("e1", ended=False), 0.0)
    table.handle(down("e1", ended=False), 10.0)
    assert table.expire(WINDOW) == []
    assert presence_to(table.expire(10.0 + WINDOW), "w") == [offline("eve")]


def test_a_second_edge_lost_keeps_the_first_deadline() -> None:
    table = make_table()
    table.handle(up("e1", "eve", edge="edge-1"), 0.0)
    table.edge_lost("edge-1", 0.0)
    table.edge_lost("edge-1", 10.0)
    table.expire(WINDOW)
    assert table.status("eve") == "offline"


def test_drops_and_resumes_do_not_grow_the_deadline_heap() -> None:
    table = make_table()
    table.handle(up("e1", "eve"), 0.0)
    table.handle(up("b1", "bob"), 0.0)
    table.handle(down("b1", ended=False), 0.0)  # one live entry all along
    for i in range(1000):
        table.handle(down("e1", ended=False), float(i))
        table.handle(up("e1", "eve"), float(i))
        assert len(table._deadlines) <= 2  # stale entries never outnumber live ones
    table.expire(1e9)
    assert (table.status("bob"), table.status("eve")) == ("offline", "online")


def test_nothing_is_kept_once_every_session_is_gone() -> None:
    table = make_table()
    for i in range(20):
        edge = f"edge-{i % 3}"
        table.handle(up(f"s{i}", f"user{i % 7}", edge=edge), 0.0)
        table.handle(watch(f"s{i}", [f"user{(i + 1) % 7}"], edge=edge), 0.0)
    table.edge_lost("edge-0", 1.0)
    for i in range(1, 20, 3):
        table.handle(down(f"s{i}", ended=False, edge="edge-1"), 2.0)
        table.handle(claim(f"s{i}", f"user{i % 7}", "edge-2", f"again-{i}"), 3.0)
    for i in range(20):
        lease = table.leases.get(f"s{i}")
        if lease is not None and lease.suspended_until is None:
            table.handle(down(f"s{i}", ended=i % 2 == 0, edge=lease.edge, conn=lease.conn), 4.0)
    table.expire(4.0 + WINDOW)
    assert table.leases == {}
    assert table._deadlines == [] and table._stale == 0
    assert table._connected_at == {} and table._sessions_of == {}
    assert table._watchers_of == {} and table._watched_by == {} and table._told == {}


# --------------------------------------------------------------- the newest connection


def test_an_older_claim_is_refused_and_evicts_nobody() -> None:
    table = make_table()
    watching(table, "w", ["eve"])
    table.handle(up("e1", "eve", edge="edge-1", conn="new.3"), 0.0)
    out = table.handle(claim("e1", "eve", "edge-2", "old.2"), 1.0)
    assert out == [("edge-2", ClaimReply("e1", "old.2", False))]
    assert (table.leases["e1"].edge, table.leases["e1"].conn) == ("edge-1", "new.3")
    # The newer connection still speaks for the session.
    assert presence_to(table.handle(down("e1", True, "edge-1", "new.3"), 2.0), "w") == [
        offline("eve")
    ]


def test_an_older_claim_does_not_take_a_suspended_lease() -> None:
    table = make_table()
    table.handle(up("e1", "eve", edge="edge-1", conn="new.3"), 0.0)
    table.handle(down("e1", False, "edge-1", "new.3"), 1.0)
    out = table.handle(claim("e1", "eve", "edge-2", "old.2"), 2.0)
    assert out == [("edge-2", ClaimReply("e1", "old.2", False))]
    assert table.leases["e1"].suspended_until == 1.0 + WINDOW  # its window still runs
    # The newer connection's own resume is still live.
    reply = table.handle(claim("e1", "eve", "edge-2", "newer.4"), 3.0)[-1][1]
    assert isinstance(reply, ClaimReply) and reply.live


def test_an_older_session_up_is_ignored() -> None:
    table = make_table()
    watching(table, "w", ["eve"], edge="edge-9")
    table.handle(up("e1", "eve", edge="edge-1", conn="new.3"), 0.0)
    assert table.handle(up("e1", "eve", edge="edge-2", conn="old.1"), 1.0) == []
    assert table.handle(EdgeSync("edge-2", [up("e1", "eve", "edge-2", "old.1")], {}), 1.0) == []
    assert (table.leases["e1"].edge, table.leases["e1"].conn) == ("edge-1", "new.3")
    # Nor does it keep a session whose newer connection ended.
    table.handle(down("e1", True, "edge-1", "new.3"), 2.0)
    assert table.status("eve") == "offline"


def test_a_newer_claim_evicts_the_older_live_connection_exactly_once() -> None:
    table = make_table()
    table.handle(up("e1", "eve", edge="edge-1", conn="old.1"), 0.0)
    out = acked(table, table.handle(claim("e1", "eve", "edge-2", "new.2"), 1.0), 1.0)
    assert out == [
        ("edge-1", Evict("e1", "old.1", "eve")),
        ("edge-2", ClaimReply("e1", "new.2", True)),
    ]
    # Repeats and late words of either connection evict nobody again.
    assert table.handle(claim("e1", "eve", "edge-2", "new.2"), 2.0) == [
        ("edge-2", ClaimReply("e1", "new.2", True))
    ]
    assert table.handle(up("e1", "eve", "edge-2", "new.2"), 2.0) == []
    assert table.handle(up("e1", "eve", "edge-1", "old.1"), 3.0) == []
    assert table.handle(claim("e1", "eve", "edge-1", "old.1"), 3.0) == [
        ("edge-1", ClaimReply("e1", "old.1", False))
    ]
    assert table.handle(down("e1", False, "edge-1", "old.1"), 4.0) == []
    assert (table.leases["e1"].conn, table.leases["e1"].suspended_until) == ("new.2", None)


def test_an_equal_connection_re_announced_is_harmless() -> None:
    table = make_table()
    watching(table, "w", ["eve"], edge="edge-9")
    table.handle(up("e1", "eve", edge="edge-1", conn="c.2"), 0.0)
    sync = EdgeSync("edge-1", [up("e1", "eve", "edge-1", "c.2")], {})
    assert table.handle(sync, 1.0) == []
    assert table.handle(up("e1", "eve", "edge-1", "c.2"), 1.0) == []
    # Re-announced while suspended (the edge came back): the window stops, nobody is evicted.
    table.edge_lost("edge-1", 2.0)
    assert table.handle(sync, 3.0) == []
    assert table.expire(1e9) == []
    assert table.status("eve") == "online"


def test_a_claim_of_the_same_generation_takes_the_lease() -> None:
    """A client retrying a resume with the same token: the last attempt gets the session
    (the first may never have been welcomed, yet holds the lease here)."""
    table = make_table()
    table.handle(up("e1", "eve", edge="edge-1", conn="first.2"), 0.0)
    out = acked(table, table.handle(claim("e1", "eve", "edge-2", "retry.2"), 1.0), 1.0)
    assert out == [
        ("edge-1", Evict("e1", "first.2", "eve")),
        ("edge-2", ClaimReply("e1", "retry.2", True)),
    ]


def test_a_session_announced_for_another_user_leaves_no_user_online_for_good() -> None:
    # A session belongs to one user; a node that names another for it (a bug, a forgery)
    # must not leave the first user online for ever.
    table = make_table()
    watching(table, "w", ["eve", "mallory"])
    table.handle(up("s1", "eve"), 0.0)
    out = table.handle(up("s1", "mallory"), 1.0)
    assert presence_to(out, "w") == [offline("eve"), online("mallory")]
    assert (table.status("eve"), table.status("mallory")) == ("offline", "online")
    table.handle(down("s1", ended=True), 2.0)
    assert table.status("mallory") == "offline"


def test_a_resume_whose_old_edge_does_not_confirm_is_answered_after_the_wait() -> None:
    table = make_table()
    table.handle(up("e1", "eve", edge="edge-1", conn="old.1"), 0.0)
    table.handle(claim("e1", "eve", "edge-2", "new.2"), 1.0)
    assert table.expire(1.0 + EVICT_WAIT - 0.1) == []
    assert table.expire(1.0 + EVICT_WAIT) == [("edge-2", ClaimReply("e1", "new.2", True))]
    assert table.counters.evict_unconfirmed == 1


def test_a_resume_whose_old_edge_is_lost_is_answered_at_once() -> None:
    table = make_table()
    table.handle(up("e1", "eve", edge="edge-1", conn="old.1"), 0.0)
    table.handle(claim("e1", "eve", "edge-2", "new.2"), 1.0)
    # A lost edge's connections are gone with it (its clients are cut off).
    assert table.edge_lost("edge-1", 1.2) == [("edge-2", ClaimReply("e1", "new.2", True))]


def test_only_the_edge_holding_a_lease_speaks_for_its_session() -> None:
    # Another edge (admitted, under its own name) names a session whose lease edge-1
    # holds: its goodbye, watch and unwatch are refused and reported, and an edge's
    # re-sync naming another edge's session is ignored. The lease and watches stand.
    table = make_table()
    refusals: list[str] = []
    table.refused = lambda edge, why: refusals.append(edge)
    watching(table, "s1", ["bob"], edge="edge-1")  # s1: user watcher-s1, on edge-1
    for command in (
        down("s1", ended=True, edge="edge-9"),  # even with the session's conn
        watch("s1", ["carol"], edge="edge-9"),
        unwatch("s1", ["bob"], edge="edge-9"),
        EdgeSync("edge-9", [SessionUp("s1", "watcher-s1", "edge-1", "c9")], {}),
    ):
        assert table.handle(command, 1.0) == []
    assert refusals == ["edge-9"] * 4
    lease = table.leases["s1"]
    assert (lease.edge, lease.conn, lease.suspended_until) == ("edge-1", "conn-s1", None)
    assert table.watched_by("s1") == {"bob"} and table.status("watcher-s1") == "online"


def test_every_lease_comes_with_a_seat_ticket_for_its_edge() -> None:
    # A new session's edge (SessionUp) and a resume's (the claim's grant) each get the
    # ticket of that connection on that edge: what lets their brokers move its seats there.
    tickets = SeatTickets("unit-ticket-secret-0123456789abcdef")
    table = make_table()
    table.tickets = tickets
    out = table.handle(up("s1", "ann", edge="edge-1", conn="c.1"), 0.0)
    grant = ClaimReply("s1", "c.1", True, ticket=tickets.issue("s1", "edge-1", "c.1"))
    assert out == [("edge-1", grant)]
    table.handle(down("s1", ended=False, edge="edge-1", conn="c.1"), 1.0)
    out = table.handle(claim("s1", "ann", "edge-2", "c.2"), 2.0)
    replies = [e for target, e in out if isinstance(e, ClaimReply) and target == "edge-2"]
    assert [(r.live, r.ticket) for r in replies] == [(True, tickets.issue("s1", "edge-2", "c.2"))]
    # A refused claim (someone else's session) gets none.
    out = table.handle(claim("s1", "bob", "edge-3", "c.3"), 3.0)
    assert [(e.live, e.ticket) for _, e in out if isinstance(e, ClaimReply)] == [(False, b"")]


def test_a_seat_ticket_names_its_session_edge_and_connection() -> None:
    tickets = SeatTickets("unit-ticket-secret-0123456789abcdef")
    ticket = tickets.issue("s1", "edge-1", "c.1")
    assert len(ticket) == 16 and tickets.valid(ticket, "s1", "edge-1", "c.1")
    for other in (("s2", "edge-1", "c.1"), ("s1", "edge-2", "c.1"), ("s1", "edge-1", "c.2")):
        assert not tickets.valid(ticket, *other)
    assert not tickets.valid(ticket, "s1e", "dge-1", "c.1")  # fields do not run together
    assert not SeatTickets("another-secret-0123456789abcdef0123").valid(
        ticket, "s1", "edge-1", "c.1"
    )
