"""Status versions: each change of a user's status once, across owners.

Every status a watcher is told carries the user's version (odd online, even offline,
higher at every change), copied with the user's leases to its runner-up and noted to the
nodes that subscribe. After a failover, a resumed watcher whose node lost what it was
last told (``_told`` is not copied when only it changes) is sent that status again, with
the version it already has: the SDKs drop it (signalpost/client.py, signalpost.js).
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any

import pytest

from presence.table import SYNC_GRACE, Outbound, PresenceTable
from signalpost.client import SignalpostClient
from signalpost.placement import owner
from signalpost.wire import (
    ClaimCmd,
    ClaimReply,
    Deliver,
    Evict,
    Evicted,
    SessionDown,
    SessionUp,
    StatusNote,
    WatchCmd,
)
from tests.unit.test_presence_replicated_model import NODES, WINDOW, Cluster


class Recording(Cluster):
    """The model's cluster, keeping what reaches the edges."""

    def __init__(self) -> None:
        super().__init__()
        self.edges: list[tuple[str, Any]] = []

    def run(self, out: list[Outbound]) -> None:
        queue = deque(out)
        while queue:
            dest, envelope = queue.popleft()
            if dest in self.tables:
                queue.extend(self.tables[dest].handle(envelope, self.now))
            elif dest in NODES:
                pass  # dead
            elif isinstance(envelope, Evict):
                evicted = Evicted(envelope.session, envelope.conn, dest)
                queue.extend(self.owner(envelope.user).handle(evicted, self.now))
            else:
                self.edges.append((dest, envelope))

    def told(self, session: str) -> list[dict[str, Any]]:
        return [
            json.loads(e.payload)
            for _, e in self.edges
            if isinstance(e, Deliver) and session in e.sessions
        ]


def _named(prefix: str, where: str, nodes: list[str]) -> str:
    return next(f"{prefix}{i}" for i in range(500) if owner(f"{prefix}{i}", nodes) == where)


def test_versions_rise_at_each_change_and_say_the_status() -> None:
    table = PresenceTable(resume_window=WINDOW)
    table.handle(SessionUp("w", "wally", "e0", "c1"), 0.0)
    out = table.handle(WatchCmd("w", "c1", "e0", 1, 1, ["bob"]), 0.0)
    (watching,) = [json.loads(e.payload) for _, e in out if hasattr(e, "payload")]
    assert watching["versions"] == {"bob": 2}  # offline, never seen: even
    seen = []
    for now, command in enumerate(
        [
            SessionUp("b1", "bob", "e1", "c2"),
            SessionUp("b2", "bob", "e1", "c3"),  # still online: no change, no version
            SessionDown("b1", "e1", "c2", True),
            SessionDown("b2", "e1", "c3", True),
            SessionUp("b3", "bob", "e1", "c4"),
        ]
    ):
        for _, envelope in table.handle(command, float(now)):
            if isinstance(envelope, Deliver):
                seen.append(json.loads(envelope.payload))
    assert [(f["status"], f["version"]) for f in seen] == [
        ("online", 3),
        ("offline", 4),
        ("online", 5),
    ]


def test_a_floor_starts_versions_a_node_does_not_know() -> None:
    table = PresenceTable(resume_window=WINDOW, version_floor=lambda: 1_000)
    assert table.version("bob") == 1_000  # offline: even
    table.handle(SessionUp("b1", "bob", "e1", "c2"), 0.0)
    assert table.version("bob") == 1_001


@pytest.mark.parametrize("same_owner", [False, True])
def test_a_resumed_watcher_is_told_again_only_with_the_version_it_knows(
    same_owner: bool,
) -> None:
    """The watcher's node dies with what it last told the watcher; the node that takes
    the watcher over reports that status as changed, with the same version."""
    cluster = Recording()
    doomed = NODES[0]
    wally = _named("wally", doomed, NODES)
    bob = _named("bob", doomed if same_owner else NODES[1], NODES)
    if not same_owner and owner(bob, [n for n in NODES if n != doomed]) == doomed:
        pytest.skip("unreachable")
    reference = PresenceTable(resume_window=WINDOW)  # what the edges hold, for re-sync

    def both(user: str, command: Any) -> None:
        reference.handle(command, cluster.now)
        cluster.send(user, command)

    both(wally, SessionUp("w", wally, "e0", "c1.1"))
    both(wally, WatchCmd("w", "c1.1", "e0", 1, 1, [bob]))
    both(bob, SessionUp("b", bob, "e1", "c2.1"))
    (online,) = cluster.told("w")
    assert online["status"] == "online" and online["version"] % 2 == 1

    # Wally's connection drops; the goodbye is lost with its node (the edge no longer
    # holds the session, so its re-sync does not name it).
    reference.handle(SessionDown("w", "e0", "c1.1", False), cluster.now)
    cluster.kill(doomed)
    cluster.change_view(reference)
    cluster.tick(SYNC_GRACE)
    cluster.edges.clear()
    cluster.send(wally, ClaimCmd("w", wally, "e1", "c3.2"))
    (reply,) = [e for _, e in cluster.edges if isinstance(e, ClaimReply)]
    assert reply.live and reply.watching == {bob: "online"}
    # Told again (its node lost what it told) ... with the version the watcher has. (With
    # bob's leases adopted by the same node, after wally's, the adoption itself tells the
    # old connection, gone, and the claim then reports nothing changed.)
    assert reply.changed == [bob] or (same_owner and reply.changed == [])
    assert reply.versions == {bob: online["version"]}
    # A real change later: a higher version.
    cluster.edges.clear()
    both(bob, SessionDown("b", "e1", "c2.1", True))
    (offline,) = cluster.told("w")
    assert offline["status"] == "offline" and offline["version"] > online["version"]


def test_a_watchers_node_ignores_a_note_older_than_one_it_has() -> None:
    nodes = ["p0", "p1"]
    bob = _named("bob", "p1", nodes)
    table = PresenceTable(
        resume_window=WINDOW, node_id="p0", owner_of=lambda user: owner(user, nodes)
    )
    wally = _named("wally", "p0", nodes)
    table.handle(SessionUp("w", wally, "e0", "c1"), 0.0)
    table.handle(WatchCmd("w", "c1", "e0", 1, 1, [bob]), 0.0)
    table.handle(StatusNote("p1", {bob: "offline"}, {bob: 4}), 0.0)
    out = table.handle(StatusNote("p1", {bob: "online"}, {bob: 3}), 0.0)  # late
    assert [e for _, e in out if isinstance(e, Deliver)] == []
    assert table.status(bob) == "offline"
    out = table.handle(StatusNote("p1", {bob: "online"}, {bob: 5}), 0.0)
    (deliver,) = [e for _, e in out if isinstance(e, Deliver)]
    assert json.loads(deliver.payload) == {
        "type": "presence",
        "user": bob,
        "status": "online",
        "version": 5,
    }


async def test_the_python_sdk_drops_a_status_it_was_told_already() -> None:
    client = SignalpostClient("ws://127.0.0.1:1", "token")
    client.presence["bob"] = "offline"
    client._note_versions({"presence": {"bob": "offline"}, "versions": {"bob": 2}})
    for frame in [
        {"type": "presence", "user": "bob", "status": "online", "version": 3},
        {"type": "presence", "user": "bob", "status": "online", "version": 3},  # again
        {"type": "presence", "user": "bob", "status": "online", "version": 1},  # older
        {"type": "presence", "user": "bob", "status": "offline", "version": 4},
        {"type": "presence", "user": "bob", "status": "offline", "version": 4},  # again
    ]:
        client._on_frame(frame)
    events = []
    while not client._events.empty():
        events.append(client._events.get_nowait())
    assert [(e.status, e.version) for e in events] == [("online", 3), ("offline", 4)]
    assert client.presence["bob"] == "offline"
    await asyncio.sleep(0)
