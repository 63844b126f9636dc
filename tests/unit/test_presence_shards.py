"""Several PresenceTables sharing users by an ownership function, wired in memory.

``Shards`` routes what each table returns: to another table when the destination is a
node id, else to the named edge's inbox. Messages between nodes can be held back to play
a lost or late one.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from typing import Any

from presence.table import RESUBSCRIBE_INTERVAL, SYNC_GRACE, Outbound, PresenceTable
from signalpost.wire import (
    ClaimCmd,
    ClaimReply,
    Deliver,
    EdgeSync,
    Envelope,
    Reply,
    SessionDown,
    SessionUp,
    StatusNote,
    StatusSubscribe,
    UnwatchCmd,
    WatchCmd,
)

WINDOW = 30.0
_seqs = itertools.count(1)


class Shards:
    def __init__(
        self,
        owners: dict[str, str],
        nodes: tuple[str, ...] = ("p1", "p2"),
        replicas: dict[str, str] | None = None,
    ) -> None:
        self.owners = owners  # user -> node: the view the edges read
        # Each node's own view (owners, runner-ups): nodes read a view one after another.
        self.views = {node: dict(owners) for node in nodes}
        self.replicas = {node: dict(replicas or {}) for node in nodes}
        self.tables = {
            node: PresenceTable(
                resume_window=WINDOW,
                node_id=node,
                owner_of=lambda u, node=node: self.views[node].get(u),
                replica_of=lambda u, node=node: self.replicas[node].get(u),
            )
            for node in nodes
        }
        self.edges: dict[str, list[Envelope]] = {}
        self.now = 0.0
        self.drop_between_nodes = False
        self.dropped: list[tuple[str, Envelope]] = []

    def run(self, out: list[Outbound]) -> None:
        queue = deque(out)
        for _ in range(10_000):  # bounded: a loop between nodes would be a bug
            if not queue:
                return
            dest, envelope = queue.popleft()
            if dest in self.tables:
                if self.drop_between_nodes:
                    self.dropped.append((dest, envelope))
                    continue
                queue.extend(self.tables[dest].handle(envelope, self.now))
            else:
                self.edges.setdefault(dest, []).append(envelope)
        raise AssertionError("messages between nodes never settle")

    def send(self, command: Envelope, user: str) -> None:
        """An edge sends ``command`` to the owner of ``user``."""
        self.run(self.tables[self.owners[user]].handle(command, self.now))

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for table in self.tables.values():
            self.run(table.expire(self.now))

    def view(self, owners: dict[str, str], replicas: dict[str, str] | None = None) -> None:
        self.owners = owners
        for node, table in self.tables.items():
            self.views[node] = dict(owners)
            self.replicas[node] = dict(replicas or {})
            self.run(table.view_changed(self.now))

    def taken(self, edge: str = "edge-1") -> list[Envelope]:
        got, self.edges[edge] = self.edges.get(edge, []), []
        return got


def frames(envelopes: list[Envelope], session: str) -> list[dict[str, Any]]:
    """Presence frames delivered to ``session`` (without their status versions)."""
    return [
        {k: v for k, v in json.loads(e.payload).items() if k != "version"}
        for e in envelopes
        if isinstance(e, Deliver) and session in e.sessions
    ]


def watch(session: str, users: list[str]) -> WatchCmd:
    return WatchCmd(session, f"conn-{session}", "edge-1", next(_seqs), 1, users)


def watching_reply(envelopes: list[Envelope]) -> dict[str, str]:
    replies = [e for e in envelopes if isinstance(e, Reply)]
    assert len(replies) == 1, envelopes
    body: dict[str, str] = json.loads(replies[0].payload)["presence"]
    return body


def up(session: str, user: str, edge: str = "edge-1") -> SessionUp:
    return SessionUp(session, user, edge, f"conn-{session}")


def test_a_watch_of_a_user_owned_elsewhere_answers_once_the_owner_noted_its_status() -> None:
    net = Shards({"wally": "p1", "bob": "p2"})
    net.send(up("w1", "wally"), "wally")
    net.send(up("b1", "bob"), "bob")
    net.taken()
    net.send(watch("w1", ["bob"]), "wally")
    assert watching_reply(net.taken()) == {"bob": "online"}
    # Bob's status changes reach the watcher through its node, once each.
    net.send(SessionDown("b1", "edge-1", "conn-b1", True), "bob")
    assert [f["status"] for f in frames(net.taken(), "w1")] == ["offline"]
    net.send(up("b2", "bob"), "bob")
    net.send(up("b3", "bob"), "bob")  # a second session: bob stays online, no frame
    assert [f["status"] for f in frames(net.taken(), "w1")] == ["online"]


def test_a_lost_subscription_is_sent_again_and_the_watch_answered_then() -> None:
    net = Shards({"wally": "p1", "bob": "p2"})
    net.send(up("w1", "wally"), "wally")
    net.drop_between_nodes = True
    net.send(watch("w1", ["bob"]), "wally")
    assert net.taken() == []  # waiting for bob's owner
    net.drop_between_nodes = False
    net.tick(RESUBSCRIBE_INTERVAL)
    assert watching_reply(net.taken()) == {"bob": "offline"}


def test_a_claim_for_a_user_owned_elsewhere_without_a_lease_here_is_dropped_and_counted() -> None:
    net = Shards({"bob": "p2"})
    p1 = net.tables["p1"]
    assert p1.handle(ClaimCmd("b1", "bob", "edge-1", "conn-b1"), 0.0) == []
    assert p1.counters.misrouted == 1


def test_a_lease_sent_before_the_node_read_the_view_that_gives_it_the_user_is_kept() -> None:
    # The edge read the view first: its re-sync reaches p3 before p3 knows it owns bob.
    net = Shards({"wally": "p1", "bob": "p2"}, nodes=("p1", "p2", "p3"))
    net.send(up("w1", "wally"), "wally")
    net.send(up("b1", "bob", edge="edge-2"), "bob")
    net.send(watch("w1", ["bob"]), "wally")
    net.taken()
    net.run(net.tables["p3"].handle(EdgeSync("edge-2", [up("b1", "bob", "edge-2")], {}), 0.0))
    net.view({"wally": "p1", "bob": "p3"})
    net.tick(SYNC_GRACE)
    net.tick(RESUBSCRIBE_INTERVAL)
    assert net.tables["p3"].status("bob") == "online"
    assert frames(net.taken(), "w1") == []  # bob never flapped
    # A lease left on a node that does not own its user goes at the next view change.
    net.run(net.tables["p1"].handle(up("b9", "bob", "edge-3"), net.now))
    assert "b9" in net.tables["p1"].leases
    net.view({"wally": "p1", "bob": "p3"})
    assert "b9" not in net.tables["p1"].leases


def test_unwatching_ends_the_subscription_at_the_owner() -> None:
    net = Shards({"wally": "p1", "bob": "p2"})
    net.send(up("w1", "wally"), "wally")
    net.send(watch("w1", ["bob"]), "wally")
    assert net.tables["p2"]._subscribers == {"bob": {"p1"}}
    net.send(UnwatchCmd("w1", "conn-w1", "edge-1", next(_seqs), 2, ["bob"]), "wally")
    assert net.tables["p2"]._subscribers == {}
    assert net.tables["p1"]._subscribed == {} and net.tables["p1"]._remote == {}
    # ... and so does the watcher's session ending.
    net.send(watch("w1", ["bob"]), "wally")
    net.send(SessionDown("w1", "edge-1", "conn-w1", True), "wally")
    assert net.tables["p2"]._subscribers == {}


def test_a_resume_hears_what_changed_of_users_owned_elsewhere() -> None:
    net = Shards({"wally": "p1", "bob": "p2"})
    net.send(up("w1", "wally"), "wally")
    net.send(watch("w1", ["bob"]), "wally")
    net.send(SessionDown("w1", "edge-1", "conn-w1", False), "wally")  # wally drops
    net.send(up("b1", "bob"), "bob")  # bob comes online meanwhile
    net.taken()
    net.send(ClaimCmd("w1", "wally", "edge-2", "x.2"), "wally")
    (reply,) = [e for e in net.taken("edge-2") if isinstance(e, ClaimReply)]
    assert reply.live and reply.watching == {"bob": "online"} and reply.changed == ["bob"]


def test_a_user_moved_to_another_node_does_not_flap_for_its_watchers() -> None:
    net = Shards({"wally": "p1", "bob": "p2"}, nodes=("p1", "p2", "p3"))
    net.send(up("w1", "wally"), "wally")
    net.send(up("b1", "bob", edge="edge-2"), "bob")
    net.send(watch("w1", ["bob"]), "wally")
    net.taken()
    # p3 joins and takes bob over. p2 forgets bob silently; p3 answers no subscription
    # until the edges re-synced.
    net.view({"wally": "p1", "bob": "p3"})
    assert net.tables["p2"].leases == {}
    net.tick(SYNC_GRACE / 2)
    net.send(EdgeSync("edge-2", [up("b1", "bob", edge="edge-2")], {}), "bob")
    net.tick(SYNC_GRACE)
    assert net.tables["p3"]._subscribers == {"bob": {"p1"}}
    assert frames(net.taken(), "w1") == []  # no offline, no repeated online
    net.send(SessionDown("b1", "edge-2", "conn-b1", True), "bob")
    assert [f["status"] for f in frames(net.taken(), "w1")] == ["offline"]


def test_a_watch_waits_at_most_pending_timeout_for_a_silent_owner() -> None:
    net = Shards({"wally": "p1", "bob": "p2"})
    net.send(up("w1", "wally"), "wally")
    net.drop_between_nodes = True
    net.send(watch("w1", ["bob"]), "wally")
    net.tick(10.0)
    p1 = net.tables["p1"]
    assert p1._pending == {} and p1._awaiting == {}
    assert p1.counters.pending_dropped == 1


def test_a_forged_note_from_a_node_that_does_not_own_the_user_is_ignored() -> None:
    net = Shards({"wally": "p1", "bob": "p2"})
    net.send(up("w1", "wally"), "wally")
    net.send(watch("w1", ["bob"]), "wally")
    net.taken()
    p1 = net.tables["p1"]
    assert p1.handle(StatusNote("p3", {"bob": "online"}), 0.0) == []
    assert p1.counters.notes_ignored == 1 and p1.status("bob") == "offline"


def test_a_subscriber_that_goes_away_is_forgotten_by_the_owner() -> None:
    net = Shards({"wally": "p1", "bob": "p2"})
    net.send(up("w1", "wally"), "wally")
    net.send(watch("w1", ["bob"]), "wally")
    p2 = net.tables["p2"]
    assert p2._subscribers == {"bob": {"p1"}}
    p2.edge_lost("p1", 1.0)
    assert p2._subscribers == {}
    # The subscriber, told its owner restarted, subscribes again.
    out = net.tables["p1"].peer_restarted("p2", 1.0)
    assert out == [("p2", StatusSubscribe("p1", ["bob"]))]


def test_a_runner_up_that_restarted_is_copied_every_lease_again() -> None:
    net = Shards({"bob": "p1", "eve": "p1"}, replicas={"bob": "p2", "eve": "p2"})
    net.send(up("b1", "bob"), "bob")
    net.send(up("e1", "eve"), "eve")
    net.send(SessionDown("e1", "edge-1", "conn-e1", False), "eve")
    net.tables["p2"] = PresenceTable(
        resume_window=WINDOW,
        node_id="p2",
        owner_of=lambda u: net.views["p2"].get(u),
        replica_of=lambda u: net.replicas["p2"].get(u),
    )  # restarted: empty
    net.run(net.tables["p1"].peer_restarted("p2", net.now))
    copies = net.tables["p2"]._copies
    assert sorted(copies) == ["b1", "e1"]
    assert copies["e1"][0].suspended_for == WINDOW


def test_users_taken_over_from_a_dead_node_are_told_once_and_only_if_changed() -> None:
    net = Shards({"wally": "p1", "bob": "p2", "carol": "p2"})
    net.send(up("w1", "wally"), "wally")
    net.send(up("b1", "bob", edge="edge-2"), "bob")
    net.send(up("c1", "carol", edge="edge-2"), "carol")
    net.send(watch("w1", ["bob", "carol"]), "wally")
    assert watching_reply(net.taken()) == {"bob": "online", "carol": "online"}
    del net.tables["p2"]  # kill -9: bob's goodbye is lost with it
    net.view({"wally": "p1", "bob": "p1", "carol": "p1"})
    # The edges re-sync: carol is still connected, bob is not.
    net.send(EdgeSync("edge-2", [up("c1", "carol", edge="edge-2")], {}), "carol")
    net.send(EdgeSync("edge-1", [up("w1", "wally")], {"w1": ["bob", "carol"]}), "wally")
    assert frames(net.taken(), "w1") == []  # nothing before the grace is over
    net.tick(SYNC_GRACE)
    assert frames(net.taken(), "w1") == [{"type": "presence", "user": "bob", "status": "offline"}]
    net.tick(SYNC_GRACE)
    assert frames(net.taken(), "w1") == []
    net.send(up("b2", "bob", edge="edge-2"), "bob")
    assert [f["status"] for f in frames(net.taken(), "w1")] == ["online"]


def test_the_runner_up_takes_over_leases_and_watches_of_a_dead_owner() -> None:
    replicas = {"bob": "p2", "dana": "p2", "wally": "p2"}
    net = Shards({"wally": "p1", "bob": "p1", "dana": "p1"}, replicas=replicas)
    net.send(up("w1", "wally"), "wally")
    net.send(up("b1", "bob", edge="edge-2"), "bob")
    net.send(up("d1", "dana", edge="edge-2"), "dana")
    net.send(watch("w1", ["bob", "dana"]), "wally")
    net.taken()
    # wally drops (his resume window starts); dana closes; then p1 dies. bob stays.
    net.send(SessionDown("w1", "edge-1", "conn-w1", False), "wally")
    net.send(SessionDown("d1", "edge-2", "conn-d1", True), "dana")
    assert "d1" not in net.tables["p2"]._copies  # the end was copied too
    del net.tables["p1"]
    net.tick(5.0)
    net.view({"wally": "p2", "bob": "p2", "dana": "p2"})
    net.send(EdgeSync("edge-2", [up("b1", "bob", edge="edge-2")], {}), "bob")
    net.tick(SYNC_GRACE)
    p2 = net.tables["p2"]
    assert p2.status("bob") == "online" and p2.status("dana") == "offline"
    # wally resumes within what is left of his window, his watches intact.
    net.send(ClaimCmd("w1", "wally", "edge-3", "x.2"), "wally")
    (reply,) = [e for e in net.taken("edge-3") if isinstance(e, ClaimReply)]
    assert reply.live and reply.watching == {"bob": "online", "dana": "offline"}
    assert reply.changed == ["dana"]
    net.send(SessionDown("b1", "edge-2", "conn-b1", True), "bob")
    assert [f["status"] for f in frames(net.taken("edge-3"), "w1")] == ["offline"]


def test_an_adopted_connection_its_edge_does_not_name_again_is_suspended() -> None:
    # Bob closed while his owner was dead: the goodbye is lost; the copy says connected.
    net = Shards({"bob": "p1"}, replicas={"bob": "p2"})
    net.send(up("b1", "bob"), "bob")
    del net.tables["p1"]
    net.view({"bob": "p2"})
    net.send(EdgeSync("edge-1", [], {}), "bob")  # edge-1 no longer has bob
    p2 = net.tables["p2"]
    assert p2.leases["b1"].suspended_until is None
    net.tick(SYNC_GRACE)
    assert p2.leases["b1"].suspended_until == net.now + WINDOW - 0.0
    net.tick(WINDOW)
    assert p2.status("bob") == "offline"


def test_a_copy_whose_window_lapsed_is_not_adopted() -> None:
    net = Shards({"bob": "p1"}, replicas={"bob": "p2"})
    net.send(up("b1", "bob"), "bob")
    net.send(SessionDown("b1", "edge-1", "conn-b1", False), "bob")
    del net.tables["p1"]
    net.tick(WINDOW + 1)
    net.view({"bob": "p2"})
    assert net.tables["p2"].leases == {}


def test_a_user_moved_to_a_node_that_was_not_its_runner_up_is_handed_over() -> None:
    net = Shards({"bob": "p1"}, nodes=("p1", "p2", "p3"), replicas={"bob": "p2"})
    net.send(up("b1", "bob"), "bob")
    net.send(SessionDown("b1", "edge-1", "conn-b1", False), "bob")  # away, may resume
    net.view({"bob": "p3"}, replicas={"bob": "p1"})
    assert "b1" not in net.tables["p1"].leases
    assert net.tables["p3"].leases["b1"].suspended_until is not None
    assert "b1" in net.tables["p1"]._copies  # p1 is bob's runner-up now
    assert net.tables["p2"]._copies == {}  # p2 is nothing to bob any more
    net.send(ClaimCmd("b1", "bob", "edge-2", "x.2"), "bob")
    (reply,) = [e for e in net.taken("edge-2") if isinstance(e, ClaimReply)]
    assert reply.live


def test_a_watch_over_users_of_two_other_nodes_is_answered_once_both_noted() -> None:
    net = Shards({"wally": "p1", "bob": "p2", "eve": "p3"}, nodes=("p1", "p2", "p3"))
    net.send(up("w1", "wally"), "wally")
    net.send(up("e1", "eve", edge="edge-2"), "eve")
    del net.tables["p3"]  # eve's owner does not answer (yet)
    net.send(watch("w1", ["bob", "eve"]), "wally")
    assert [e for e in net.taken() if isinstance(e, Reply)] == []  # bob noted, eve not
    p1 = net.tables["p1"]
    assert p1._awaiting.keys() == {"eve"}
    out = p1.handle(StatusNote("p3", {"eve": "online"}), net.now)
    assert watching_reply([e for _, e in out]) == {"bob": "offline", "eve": "online"}
    assert p1._pending == {} and p1._awaiting == {}
