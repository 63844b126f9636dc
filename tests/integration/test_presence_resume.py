"""A watcher that resumes keeps its watches and hears what changed while it was away."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from edge.server import ClientConnection, EdgeServer
from signalpost.client import PresenceChanged, Resumed, SignalpostClient
from signalpost.wire import (
    ClaimCmd,
    ClientMessage,
    Deliver,
    Envelope,
    PresenceFrame,
    SessionDown,
    SessionUp,
    Watch,
    WatchCmd,
    encode_frame,
)
from tests.helpers import raw_client, status_of, token, unversioned, url_of
from tests.integration.conftest import DevFactory


async def test_a_resumed_watcher_is_told_the_changes_it_missed(dev_factory: DevFactory) -> None:
    server = await dev_factory()
    url = url_of(server)
    eve = await raw_client(url, "eve")
    watcher = await raw_client(url, "watcher")
    watching = await watcher.request({"type": "watch", "id": 1, "users": ["eve", "bob"]})
    assert watching["presence"] == {"eve": "online", "bob": "offline"}

    assert watcher.ws.transport is not None
    watcher.ws.transport.abort()  # dropped, not closed: the session waits to be resumed
    await eve.ws.close(1000)  # eve goes offline while nobody can tell the watcher
    bob = await raw_client(url, "bob")
    await bob.ws.close(1000)  # bob comes and goes: no net change to report

    again = await raw_client(url, "watcher", resume=watcher.welcome["resume"])
    assert again.welcome["resumed"] is True
    assert unversioned(await again.recv()) == {
        "type": "presence",
        "user": "eve",
        "status": "offline",
    }

    # The watches carried over: the next change arrives without a new watch. It is also
    # the marker: presence sends it after the resume's report, so a frame for bob's
    # coming and going, or eve's offline twice, would come before it.
    await raw_client(url, "eve")
    await again.until_markers({"type": "presence", "user": "eve", "status": "online"})
    unwatched = await again.request({"type": "unwatch", "id": 2, "users": ["eve", "bob"]})
    assert unwatched == {"type": "unwatched", "id": 2}


async def test_the_sdk_watches_again_after_a_reconnect(
    dev: EdgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The edge that takes the resume (or a presence service that restarted meanwhile) may
    # not know the session's watches: the client sends them again.
    watches_seen: list[list[str]] = []
    dispatch = dev._dispatch

    def recording(client: ClientConnection, message: ClientMessage) -> None:
        if isinstance(message, Watch):
            watches_seen.append(list(message.users))
        dispatch(client, message)

    monkeypatch.setattr(dev, "_dispatch", recording)
    url = url_of(dev)
    async with SignalpostClient(url, token("alice")) as alice:
        assert await alice.watch(["bob", "carol"]) == {"bob": "offline", "carol": "offline"}
        await alice.unwatch(["carol"])
        assert alice._ws is not None and alice._ws.transport is not None
        alice._ws.transport.abort()  # dropped, not closed: the client resumes by itself
        assert (await alice.next_event(Resumed, timeout=10)).resumed
        for _ in range(100):
            if len(watches_seen) == 2:
                break
            await asyncio.sleep(0.05)
        assert watches_seen == [["bob", "carol"], ["bob"]]  # carol was unwatched
        async with SignalpostClient(url, token("bob")):
            event = await alice.next_event(PresenceChanged, timeout=10)
        assert status_of(event) == ("bob", "online")
        assert alice.presence == {"bob": "online"}


async def test_a_change_presence_sends_during_the_resume_claim_is_not_lost(
    dev: EdgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Presence routes to the resuming connection as soon as it answers the claim; the edge
    # registers the session only once the claim's answer has been awaited.
    url = url_of(dev)
    watcher = await raw_client(url, "watcher")
    assert (await watcher.request({"type": "watch", "id": 1, "users": ["carol"]}))["presence"] == {
        "carol": "offline"
    }
    session = watcher.welcome["session"]
    assert watcher.ws.transport is not None
    watcher.ws.transport.abort()  # dropped: the session waits to be resumed
    for _ in range(100):
        if session not in dev.sessions:
            break
        await asyncio.sleep(0.02)
    to_presence = dev.backplane.to_presence

    def carol_comes_online_right_after_the_claim(user: str, command: Envelope) -> None:
        to_presence(user, command)  # dev mode: the claim is answered within this call
        if isinstance(command, ClaimCmd):
            to_presence("carol", SessionUp("carol-session", "carol", dev.edge_id, "carol-conn"))

    monkeypatch.setattr(dev.backplane, "to_presence", carol_comes_online_right_after_the_claim)
    again = await raw_client(url, "watcher", resume=watcher.welcome["resume"])
    assert again.welcome["resumed"] is True
    assert unversioned(await again.recv()) == {
        "type": "presence",
        "user": "carol",
        "status": "online",
    }
    # The marker: carol goes offline, told by presence after everything above, so a
    # second "online" (held for the claim and also sent straight) would come before it.
    dev.backplane.to_presence(
        "carol", SessionDown("carol-session", dev.edge_id, "carol-conn", True)
    )
    await again.until_markers({"type": "presence", "user": "carol", "status": "offline"})
    assert not dev._held_for_claim


async def test_a_resume_dropped_while_its_claim_is_out_starts_the_resume_window(
    dev: EdgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Presence moves the lease to the resuming connection when it answers the claim; if
    # that connection is gone before the edge registers it, nobody would ever say
    # goodbye for it, and the user would stay online for good.
    url = url_of(dev)
    first = await raw_client(url, "dana")
    session = first.welcome["session"]
    assert first.ws.transport is not None
    first.ws.transport.abort()
    for _ in range(100):
        if session not in dev.sessions:
            break
        await asyncio.sleep(0.02)
    presence = dev.backplane.presence  # type: ignore[attr-defined]
    to_presence = dev.backplane.to_presence
    claimed = asyncio.Event()

    def claim_answered_late(user: str, command: Envelope) -> None:
        if isinstance(command, ClaimCmd):
            # The answer comes 0.3 s later, after the client has gone.
            asyncio.get_running_loop().call_later(0.3, to_presence, user, command)
            asyncio.get_running_loop().call_later(0.3, claimed.set)
        else:
            to_presence(user, command)

    monkeypatch.setattr(dev.backplane, "to_presence", claim_answered_late)
    ws = await websockets.connect(url)
    await ws.send(
        json.dumps({"type": "hello", "token": token("dana"), "resume": first.welcome["resume"]})
    )
    await asyncio.sleep(0.05)
    assert ws.transport is not None
    ws.transport.abort()
    await claimed.wait()
    for _ in range(100):
        lease = presence.leases.get(session)
        if lease is not None and lease.suspended_until is not None:
            break
        await asyncio.sleep(0.02)
    lease = presence.leases[session]
    assert lease.suspended_until is not None  # its resume window runs: offline after it
    assert presence.status("dana") == "online"


async def test_a_fresh_session_is_welcomed_on_presences_grant_or_on_its_own_after_the_bound(
    dev_factory: DevFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A new session's lease is claimed before its welcome (ClaimCmd.fresh). Unanswered
    # for two request timeouts (or refused, as a presence node before fresh claims does),
    # the edge welcomes the session on its own and announces it (SessionUp).
    dev = await dev_factory(request_timeout=0.25)
    url = url_of(dev)
    presence = dev.backplane.presence  # type: ignore[attr-defined]
    to_presence = dev.backplane.to_presence
    sent: list[Envelope] = []
    answer = True

    def recorded(user: str, command: Envelope) -> None:
        sent.append(command)
        if answer or not isinstance(command, ClaimCmd):
            to_presence(user, command)

    monkeypatch.setattr(dev.backplane, "to_presence", recorded)
    granted = await raw_client(url, "erin")
    assert granted.welcome["resumed"] is False
    assert [type(c) for c in sent] == [ClaimCmd]  # granted: no SessionUp needed
    claim = sent[0]
    assert isinstance(claim, ClaimCmd) and claim.fresh
    assert presence.leases[granted.session].conn == claim.conn

    sent.clear()
    answer = False  # presence does not answer
    loop = asyncio.get_running_loop()
    started = loop.time()
    unanswered = await raw_client(url, "fay")
    waited = loop.time() - started
    assert 0.45 <= waited < 2.0, waited  # two request timeouts, then on its own
    assert {type(c) for c in sent[:-1]} == {ClaimCmd} and isinstance(sent[-1], SessionUp)
    assert presence.status("fay") == "online"
    assert presence.leases[unanswered.session].edge == dev.edge_id


async def test_a_fresh_hello_dropped_while_its_claim_is_out_ends_its_lease(
    dev: EdgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Never welcomed, the session cannot be resumed: its lease must not stay online.
    url = url_of(dev)
    presence = dev.backplane.presence  # type: ignore[attr-defined]
    to_presence = dev.backplane.to_presence
    claimed = asyncio.Event()

    def claim_answered_late(user: str, command: Envelope) -> None:
        if isinstance(command, ClaimCmd):
            asyncio.get_running_loop().call_later(0.3, to_presence, user, command)
            asyncio.get_running_loop().call_later(0.3, claimed.set)
        else:
            to_presence(user, command)

    monkeypatch.setattr(dev.backplane, "to_presence", claim_answered_late)
    ws = await websockets.connect(url)
    await ws.send(json.dumps({"type": "hello", "token": token("gus")}))
    await asyncio.sleep(0.05)
    assert ws.transport is not None
    ws.transport.abort()
    async with asyncio.timeout(5):
        await claimed.wait()
    for _ in range(100):
        if presence.status("gus") == "offline":
            break
        await asyncio.sleep(0.02)
    assert presence.status("gus") == "offline"
    assert not presence.leases


async def test_a_presence_frame_before_the_watching_reply_waits_for_it(
    dev: EdgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A presence node that waits for a user's status from another node or region may
    # note a change to the new watcher before it answers the watch (seen in the global
    # presence test). The client must hear of the user first in the `watching` reply: a
    # frame the reply already covers is dropped, a newer one follows the reply.
    url = url_of(dev)
    await raw_client(url, "eve")
    held: list[tuple[str, Envelope]] = []
    watch_sent = asyncio.Event()
    to_presence = dev.backplane.to_presence

    def holding(user: str, command: Envelope) -> None:
        if isinstance(command, WatchCmd):
            held.append((user, command))
            watch_sent.set()
        else:
            to_presence(user, command)

    monkeypatch.setattr(dev.backplane, "to_presence", holding)
    watcher = await raw_client(url, "watcher")
    await watcher.send({"type": "watch", "id": 1, "users": ["eve", "bob"]})
    await asyncio.wait_for(watch_sent.wait(), 5)
    early = [
        PresenceFrame(user="eve", status="online", version=1),  # older than the reply
        PresenceFrame(user="bob", status="online", version=2**62),  # newer than the reply
    ]
    for frame in early:
        dev.receive(Deliver([watcher.session], encode_frame(frame)))
    await asyncio.sleep(0.1)  # the frames would be written now
    for user, command in held:
        to_presence(user, command)
    watching = await watcher.recv()
    assert unversioned(watching) == {
        "type": "watching",
        "id": 1,
        "presence": {"eve": "online", "bob": "offline"},
    }
    # bob's frame is newer than the reply's status: it follows it; eve's is not sent.
    assert unversioned(await watcher.recv()) == {
        "type": "presence",
        "user": "bob",
        "status": "online",
    }
    await watcher.send({"type": "ping", "id": 2})
    assert await watcher.recv() == {"type": "pong", "id": 2}
