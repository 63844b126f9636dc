"""Presence as N nodes (real processes, real Consul): a kill -9 of one of two presence nodes.

Users are placed on the presence nodes by rendezvous hashing over the presence view in
Consul; each owner copies its leases to the runner-up (with two nodes: the other one).
The watcher's node survives; the watched users' node is killed. The survivor adopts the
copies when Consul's view leaves the dead node out, and the edges re-sync their sessions
to it: users who stay connected stay online, a session that dropped just before the kill
still resumes (``resumed: true``, its room seat kept, no ``room_full``), the watcher
hears each real status change once, and a session never has two live connections.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from signalpost.cluster import free_port
from signalpost.node_keys import create_node_keys
from signalpost.ownership import PRESENCE, decode_view
from signalpost.placement import owner
from tests.cluster.conftest import FAST_ENV, Cluster, ClusterFactory, ticket_secret_of
from tests.helpers import RawClient, raw_client, unversioned

pytestmark = pytest.mark.cluster

WINDOW = 6.0  # the resume window
ENV = {
    "SIGNALPOST_RATE_PER_SECOND": "1000",
    "SIGNALPOST_RATE_BURST": "1000",
    "SIGNALPOST_RESUME_WINDOW": str(WINDOW),
}
#: Consul's check (1 s), the new view, the edges' re-sync, the settling grace (1 s), and,
#: for a goodbye lost with the dead node, the resume window: the bound the test holds to.
FAILOVER_BOUND = 15.0


def _placed(cluster: Cluster, on: str, prefix: str, count: int = 1) -> list[str]:
    """``count`` user names owned by presence node ``on`` (bounded search)."""
    names = [f"{prefix}-{i}" for i in range(200)]
    found = [n for n in names if cluster.presence_owner_of(n) == on][:count]
    assert len(found) == count
    return found


async def _presence_frames(
    client: RawClient, until: float
) -> tuple[list[dict[str, Any]], list[float]]:
    """Every presence frame ``client`` gets until the monotonic time ``until``, and when."""
    frames: list[dict[str, Any]] = []
    times: list[float] = []
    while (left := until - time.monotonic()) > 0:
        try:
            frame = await client.recv(timeout=left)
        except TimeoutError:
            break
        if frame["type"] == "presence":
            frames.append(frame)
            times.append(time.monotonic())
    return frames, times


async def test_kill_9_of_a_presence_node_keeps_watches_and_resumes(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(edges=2, brokers=1, presence=2, consul="on", **ENV)
    edge1, edge2 = cluster.edge_urls
    survivor, doomed = "presence-1", "presence-2"
    (wally, erin) = _placed(cluster, survivor, "wally", 2)
    bob, carol, dana = _placed(cluster, doomed, "bob", 3)

    watcher = await raw_client(edge1, wally)
    bob_client = await raw_client(edge2, bob)
    carol_client = await raw_client(edge1, carol)
    dana_client = await raw_client(edge2, dana)
    erin_client = await raw_client(edge1, erin)
    for client in (dana_client, erin_client):  # a room of two: capacity 2
        assert (await client.request({"type": "join", "room": "r", "id": 1}))["type"] == "joined"
    await dana_client.recv_type("peer-joined")  # erin
    reply = await watcher.request({"type": "watch", "users": [bob, carol, dana], "id": 1})
    assert reply["presence"] == {bob: "online", carol: "online", dana: "online"}

    # Dana drops just before the kill: her lease, suspended, is copied to the survivor.
    assert dana_client.ws.transport is not None
    dana_client.ws.transport.abort()
    await asyncio.sleep(0.3)
    cluster.kill(doomed)
    killed_at = time.monotonic()
    # Bob leaves while his owner is dead: his goodbye is lost with it; the survivor holds
    # a copy that says connected, which no edge names again: his window runs out.
    await bob_client.close()
    # Carol resumes on the other edge while her first connection is still open and her
    # owner is dead: the new connection waits for the survivor's answer, and the old one
    # is closed 4409 (it never stays live beside the new one).
    carol_again = await raw_client(edge2, carol, resume=carol_client.welcome["resume"])
    welcomed_at = time.monotonic()
    assert carol_again.welcome["resumed"] is True
    async with asyncio.timeout(5):
        await carol_client.ws.wait_closed()
    assert carol_client.ws.close_code == 4409
    # Presence sends the eviction and the claim's answer at once, to the two edges: the
    # old connection's close is not ordered before the welcome, only close to it.
    overlap = time.monotonic() - welcomed_at
    assert overlap < 0.5, overlap
    # Dana resumes within her window: her seat is hers, no room_full.
    dana_again = await raw_client(edge1, dana, resume=dana_client.welcome["resume"])
    assert dana_again.welcome["resumed"] is True
    # (She is still a member: the broker tells her so, "recovered", before the answer.)
    await dana_again.send({"type": "join", "room": "r", "id": 2})
    for _ in range(10):
        rejoined = await dana_again.recv()
        if rejoined.get("id") == 2:
            break
    assert rejoined["type"] == "joined", rejoined
    frames, times = await _presence_frames(watcher, killed_at + FAILOVER_BOUND)
    # Each change once: bob offline; carol and dana, resumed, never flap.
    assert [unversioned(f) for f in frames] == [
        {"type": "presence", "user": bob, "status": "offline"}
    ], frames
    offline_after = times[0] - killed_at

    # Bob comes back: told once, through the survivor.
    started = time.monotonic()
    bob_again = await raw_client(edge2, bob)
    (online,) = await watcher.until_markers({"type": "presence", "user": bob}, timeout=5)
    assert online["status"] == "online"
    told_after = time.monotonic() - started

    # Carol's session lives on the survivor now: it resumes again.
    assert carol_again.ws.transport is not None
    carol_again.ws.transport.abort()
    await asyncio.sleep(0.3)
    resumed = await raw_client(edge1, carol, resume=carol_again.welcome["resume"])
    assert resumed.welcome["resumed"] is True
    assert resumed.session == carol_client.session

    # The watcher's own session lives on the survivor: its resume keeps its watches.
    assert watcher.ws.transport is not None
    watcher.ws.transport.abort()
    await asyncio.sleep(0.3)
    back = await raw_client(edge2, wally, resume=watcher.welcome["resume"])
    assert back.welcome["resumed"] is True
    await bob_again.close()
    (offline,) = await back.until_markers({"type": "presence", "user": bob}, timeout=5)
    assert offline["status"] == "offline"
    print(
        f"presence failover: carol's resume welcomed {welcomed_at - killed_at:.2f} s after "
        f"the kill, her old connection closed {overlap * 1000:.0f} ms after; "
        f"bob offline told {offline_after:.2f} s after the kill (window {WINDOW:.0f} s); "
        f"online {told_after:.2f} s after he reconnected"
    )


async def test_sigterm_of_a_presence_node_hands_its_users_over(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory(edges=2, brokers=1, presence=2, consul="on", **ENV)
    edge1, edge2 = cluster.edge_urls
    stays, leaving = "presence-1", "presence-2"
    (wally,) = _placed(cluster, stays, "wally")
    bob, dana = _placed(cluster, leaving, "bob", 2)
    watcher = await raw_client(edge1, wally)
    bob_client = await raw_client(edge2, bob)
    dana_client = await raw_client(edge2, dana)
    reply = await watcher.request({"type": "watch", "users": [bob, dana], "id": 1})
    assert reply["presence"] == {bob: "online", dana: "online"}
    assert dana_client.ws.transport is not None
    dana_client.ws.transport.abort()  # away: her lease waits for her on the leaving node
    await asyncio.sleep(0.3)

    cluster.kill(leaving, signal.SIGTERM)
    started = time.monotonic()
    for _ in range(200):  # bounded: DRAIN_VIEW_TIMEOUT (5 s) + 0.5 s, and some
        if not cluster.alive(leaving):
            break
        await asyncio.sleep(0.05)
    assert not cluster.alive(leaving)
    drained_in = time.monotonic() - started

    # Handed over warm: nobody flapped, dana resumes, bob's goodbye is heard at once.
    dana_again = await raw_client(edge1, dana, resume=dana_client.welcome["resume"])
    assert dana_again.welcome["resumed"] is True
    await bob_client.close()
    closed_at = time.monotonic()
    (offline,) = await watcher.until_markers({"type": "presence", "user": bob}, timeout=5)
    assert offline["status"] == "offline"
    told_after = time.monotonic() - closed_at
    # (Within the settling grace of the view change, SYNC_GRACE 1 s, at most.)
    assert told_after < 1.5, told_after
    print(
        f"presence drain: exited {drained_in:.2f} s after SIGTERM; "
        f"bob offline told {told_after:.3f} s after he left"
    )


async def test_without_consul_heartbeats_place_users_and_a_kill_moves_them(
    cluster_factory: ClusterFactory,
) -> None:
    # Static endpoints (presence_endpoint lists both nodes): placement over the nodes whose
    # heartbeats are current (1 s expiry in the tests).
    cluster = cluster_factory(edges=2, brokers=1, presence=2, consul="off", **ENV)
    edge1, edge2 = cluster.edge_urls
    survivor, doomed = "presence-1", "presence-2"
    (wally,) = _placed(cluster, survivor, "wally")
    bob, dana = _placed(cluster, doomed, "bob", 2)
    watcher = await raw_client(edge1, wally)
    await asyncio.sleep(1.5)  # the nodes' start-up grace (one heartbeat expiry) is over
    reply = await watcher.request({"type": "watch", "users": [bob, dana], "id": 1})
    assert reply["presence"] == {bob: "offline", dana: "offline"}
    bob_client = await raw_client(edge2, bob)
    dana_client = await raw_client(edge2, dana)
    for user in (bob, dana):
        (frame,) = await watcher.until_markers({"type": "presence", "user": user}, timeout=5)
        assert frame["status"] == "online"
    assert dana_client.ws.transport is not None
    dana_client.ws.transport.abort()
    await asyncio.sleep(0.3)
    cluster.kill(doomed)
    killed_at = time.monotonic()
    await asyncio.sleep(3.0)  # heartbeat expiry (1 s), re-sync, settling grace (1 s)
    dana_again = await raw_client(edge1, dana, resume=dana_client.welcome["resume"])
    assert dana_again.welcome["resumed"] is True
    await bob_client.close()
    (offline,) = await watcher.until_markers({"type": "presence", "user": bob}, timeout=10)
    assert offline["status"] == "offline"
    elapsed = time.monotonic() - killed_at
    print(f"presence without Consul: bob offline told {elapsed:.2f} s after the kill")


def _start_presence(
    bind: str, consul_address: str, log_dir: Path, keys_dir: Path
) -> subprocess.Popen[bytes]:
    """One more presence node, outside the cluster, that only Consul tells the others of
    (its key added to the cluster keys directory, as an operator adds one)."""
    _, secret_path = create_node_keys(keys_dir, "presence-new", bind, kind="presence")
    env = {**os.environ, **FAST_ENV, **ENV}
    env["SIGNALPOST_NODE_KEY_FILE"] = str(secret_path)
    env["SIGNALPOST_CLUSTER_KEYS_DIR"] = str(keys_dir)
    env["SIGNALPOST_TICKET_SECRET"] = ticket_secret_of(keys_dir)
    env["SIGNALPOST_CONSUL_ADDR"] = consul_address
    env["SIGNALPOST_HEALTH_PORT"] = str(free_port())
    with (log_dir / "presence-new.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "signalpost.cli", "presence", "--id", "presence-new",
             "--bind", bind],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _presence_view(consul_url: str) -> tuple[str, ...]:
    url = f"{consul_url}/v1/kv/{PRESENCE.view_key}?raw&consistent"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            view = decode_view(response.read())
    except OSError:
        return ()
    return view.members if view is not None else ()


async def test_a_presence_node_added_takes_its_users_over_warm(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    cluster = cluster_factory(edges=2, brokers=1, presence=1, consul="on", **ENV)
    edge1, edge2 = cluster.edge_urls
    (consul,) = cluster.of_kind("consul")
    (first,) = cluster.of_kind("presence")
    newcomer = f"tcp://127.0.0.1:{free_port()}"
    nodes = sorted([first["url"], newcomer])
    moving = [u for u in (f"user-{i}" for i in range(200)) if owner(u, nodes) == newcomer][:3]
    assert len(moving) == 3
    watcher = await raw_client(edge1, "wally")
    stay, leave, away = [await raw_client(edge2, user) for user in moving]
    reply = await watcher.request({"type": "watch", "users": moving, "id": 1})
    assert set(reply["presence"].values()) == {"online"}
    assert away.ws.transport is not None
    away.ws.transport.abort()
    await asyncio.sleep(0.3)

    process = _start_presence(
        newcomer, consul["url"].removeprefix("http://"), tmp_path, cluster.keys_dir
    )
    try:
        for _ in range(150):  # bounded: 15 s for its check to pass and the view to change
            if set(await asyncio.to_thread(_presence_view, consul["url"])) == set(nodes):
                break
            assert process.poll() is None, "the new presence node exited: see its log"
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the new presence node never joined the presence view")
        await asyncio.sleep(2.0)  # the edges' re-sync, the settling grace
        # Its users moved warm: the one away resumes, the one who stayed never flapped,
        # and the one who leaves now is told once.
        back = await raw_client(edge1, moving[2], resume=away.welcome["resume"])
        assert back.welcome["resumed"] is True
        await leave.close()
        await watcher.until_markers(
            {"type": "presence", "user": moving[1], "status": "offline"}, timeout=5
        )
        assert stay.ws.close_code is None
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 20)
    assert process.returncode == 0


async def test_a_claim_is_answered_once_the_runner_up_has_it_and_survives_a_kill_9(
    cluster_factory: ClusterFactory,
) -> None:
    # The claim's copy is confirmed: while the runner-up is paused (SIGSTOP, shorter than
    # a heartbeat expiry and Consul's check) the claim is not answered; once it has the
    # copy, it is; the owner is then SIGKILLed right after the welcome, and the session,
    # whose new connection dropped at once (its goodbye lost with the owner), still
    # resumes through the runner-up.
    cluster = cluster_factory(edges=2, brokers=1, presence=2, consul="on", **ENV)
    edge1, edge2 = cluster.edge_urls
    runner_up, doomed = "presence-1", "presence-2"
    (bob,) = _placed(cluster, doomed, "bob")
    (consul,) = cluster.of_kind("consul")
    first = await raw_client(edge1, bob)
    assert first.ws.transport is not None
    first.ws.transport.abort()
    await asyncio.sleep(0.3)  # its suspension is copied (and acknowledged)

    os.kill(cluster.pid(runner_up), signal.SIGSTOP)
    try:
        claiming = asyncio.create_task(raw_client(edge2, bob, resume=first.welcome["resume"]))
        await asyncio.sleep(0.4)
        # Unconfirmed copies would have let the owner answer at once.
        assert not claiming.done(), "the claim was answered before the runner-up had it"
    finally:
        os.kill(cluster.pid(runner_up), signal.SIGCONT)
    async with asyncio.timeout(5):
        again = await claiming
    answered_at = time.monotonic()
    assert again.welcome["resumed"] is True
    cluster.kill(doomed)
    assert again.ws.transport is not None
    again.ws.transport.abort()

    for _ in range(150):  # bounded: Consul's check fails and a view without it is written
        if await asyncio.to_thread(_presence_view, consul["url"]) == (
            next(p["url"] for p in cluster.of_kind("presence") if p["id"] == runner_up),
        ):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("no presence view without the killed node")
    await asyncio.sleep(1.5)  # the edges' re-sync and the settling grace
    back = await raw_client(edge1, bob, resume=again.welcome["resume"])
    assert back.welcome["resumed"] is True
    assert back.session == first.session
    print(
        f"presence claim confirmed: resumed through the runner-up "
        f"{time.monotonic() - answered_at:.2f} s after the owner died"
    )


async def test_a_fresh_session_is_welcomed_once_the_runner_up_has_it_and_survives_a_kill_9(
    cluster_factory: ClusterFactory,
) -> None:
    # A new session's lease is confirmed before its welcome (ClaimCmd.fresh): while the
    # runner-up is paused (SIGSTOP, shorter than a heartbeat expiry and Consul's check)
    # the hello is not welcomed; once the runner-up has the copy, it is; the owner is then
    # SIGKILLed right after the welcome, the connection dropped at once (its goodbye lost
    # with the owner), and the session resumes through the runner-up.
    cluster = cluster_factory(edges=2, brokers=1, presence=2, consul="on", **ENV)
    edge1, edge2 = cluster.edge_urls
    runner_up, doomed = "presence-1", "presence-2"
    (carol,) = _placed(cluster, doomed, "carol")
    (consul,) = cluster.of_kind("consul")
    warm = await raw_client(edge1, carol)  # (links up, the user's owner known)
    await warm.ws.close()
    await asyncio.sleep(0.3)

    os.kill(cluster.pid(runner_up), signal.SIGSTOP)
    try:
        hello = asyncio.create_task(raw_client(edge1, carol))
        await asyncio.sleep(0.4)
        # Welcomed at once and announced with SessionUp (the code before fresh claims),
        # the session's lease would be copied only if the runner-up ever got it.
        assert not hello.done(), "a fresh session was welcomed before the runner-up had it"
    finally:
        os.kill(cluster.pid(runner_up), signal.SIGCONT)
    async with asyncio.timeout(5):
        fresh = await hello
    welcomed_at = time.monotonic()
    assert fresh.welcome["resumed"] is False
    cluster.kill(doomed)
    assert fresh.ws.transport is not None
    fresh.ws.transport.abort()

    for _ in range(150):  # bounded: Consul's check fails and a view without it is written
        if await asyncio.to_thread(_presence_view, consul["url"]) == (
            next(p["url"] for p in cluster.of_kind("presence") if p["id"] == runner_up),
        ):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("no presence view without the killed node")
    await asyncio.sleep(1.5)  # the edges' re-sync and the settling grace
    back = await raw_client(edge2, carol, resume=fresh.welcome["resume"])
    assert back.welcome["resumed"] is True
    assert back.session == fresh.session
    print(
        f"fresh session confirmed: resumed through the runner-up "
        f"{time.monotonic() - welcomed_at:.2f} s after the owner died"
    )
