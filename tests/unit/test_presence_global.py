"""Global presence (issue 15): regional statuses merged into one, sans I/O.

``RegionalStatuses`` against a model of each region's true status sequence, fed notes
reordered and duplicated; then one ``PresenceTable`` per region (each the only presence
node of its region), wired in memory with a WAN that reorders, duplicates and delays the
notes between regions: a watcher in one region is told each change of the *global* status
once (online in any region), with versions always increasing, and ends on the truth.

Runs: a fixed set of examples by default; ``PRESENCE_MODEL_EXAMPLES=N`` runs N examples
with fresh randomness.
"""

from __future__ import annotations

import json
import os
import random
from collections import deque
from typing import Any

from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from presence.regional import RegionalStatuses, Status
from presence.table import (
    CROSS_BATCH,
    CROSS_REFRESH_INTERVAL,
    CROSS_WAIT,
    Outbound,
    PresenceTable,
)
from signalpost.wire import (
    Deliver,
    Envelope,
    Reply,
    SessionDown,
    SessionUp,
    StatusSubscribe,
    WatchCmd,
)

EXAMPLES = int(os.environ.get("PRESENCE_MODEL_EXAMPLES", "0"))
REGIONS = ("eu", "us", "ap")
WINDOW = 30.0


def _settings(examples: int = 300) -> settings:
    return settings(
        max_examples=EXAMPLES or examples,
        derandomize=not EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )


# ------------------------------------------------------------------ the merge, alone


@_settings()
@given(
    changes=st.lists(st.sampled_from(["eu", "us"]), max_size=12),
    seed=st.integers(0, 2**32 - 1),
    duplicates=st.integers(0, 6),
)
def test_merged_status_is_the_newest_noted_per_region_whatever_the_order(
    changes: list[str], seed: int, duplicates: int
) -> None:
    """Each region's status flips at each of its changes (versions rising, not dense);
    notes arrive in any order, some twice: what is kept per region is the newest noted,
    and the user is online elsewhere while any region's newest says so."""
    rng = random.Random(seed)
    notes: list[tuple[str, Status, int]] = []
    truth: dict[str, tuple[Status, int]] = {}
    for region in changes:
        status, version = truth.get(region, ("offline", 0))
        status = "online" if status == "offline" else "offline"
        version += rng.randint(1, 3)
        truth[region] = (status, version)
        notes.append((region, status, version))
    notes += [rng.choice(notes) for _ in range(duplicates if notes else 0)]
    rng.shuffle(notes)
    merged = RegionalStatuses()
    newest: dict[str, tuple[int, Status]] = {}
    for region, status, version in notes:
        merged.note("u", region, f"{region}-p", status, version)
        if version >= newest.get(region, (0, "offline"))[0]:
            newest[region] = (version, status)
        heard = {r: merged.heard("u", r) for r in newest}
        assert {r: (h.version, h.status) for r, h in heard.items() if h} == newest
        assert merged.online("u") == any(s == "online" for _, s in newest.values())
    assert merged.online("u") == any(s == "online" for s, _ in truth.values())


def test_a_stale_node_counts_as_offline_until_it_notes_again() -> None:
    merged = RegionalStatuses()
    merged.note("u", "us", "us-p", "online", 7)
    assert merged.node_stale("eu-p") == [] and merged.online("u")
    assert merged.node_stale("us-p") == ["u"] and not merged.online("u")
    merged.note("u", "us", "us-p", "online", 7)  # noted again, same version: live again
    assert merged.online("u")


def test_the_merge_is_bounded() -> None:
    merged = RegionalStatuses(max_users=3)
    for n in range(10):
        merged.note(f"u{n}", "us", "us-p", "online", 1)
    assert len(merged) == 3 and merged.users() == ["u7", "u8", "u9"]


# ------------------------------------------------------------------ regions of tables


class Regions:
    """One presence table per region (node ``<region>-p``), edges ``edge-<region>``.
    Messages within a region go at once; between regions they wait on the ``wan`` until
    delivered (in any order, maybe twice)."""

    def __init__(self, regions: tuple[str, ...] = ("eu", "us")) -> None:
        self.now = 100.0
        self.tables = {
            r: PresenceTable(
                resume_window=WINDOW,
                node_id=f"{r}-p",
                owner_of=lambda u, r=r: f"{r}-p",
                version_floor=lambda: int(self.now * 1000),
                region=r,
                regions=regions,
                owner_in=lambda region, u: f"{region}-p" if region in self.alive else None,
            )
            for r in regions
        }
        self.alive = set(regions)
        self.wan: list[tuple[str, Envelope]] = []
        self.cut: set[str] = set()  # regions whose WAN traffic is lost
        self.edges: dict[str, list[Envelope]] = {}
        for region, table in self.tables.items():  # every link between regions is up
            for other in regions:
                if other != region:
                    self.run(table.remote_up(f"{other}-p", self.now), region)

    def run(self, out: list[Outbound], sender: str) -> None:
        queue = deque((sender, dest, env) for dest, env in out)
        for _ in range(100_000):
            if not queue:
                return
            source, dest, envelope = queue.popleft()
            region = dest.removesuffix("-p")
            if region in self.tables:
                if region != source:
                    if source not in self.cut and region not in self.cut:
                        self.wan.append((dest, envelope))
                    continue
                queue.extend(
                    (region, d, e) for d, e in self.tables[region].handle(envelope, self.now)
                )
            else:
                self.edges.setdefault(dest, []).append(envelope)
        raise AssertionError("never settles")

    def send(self, region: str, command: Envelope) -> None:
        self.run(self.tables[region].handle(command, self.now), region)

    def deliver(self, index: int = 0, *, keep: bool = False) -> None:
        dest, envelope = self.wan[index] if keep else self.wan.pop(index)
        region = dest.removesuffix("-p")
        self.run(self.tables[region].handle(envelope, self.now), region)

    def drain(self, rng: random.Random | None = None) -> None:
        """Deliver everything on the WAN (in a random order with ``rng``)."""
        while self.wan:
            self.deliver(rng.randrange(len(self.wan)) if rng else 0)

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for region, table in self.tables.items():
            self.run(table.expire(self.now), region)

    def presence(self, edge: str = "edge-eu") -> list[dict[str, Any]]:
        got, self.edges[edge] = self.edges.get(edge, []), []
        return [
            json.loads(e.payload)
            for e in got
            if isinstance(e, Deliver) and b'"presence"' in e.payload
        ]

    def watch(self, region: str = "eu", users: tuple[str, ...] = ("u",)) -> dict[str, str]:
        """Watch ``users`` from a session in ``region``; the reply (the WAN delivered)."""
        edge = f"edge-{region}"
        self.send(region, SessionUp("w", "watcher", edge, "w.1"))
        self.send(region, WatchCmd("w", "w.1", edge, 1, 1, list(users)))
        self.drain()
        (reply,) = [e for e in self.edges.pop(edge) if isinstance(e, Reply)]
        body: dict[str, str] = json.loads(reply.payload)["presence"]
        return body

    def up(self, region: str, session: str, user: str = "u") -> None:
        self.send(region, SessionUp(session, user, f"edge-{region}", f"{session}.1"))

    def down(self, region: str, session: str) -> None:
        self.send(region, SessionDown(session, f"edge-{region}", f"{session}.1", True))


def _statuses(frames: list[dict[str, Any]]) -> list[str]:
    return [f["status"] for f in frames]


def test_a_watcher_sees_a_user_of_another_region_go_online_and_offline() -> None:
    regions = Regions()
    assert regions.watch("eu") == {"u": "offline"}
    regions.drain()  # the subscription to u's owner in us, and its answer
    regions.up("us", "s1")
    regions.drain()
    regions.down("us", "s1")
    regions.drain()
    frames = regions.presence()
    assert _statuses(frames) == ["online", "offline"]
    assert frames[0]["version"] < frames[1]["version"]


def test_a_user_online_in_two_regions_is_online_once() -> None:
    regions = Regions()
    regions.watch("eu")
    regions.drain()
    regions.up("us", "s1")
    regions.drain()
    regions.up("eu", "s2")  # online in eu too: nothing new for the watcher
    regions.drain()
    regions.down("us", "s1")  # still online in eu
    regions.drain()
    assert _statuses(regions.presence()) == ["online"]
    regions.down("eu", "s2")
    regions.drain()
    assert _statuses(regions.presence()) == ["offline"]


def test_a_watch_of_a_user_online_elsewhere_waits_for_its_status_there() -> None:
    regions = Regions()
    regions.up("us", "s1")
    regions.send("eu", SessionUp("w", "watcher", "edge-eu", "w.1"))
    regions.send("eu", WatchCmd("w", "w.1", "edge-eu", 1, 1, ["u"]))
    assert regions.edges.get("edge-eu", []) == []  # waits for us's answer
    regions.drain()
    (reply,) = regions.edges.pop("edge-eu")
    assert isinstance(reply, Reply) and json.loads(reply.payload)["presence"] == {"u": "online"}
    regions.drain()
    regions.tick(CROSS_WAIT + 0.1)
    assert regions.presence() == []  # told once: in the reply


def test_a_watch_waits_at_most_cross_wait_and_not_for_a_region_known_down() -> None:
    regions = Regions()
    regions.up("us", "s1")
    regions.cut.add("us")  # the subscription is lost
    regions.send("eu", SessionUp("w", "watcher", "edge-eu", "w.1"))
    regions.send("eu", WatchCmd("w", "w.1", "edge-eu", 1, 1, ["u"]))
    assert regions.edges.get("edge-eu", []) == []
    regions.tick(CROSS_WAIT)
    (reply,) = regions.edges.pop("edge-eu")  # answered with what is known
    assert json.loads(reply.payload)["presence"] == {"u": "offline"}
    # The link to us is known to be down: a watch is answered at once.
    regions.tables["eu"].remote_down("us-p", regions.now)
    regions.send("eu", WatchCmd("w", "w.1", "edge-eu", 2, 2, ["u", "v"]))
    (reply,) = regions.edges.pop("edge-eu")
    assert json.loads(reply.payload)["presence"] == {"u": "offline", "v": "offline"}


def test_a_cut_off_region_shows_its_last_status_then_offline_then_the_truth() -> None:
    regions = Regions()
    regions.watch("eu")
    regions.drain()
    regions.up("us", "s1")
    regions.drain()
    assert _statuses(regions.presence()) == ["online"]
    eu = regions.tables["eu"]
    regions.cut.add("us")
    eu.remote_down("us-p", regions.now)
    regions.tick(eu.stale_after - 1)
    assert regions.presence() == []  # the last known status, for stale_after
    regions.tick(1.5)
    assert _statuses(regions.presence()) == ["offline"]
    regions.cut.clear()  # healed: subscribed again, the status now comes
    regions.run(eu.remote_up("us-p", regions.now), "eu")
    regions.drain()
    assert _statuses(regions.presence()) == ["online"]


def test_a_lost_subscription_is_sent_again() -> None:
    regions = Regions()
    regions.cut.add("us")
    regions.send("eu", SessionUp("w", "watcher", "edge-eu", "w.1"))
    regions.send("eu", WatchCmd("w", "w.1", "edge-eu", 1, 1, ["u"]))
    regions.up("us", "s1")
    regions.tick(CROSS_WAIT)
    regions.edges.clear()  # answered: offline
    regions.cut.clear()
    regions.tick(1.1)
    regions.drain()
    assert _statuses(regions.presence()) == ["online"]


def test_single_region_does_no_cross_region_work() -> None:
    table = PresenceTable(
        resume_window=WINDOW,
        node_id="p",
        owner_of=lambda u: "p",
        region="eu",
        regions=["eu"],
        owner_in=lambda r, u: "x",
    )
    out = table.handle(SessionUp("w", "watcher", "edge", "w.1"), 0.0)
    out += table.handle(WatchCmd("w", "w.1", "edge", 1, 1, ["u"]), 0.0)
    out += table.handle(SessionUp("s", "u", "edge", "s.1"), 0.0)
    out += table.expire(20.0)
    assert all(dest in ("edge",) for dest, _ in out), out


_step = st.one_of(
    st.tuples(st.just("up"), st.sampled_from(REGIONS), st.integers(0, 1)),
    st.tuples(st.just("down"), st.sampled_from(REGIONS), st.integers(0, 1)),
    st.tuples(st.just("deliver"), st.integers(0, 1000), st.booleans()),
    st.tuples(st.just("tick"), st.just(""), st.integers(1, 3)),
)


@_settings(200)
@given(steps=st.lists(_step, max_size=60), seed=st.integers(0, 2**32 - 1))
def test_a_watcher_is_told_each_change_of_the_global_status_once(
    steps: list[tuple[str, Any, Any]], seed: int
) -> None:
    """Sessions of one user come and go in three regions; notes between regions are
    delivered late, out of order, some twice. The watcher in eu is told only changes
    (statuses alternate), versions rise, and once everything is delivered it has the
    truth: online while a session holds a lease in any region."""
    regions = Regions(REGIONS)
    told = regions.watch("eu")["u"]
    versions = [0]
    sessions: set[tuple[str, int]] = set()
    for action, where, arg in steps:
        if action == "up":
            regions.up(where, f"s-{where}-{arg}")
            sessions.add((where, arg))
        elif action == "down":
            regions.down(where, f"s-{where}-{arg}")
            sessions.discard((where, arg))
        elif action == "deliver" and regions.wan:
            regions.deliver(where % len(regions.wan), keep=arg)  # keep: it comes again
        elif action == "tick":
            regions.tick(arg * 0.5)
        for frame in regions.presence():
            assert frame["status"] != told, "told a status the watcher had"
            assert frame["version"] > versions[-1]
            told = frame["status"]
            versions.append(frame["version"])
    rng = random.Random(seed)
    regions.drain(rng)
    regions.tick(1.1)  # subscriptions lost on the way are sent again
    regions.drain(rng)
    for frame in regions.presence():
        assert frame["status"] != told and frame["version"] > versions[-1]
        told = frame["status"]
        versions.append(frame["version"])
    assert told == ("online" if sessions else "offline")


class Nodes:
    """Presence nodes of several regions by name (``<region>-<n>``), each region with a
    view (user -> owner) its nodes and the other regions read; no loss, no delay."""

    def __init__(self, views: dict[str, dict[str, str]]) -> None:
        self.now = 100.0
        self.views = views  # region -> user -> owner
        self.edges: dict[str, list[Envelope]] = {}
        self.tables: dict[str, PresenceTable] = {}
        self.hold_wan = False  # messages to another region wait in ``wan`` while set
        self.wan: list[tuple[str, Envelope]] = []
        for region, view in views.items():
            for node in sorted(set(view.values())):
                self.tables[node] = PresenceTable(
                    resume_window=WINDOW,
                    node_id=node,
                    owner_of=lambda u, r=region: self.views[r].get(u),
                    replica_of=lambda u: None,
                    version_floor=lambda: int(self.now * 1000),
                    region=region,
                    regions=list(views),
                    owner_in=lambda r, u: self.views[r].get(u),
                )
        for node, table in self.tables.items():
            for other in self.tables:
                if other.split("-")[0] != node.split("-")[0]:
                    self.run(table.remote_up(other, self.now))

    def run(self, out: list[Outbound], sender: str = "") -> None:
        queue = deque((sender, dest, envelope) for dest, envelope in out)
        while queue:
            source, dest, envelope = queue.popleft()
            if dest in self.tables:
                if self.hold_wan and source and source[:2] != dest[:2]:
                    self.wan.append((dest, envelope))
                    continue
                queue.extend((dest, d, e) for d, e in self.tables[dest].handle(envelope, self.now))
            else:
                self.edges.setdefault(dest, []).append(envelope)

    def to(self, node: str, command: Envelope) -> None:
        self.run(self.tables[node].handle(command, self.now), node)

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for node, table in list(self.tables.items()):
            self.run(table.expire(self.now), node)

    def release_wan(self) -> None:
        held, self.wan = self.wan, []
        self.run(held)

    def presence(self, edge: str) -> list[str]:
        got, self.edges[edge] = self.edges.get(edge, []), []
        return [json.loads(e.payload)["status"] for e in got if isinstance(e, Deliver)]


def test_a_user_online_only_elsewhere_does_not_flap_when_its_owner_here_dies() -> None:
    """u is owned by eu-1 and online in us only; the watcher's node eu-2 is told so by
    eu-1. eu-1 dies: eu-2 takes u over, and tells its watcher nothing (it waited for us's
    answer before settling u), not offline-then-online."""
    nodes = Nodes({"eu": {"u": "eu-1", "watcher": "eu-2"}, "us": {"u": "us-1"}})
    nodes.to("us-1", SessionUp("s", "u", "edge-us", "s.1"))
    nodes.to("eu-2", SessionUp("w", "watcher", "edge-eu", "w.1"))
    nodes.to("eu-2", WatchCmd("w", "w.1", "edge-eu", 1, 1, ["u"]))
    (reply,) = nodes.edges.pop("edge-eu")
    assert json.loads(reply.payload)["presence"] == {"u": "online"}
    del nodes.tables["eu-1"]  # kill -9: a new view gives eu-2 everything
    nodes.views["eu"] = {"u": "eu-2", "watcher": "eu-2"}
    nodes.hold_wan = True  # us answers eu-2's subscription late: after SYNC_GRACE
    nodes.run(nodes.tables["eu-2"].view_changed(nodes.now), "eu-2")
    nodes.run(nodes.tables["us-1"].region_placement_changed("eu", nodes.now), "us-1")
    for _ in range(3):
        nodes.tick(0.5)
    nodes.hold_wan = False
    nodes.release_wan()
    for _ in range(12):
        nodes.tick(0.5)
    assert nodes.presence("edge-eu") == []
    nodes.to("us-1", SessionDown("s", "edge-us", "s.1", True))
    assert nodes.presence("edge-eu") == ["offline"]


def test_a_user_of_another_region_watched_through_a_node_that_does_not_own_it() -> None:
    """The watcher's node eu-2 subscribes at u's owner eu-1, which waits for us before it
    answers: the watch says online; later changes come once each."""
    nodes = Nodes({"eu": {"u": "eu-1", "watcher": "eu-2"}, "us": {"u": "us-1"}})
    nodes.to("us-1", SessionUp("s", "u", "edge-us", "s.1"))
    nodes.to("eu-2", SessionUp("w", "watcher", "edge-eu", "w.1"))
    nodes.to("eu-2", WatchCmd("w", "w.1", "edge-eu", 1, 1, ["u"]))
    (reply,) = nodes.edges.pop("edge-eu")
    assert json.loads(reply.payload)["presence"] == {"u": "online"}
    nodes.to("eu-1", SessionUp("s2", "u", "edge-eu2", "s2.1"))  # online in eu too
    nodes.to("us-1", SessionDown("s", "edge-us", "s.1", True))
    assert nodes.presence("edge-eu") == []
    nodes.to("eu-1", SessionDown("s2", "edge-eu2", "s2.1", True))
    assert nodes.presence("edge-eu") == ["offline"]


def test_subscriptions_to_another_region_go_in_bounded_pieces() -> None:
    regions = Regions()
    users = [f"u{n}" for n in range(2 * CROSS_BATCH + 5)]
    regions.send("eu", SessionUp("w", "watcher", "edge-eu", "w.1"))
    regions.send("eu", WatchCmd("w", "w.1", "edge-eu", 1, 1, users))
    sizes = [len(e.users) for _, e in regions.wan if isinstance(e, StatusSubscribe)]
    assert sorted(sizes) == [5, CROSS_BATCH, CROSS_BATCH]
    regions.drain()
    (reply,) = regions.edges.pop("edge-eu")
    assert json.loads(reply.payload)["presence"] == dict.fromkeys(users, "offline")


def test_a_note_lost_on_the_way_is_repaired_by_the_next_refresh() -> None:
    regions = Regions()
    regions.watch("eu")
    regions.tick(0.5)  # (the refresh timer starts)
    regions.up("us", "s1")
    regions.wan.clear()  # the note is lost (a link reset that did not go down)
    regions.tick(CROSS_REFRESH_INTERVAL / 2)
    regions.drain()
    assert regions.presence() == []
    regions.tick(CROSS_REFRESH_INTERVAL / 2)
    regions.drain()
    assert _statuses(regions.presence()) == ["online"]
