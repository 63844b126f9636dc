"""The Python SDK's requests across a dropped connection: each ends exactly once.

A request waiting for its reply when the connection drops is resent after the resume with
the same id, in the order the requests were made; a new session (``resumed: false``)
fails the ones already sent with ``SessionLost``; ``close()`` fails them with
``SessionClosed``; a timeout fails one once, and its reply, coming later, is ignored.

The edge here never answers the first copy: it records what it is sent and, for the
requests of the connection under test, swallows them, so "was it applied?" has one answer
and no copy can reach the peer twice whatever the server's own deduplication does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from edge.server import ClientConnection, EdgeServer
from signalpost.client import (
    Disconnected,
    PeerJoined,
    RequestTimeout,
    Resumed,
    SessionClosed,
    SessionLost,
    SignalEvent,
    SignalpostClient,
)
from signalpost.wire import ClientMessage, Ping, Signal
from tests.helpers import token, url_of
from tests.integration.conftest import DevFactory


@dataclass(frozen=True)
class Seen:
    """A request as the edge got it: on which connection, what, with which id."""

    conn: str
    kind: str
    id: int | str | None
    n: int | None = None  # a signal's data["n"]


class EdgeTap:
    """Records the requests an edge is sent; swallows those ``swallow`` picks, unserved."""

    def __init__(self, edge: EdgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.edge = edge
        self.seen: list[Seen] = []
        self.swallowed: list[tuple[ClientConnection, ClientMessage]] = []
        self.swallow: Callable[[ClientConnection, ClientMessage], bool] = lambda c, m: False
        self.on_swallow: Callable[[ClientConnection, ClientMessage], None] = lambda c, m: None
        self._dispatch = edge._dispatch
        monkeypatch.setattr(edge, "_dispatch", self._tapped)

    def _tapped(self, client: ClientConnection, message: ClientMessage) -> None:
        n = None
        if isinstance(message, Signal):
            n = json.loads(bytes(message.data)).get("n")
        self.seen.append(Seen(client.conn, type(message).__name__, message.id, n))
        if self.swallow(client, message):
            self.swallowed.append((client, message))
            self.on_swallow(client, message)
            return
        self._dispatch(client, message)

    def serve(self, client: ClientConnection, message: ClientMessage) -> None:
        """Serve a request that was swallowed, late."""
        self._dispatch(client, message)

    def of(self, conn: str) -> list[Seen]:
        return [s for s in self.seen if s.conn == conn]


def abort(client: SignalpostClient) -> None:
    """Drop the client's TCP connection: no close frame, so its session waits to resume."""
    assert client._ws is not None and client._ws.transport is not None
    client._ws.transport.abort()


async def call(url: str, request_timeout: float = 5.0) -> tuple[SignalpostClient, SignalpostClient]:
    alice = SignalpostClient(url, token("alice"), request_timeout=request_timeout)
    bob = SignalpostClient(url, token("bob"))
    await alice.connect()
    await bob.connect()
    await alice.join("r1")
    await bob.join("r1")
    await alice.next_event(PeerJoined)
    return alice, bob


async def test_requests_pending_at_a_drop_are_resent_with_their_ids_and_end_once(
    dev: EdgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tap = EdgeTap(dev, monkeypatch)
    alice, bob = await call(url_of(dev))
    try:
        first_conn = dev.sessions[alice.session or ""].conn
        # Alice's signals on this connection reach the edge but are never served, and the
        # first one drops her connection: three requests wait for a reply at the drop.
        tap.swallow = lambda c, m: c.conn == first_conn and isinstance(m, Signal)
        tap.on_swallow = lambda c, m: abort(alice) if len(tap.swallowed) == 1 else None
        to = bob.session
        sends = [asyncio.create_task(alice.signal("r1", {"n": n}, to=to)) for n in (1, 2, 3)]
        assert (await alice.next_event(Disconnected)).final is False
        # Made while reconnecting: waits, and goes out after the three resends.
        sends.append(asyncio.create_task(alice.signal("r1", {"n": 4}, to=to)))
        resumed = await alice.next_event(Resumed, timeout=10)
        assert resumed.resumed is True and resumed.session == alice.session
        results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 10)
        assert results == [None] * 4  # each acked, none failed

        second_conn = dev.sessions[alice.session or ""].conn
        assert second_conn != first_conn
        before = [(s.id, s.n) for s in tap.of(first_conn) if s.kind == "Signal"]
        after = [(s.id, s.n) for s in tap.of(second_conn) if s.kind == "Signal"]
        assert [n for _, n in before] == [1, 2, 3]
        # The same ids, in the same order, then the new request with the next id.
        assert after[:3] == before
        assert [n for _, n in after] == [1, 2, 3, 4]
        assert after[3][0] == before[2][0] + 1  # type: ignore[operator]
        # Served once each (the swallowed copies never were): bob has each once, in order.
        got = [(await bob.next_event(SignalEvent)).data["n"] for _ in range(4)]
        assert got == [1, 2, 3, 4]
        with pytest.raises(TimeoutError):
            await bob.next_event(SignalEvent, timeout=0.3)
        assert not alice._pending
    finally:
        await alice.close()
        await bob.close()


async def test_a_copy_of_a_reply_is_ignored(
    dev: EdgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tap = EdgeTap(dev, monkeypatch)
    async with SignalpostClient(url_of(dev), token("alice")) as alice:
        await alice.ping()
        (ping,) = [s for s in tap.seen if s.kind == "Ping"]
        # The same reply again (as a server answering a resend with its record would):
        # the request already ended; nothing else happens.
        edge_side = dev.sessions[alice.session or ""]
        dev._write([edge_side], json.dumps({"type": "pong", "id": ping.id}).encode())
        await alice.ping()  # the next round trip: the copy was read before its reply
        assert alice.pending_events() == []
        assert not alice._pending


async def test_a_timed_out_request_fails_once_and_is_never_resent(
    dev: EdgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tap = EdgeTap(dev, monkeypatch)
    alice, bob = await call(url_of(dev), request_timeout=0.5)
    try:
        tap.swallow = lambda c, m: isinstance(m, Signal) and not tap.swallowed
        with pytest.raises(RequestTimeout) as timed_out:
            await alice.signal("r1", {"n": 1}, to=bob.session)
        assert timed_out.value.code == "timeout"
        assert isinstance(timed_out.value, TimeoutError)
        # Its reply comes after all: ignored, and the client goes on.
        (client, message) = tap.swallowed[0]
        tap.serve(client, message)
        assert (await bob.next_event(SignalEvent)).data == {"n": 1}
        await alice.ping()
        assert alice.pending_events() == [] and not alice._pending
        # A resume does not send it again: it has ended.
        abort(alice)
        assert (await alice.next_event(Resumed, timeout=10)).resumed is True
        await alice.ping()
        signals = [s for s in tap.seen if s.kind == "Signal"]
        assert [s.id for s in signals] == [message.id]
    finally:
        await alice.close()
        await bob.close()


async def test_a_new_session_fails_the_requests_in_doubt_with_session_lost(
    dev_factory: DevFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reconnect goes to the next URL: an edge of another (dev) cluster, which does
    # not know the session, so it starts a new one (resumed: false).
    first, other = await dev_factory(), await dev_factory()
    tap = EdgeTap(first, monkeypatch)
    other_tap = EdgeTap(other, monkeypatch)
    alice = SignalpostClient([url_of(first), url_of(other)], token("alice"))
    await alice.connect()
    try:
        await alice.join("r1")
        old_session = alice.session
        tap.swallow = lambda c, m: isinstance(m, Signal)
        tap.on_swallow = lambda c, m: abort(alice)
        in_doubt = asyncio.create_task(alice.signal("r1", {"n": 1}))
        assert (await alice.next_event(Disconnected)).final is False
        queued = asyncio.create_task(alice.ping())  # never sent: goes to the new session
        resumed = await alice.next_event(Resumed, timeout=10)
        assert resumed.resumed is False and resumed.session != old_session
        with pytest.raises(SessionLost) as lost:
            await in_doubt
        assert lost.value.code == "session_lost"
        await asyncio.wait_for(queued, 5)
        # The old request was not resent to the new session; the queued one was sent.
        assert [s.kind for s in other_tap.seen] == ["Ping"]
        assert alice.positions == {}
    finally:
        await alice.close()


async def test_close_fails_a_waiting_request_with_session_closed(
    dev: EdgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tap = EdgeTap(dev, monkeypatch)
    sent = asyncio.Event()
    tap.swallow = lambda c, m: isinstance(m, Ping)
    tap.on_swallow = lambda c, m: sent.set()
    alice = SignalpostClient(url_of(dev), token("alice"))
    await alice.connect()
    waiting = asyncio.create_task(alice.ping())
    await asyncio.wait_for(sent.wait(), 5)
    await alice.close()
    with pytest.raises(SessionClosed):
        await waiting
    with pytest.raises(SessionClosed):
        await alice.ping()
