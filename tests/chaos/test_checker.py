"""The chaos checker judges hand-written journals (no cluster: the rules, one by one)."""

from __future__ import annotations

import random

import pytest

from tests.chaos.checker import (
    REPLACE_BOUND,
    STALE_GRACE,
    ConnectionLog,
    DepartureLog,
    Journal,
    Kind,
    Reception,
    RecoveryLog,
    RejoinLog,
    SentSignal,
    check,
    undelivered,
)
from tests.chaos.harness import plan_rooms


class Story:
    """A journal written step by step: alice sends in room r to bob and carol."""

    def __init__(self) -> None:
        self.journal = Journal(t0=0.0)
        self.now = 1.0
        for number, name in enumerate(("alice", "bob", "carol"), 1):
            self.journal.connections.append(
                ConnectionLog(name, 1, "edge-1", 0.0, 0.01 * number, False, f"s-{name}")
            )

    def send(
        self, seq: int, *, acked: bool = True, to: str | None = None, marker: bool = False
    ) -> SentSignal:
        self.now += 0.1
        targets = (to,) if to else ("bob", "carol")
        signal = SentSignal("alice", "r", seq, to, targets, seq, self.now, marker, [1])
        if acked:
            signal.acked_at = self.now + 0.01
        self.journal.signals.append(signal)
        return signal

    def receive(
        self, target: str, seq: int, *, conn: int = 1, counted: bool = True, offset: int = 0
    ) -> None:
        self.now += 0.1
        self.journal.receptions.append(
            Reception(target, "r", "alice", seq, offset or seq, self.now, conn, counted)
        )

    def deliver(self, seq: int) -> None:
        self.receive("bob", seq)
        self.receive("carol", seq)

    def resume(self, client: str, *, recovered: bool, positions: dict[str, int]) -> None:
        """``client``'s connection 1 drops; connection 2 resumes with ``positions``."""
        (first,) = [c for c in self.journal.connections if c.client == client]
        self.now += 0.1
        first.closed_at = first.abandoned_at = self.now
        first.close_code = 1006
        second = ConnectionLog(client, 2, "edge-2", self.now + 0.01, self.now + 0.02, True)
        second.positions = positions
        self.journal.connections.append(second)
        self.now += 0.05
        self.journal.recoveries.append(RecoveryLog(client, "r", self.now, recovered, 2))

    def kinds(self, *, rooms_may_be_lost: bool = False) -> list[str]:
        verdict = check(self.journal, rooms_may_be_lost=rooms_may_be_lost)
        return [str(v.kind) for v in verdict.violations]


def test_every_acked_signal_delivered_once_in_order_is_clean() -> None:
    story = Story()
    for seq in (1, 2, 3):
        story.send(seq)
        story.deliver(seq)
    story.send(4, to="bob")
    story.receive("bob", 4)
    verdict = check(story.journal)
    assert verdict.violations == []
    assert verdict.deliveries_checked == 7


def test_an_acked_signal_that_never_arrives_is_lost() -> None:
    story = Story()
    story.send(1)
    story.receive("bob", 1)
    (violation,) = check(story.journal).violations
    assert violation.kind is Kind.LOST
    assert "carol never got acked alice/r#1" in violation.summary
    assert any("carol's connections" in line for line in violation.history)


def test_an_unacked_signal_may_be_missing_but_not_doubled() -> None:
    story = Story()
    story.send(1, acked=False)
    story.receive("bob", 1)
    story.receive("bob", 1)
    assert story.kinds() == ["duplicate"]


def test_a_duplicate_of_an_acked_signal_is_a_violation() -> None:
    story = Story()
    story.send(1)
    story.deliver(1)
    story.receive("carol", 1, offset=9)
    (violation,) = check(story.journal).violations
    assert violation.kind is Kind.DUPLICATE
    assert "(acked) again" in violation.summary


def test_signals_out_of_their_order() -> None:
    story = Story()
    story.send(1)
    story.send(2)
    story.deliver(2)
    story.deliver(1)
    assert story.kinds() == ["out_of_order", "out_of_order"]


def test_recovered_false_excuses_what_was_sent_before_it_only() -> None:
    story = Story()
    story.send(1)
    story.deliver(1)
    story.send(2)
    story.receive("bob", 2)
    story.resume("carol", recovered=False, positions={"r": 1})
    story.send(3)
    story.receive("bob", 3)
    verdict = check(story.journal)
    assert [str(v.kind) for v in verdict.violations] == ["lost"]
    assert "alice/r#3" in verdict.violations[0].summary
    assert verdict.exempt == 1


def test_recovered_true_after_a_resume_that_should_have_replayed_it() -> None:
    story = Story()
    story.send(1)
    story.deliver(1)
    story.send(2)
    story.receive("bob", 2)  # offset 2; carol was away
    story.resume("carol", recovered=True, positions={"r": 1})
    (violation,) = check(story.journal).violations
    assert violation.kind is Kind.MISSED_AFTER_RECOVERED_TRUE


def test_a_signal_missed_live_is_lost_even_if_a_later_resume_recovered() -> None:
    story = Story()
    story.send(1)
    story.receive("bob", 1)  # carol missed it live...
    story.send(2)
    story.deliver(2)  # ...and saw offset 2 after it, so her resume does not ask for it
    story.resume("carol", recovered=True, positions={"r": 2})
    assert story.kinds() == ["lost"]


def test_a_frame_reaching_a_client_that_was_no_target() -> None:
    story = Story()
    story.send(1, to="bob")
    story.receive("bob", 1)
    story.receive("carol", 1)
    story.receive("carol", 7)
    assert story.kinds() == ["misdelivered", "misdelivered"]


def test_frames_on_an_abandoned_connection_after_the_newer_welcome() -> None:
    story = Story()
    story.send(1)
    story.deliver(1)
    story.resume("bob", recovered=True, positions={"r": 1})
    old = story.journal.connections[1]
    old.closed_at = None  # half open: the client kept it; the cluster never closed it
    new_welcome = story.journal.connections[-1].welcome_at
    assert new_welcome is not None
    old.after_abandon = [(new_welcome + 0.01, "signal")]  # within the grace: already in flight
    assert story.kinds() == ["two_live_connections"]  # only: still open past the bound
    old.closed_at = new_welcome + REPLACE_BOUND / 2
    assert story.kinds() == []
    old.after_abandon.append((new_welcome + STALE_GRACE + 0.1, "signal"))
    assert story.kinds() == ["two_live_connections"]


def test_a_refused_resume_is_reported_and_excuses_what_followed() -> None:
    story = Story()
    story.send(1)
    story.deliver(1)
    story.resume("carol", recovered=True, positions={"r": 1})
    story.journal.connections[-1].resumed = False
    story.journal.recoveries.clear()
    story.send(2)
    story.receive("bob", 2)
    verdict = check(story.journal)
    assert [str(v.kind) for v in verdict.violations] == ["resume_refused"]
    assert verdict.exempt == 1


def test_a_member_refused_as_not_in_room() -> None:
    story = Story()
    signal = story.send(1, acked=False)
    signal.refused = "not_in_room"
    assert story.kinds() == ["member_refused"]


def test_a_member_reported_gone_while_it_never_left() -> None:
    story = Story()
    story.journal.departures.append(DepartureLog("bob", "r", "carol", "timeout", 2.0, 1))
    assert story.kinds() == ["peer_left"]
    story.resume("carol", recovered=True, positions={"r": 0})
    story.journal.connections[-1].resumed = False  # her session was lost: leaving follows
    story.journal.recoveries.clear()
    assert story.kinds() == ["resume_refused"]


def test_markers_not_yet_received() -> None:
    story = Story()
    marker = story.send(1, marker=True)
    assert undelivered(story.journal) == [(marker, "bob"), (marker, "carol")]
    story.deliver(1)
    assert undelivered(story.journal) == []


@pytest.mark.parametrize("seed", range(20))
def test_the_room_plan_shares_every_room(seed: int) -> None:
    plan = plan_rooms(random.Random(seed), 16, 8)
    assert all(len(rooms) >= 2 for rooms in plan.values())
    for room in (f"room-{i}" for i in range(1, 9)):
        assert sum(room in rooms for rooms in plan.values()) >= 3
    assert plan == plan_rooms(random.Random(seed), 16, 8)  # a seed replays


def test_a_member_told_it_lost_its_room_is_excused_until_it_joined_again() -> None:
    """``recovered: false`` without a position (its room was lost with every broker that
    held it): refusals and misses are excused until its join again is answered, not
    after, and not without that join."""

    def story_with(rejoined: bool) -> Story:
        story = Story()
        refused = story.send(1, acked=False)  # carol is not in the room that came back
        refused.refused = "not_in_room"
        refused.sender = "carol"
        named = story.send(2, acked=False, to="carol")
        named.refused = "unknown_peer"
        story.send(3)  # acked: carol misses it, bob gets it
        story.receive("bob", 3)
        story.now += 0.1
        story.journal.recoveries.append(RecoveryLog("carol", "r", story.now, False, 1, False))
        story.send(4)  # before her join again is answered: excused
        story.receive("bob", 4)
        if rejoined:
            story.now += 0.1
            story.journal.rejoins.append(RejoinLog("carol", "r", story.now))
        story.send(5)  # after it: judged
        story.receive("bob", 5)
        return story

    assert story_with(rejoined=True).kinds(rooms_may_be_lost=True) == ["lost"]  # #5 only
    # Without a join again, only what came before the telling is excused.
    lost = sorted(story_with(rejoined=False).kinds(rooms_may_be_lost=True))
    assert lost == ["lost", "lost"]  # #4 and #5
    # Where no region is killed, losing the membership at all is a violation.
    assert story_with(rejoined=True).kinds() == ["membership_lost", "lost"]
    # A recovered: false with a position excuses misses before it, not refusals.
    story = Story()
    refused = story.send(1, acked=False)
    refused.refused = "not_in_room"
    story.now += 0.1
    story.journal.recoveries.append(RecoveryLog("alice", "r", story.now, False, 1, True))
    assert story.kinds() == ["member_refused"]
