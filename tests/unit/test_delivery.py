"""The edge's delivery rules (``edge.delivery``), one by one."""

from __future__ import annotations

from edge.delivery import (
    ACCEPT,
    DUPLICATE,
    GAP,
    RETRY_FIRST,
    RETRY_MAX,
    Confirmations,
    Position,
    Retries,
    admit,
)


def test_admit_writes_the_next_event_and_moves_the_position() -> None:
    position = Position("e", 4)
    assert admit(position, 7, 4) == ACCEPT  # offsets of a session have gaps: prev says so
    assert position.offset == 7


def test_admit_drops_copies_by_their_offset() -> None:
    position = Position("e", 7)
    assert admit(position, 7, 4) == DUPLICATE
    assert admit(position, 5, 4) == DUPLICATE
    assert position.offset == 7


def test_admit_drops_what_comes_after_a_missing_event() -> None:
    position = Position("e", 7)
    assert admit(position, 12, 9) == GAP  # 9 was sent and never written here
    assert position.offset == 7
    assert admit(position, 9, 7) == ACCEPT  # the resend, in order
    assert admit(position, 12, 9) == ACCEPT


def test_admit_accepts_when_the_owner_knows_less_than_the_edge_wrote() -> None:
    # After a sync the owner may restart the stream below what was written: prev <= offset.
    position = Position("e", 9)
    assert admit(position, 12, 8) == ACCEPT


def test_confirmations_coalesce_and_keep_a_gap() -> None:
    confirms = Confirmations()
    a, b = Position("e", 3), Position("e", 8)
    confirms.note("r1", "s1", a)
    confirms.note("r1", "s1", a, gap=True)
    confirms.note("r1", "s1", a)  # a later plain note does not hide the gap
    confirms.note("r2", "s1", b)
    a.offset = 5  # what is confirmed is the position at the take
    assert sorted(confirms.take()) == [("r1", "s1", "e", 5, True), ("r2", "s1", "e", 8, False)]
    assert confirms.take() == []
    assert len(confirms) == 0


def test_a_new_stream_replaces_what_an_old_one_had_noted() -> None:
    confirms = Confirmations()
    old, new = Position("e1", 3), Position("e2", 0)
    confirms.note("r", "s", old, gap=True)
    confirms.note("r", "s", new)  # the session left and joined again: a new position
    assert confirms.take() == [("r", "s", "e2", 0, False)]
    confirms.note("r", "s", new)
    confirms.forget("r", "s")
    assert confirms.take() == []


def test_a_closed_streams_position_is_not_confirmed_but_a_newer_one_is() -> None:
    # An owner takes a position confirmed after it re-synced a session as the edge's answer
    # to that Synced: the connection that closed must not send one.
    confirms = Confirmations()
    closed, resumed = Position("e", 4), Position("e", 4)
    confirms.note("r", "s", closed)
    confirms.forget_stream("r", "s", closed)
    assert confirms.take() == []
    confirms.note("r", "s", resumed)
    confirms.forget_stream("r", "s", closed)  # the old connection's close, reported late
    assert confirms.take() == [("r", "s", "e", 4, False)]


def test_retries_double_up_to_the_cap_and_stop_when_done() -> None:
    retries: Retries[str] = Retries()
    retries.add("k", "request", now=0.0)
    assert retries.due(RETRY_FIRST - 0.01) == []
    assert retries.due(RETRY_FIRST) == ["request"]
    due_at = RETRY_FIRST
    interval = RETRY_FIRST
    for _ in range(6):
        interval = min(interval * 2, RETRY_MAX)
        assert retries.due(due_at + interval - 0.01) == []
        due_at += interval
        assert retries.due(due_at) == ["request"]
    assert interval == RETRY_MAX
    assert "k" in retries
    assert retries.done("k") == "request"
    assert retries.due(1e9) == []
    assert retries.done("k") is None


def test_retries_come_out_in_the_order_they_were_added() -> None:
    retries: Retries[int] = Retries()
    for n in range(5):
        retries.add(n, n, now=0.0)
    retries.done(2)
    assert retries.due(RETRY_FIRST) == [0, 1, 3, 4]


def test_the_edge_core_admits_exactly_as_admit_does() -> None:
    """``EdgeCore.admit`` does ``admit`` inline (hot path): the same verdict and the same
    position for every case, in one process and in a cluster."""
    import itertools

    from edge.core import EdgeCore, SessionState
    from signalpost.wire import Deliver

    for lossy, epoch, offset, prev, at in itertools.product(
        (False, True), ("", "e", "other"), range(0, 9), range(0, 9), (0, 3, 6)
    ):
        expected_position = Position("e", at)
        expected = admit(expected_position, offset, prev, epoch)
        core: EdgeCore[SessionState] = EdgeCore("edge-1", lossy=lossy)
        state = SessionState(session="s", conn="c")
        state.positions["room"] = Position("e", at)
        deliver = Deliver(["s"], b"{}", "room", offset, prev, 1, epoch)
        assert core.admit(state, deliver) == expected, (lossy, epoch, offset, prev, at)
        assert state.positions["room"] == expected_position
