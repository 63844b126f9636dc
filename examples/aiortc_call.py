"""Two aiortc peers call each other through signalpost and talk over a data channel.

Each peer is a ``SignalpostClient`` (one per edge, so the call crosses the cluster) and an
aiortc ``RTCPeerConnection`` configured with the ``ice_servers`` of its ``welcome`` frame:
STUN URLs and TURN URLs with short-lived TURN REST credentials that coturn accepts. Peer
"a" joins the room first and offers once "b" has joined (the rule of the browser demo:
the one already in the room offers, the newcomer answers, so offers never collide).
Offer, answer and ICE candidates travel as ``signal`` frames to the other session, in the
shapes the JavaScript SDK's ``PeerLink`` uses::

    {"kind": "offer" | "answer", "sdp": "..."}
    {"kind": "candidate", "candidate": {"candidate": "candidate:...", "sdpMid": "0",
                                        "sdpMLineIndex": 0}}
    {"kind": "candidate", "candidate": null}          # end of candidates

aiortc gathers every candidate before ``setLocalDescription`` returns, so its SDP already
carries them (and ``a=end-of-candidates``); each side still sends an explicit
end-of-candidates message, and applies trickled candidates from peers that do trickle.

Once the data channel opens, "a" sends ``ping 1`` .. ``ping N`` and "b" answers each with
``pong i``. With ``relay_only`` the call must go through TURN: the peer connections use
the relay ICE transport policy (aiortc >= 1.10), so only relayed candidates are gathered
and offered; on older aiortc only the TURN servers are kept and non-relay candidates are
cut from the SDP before it is sent. Either way the selected (nominated) candidate pair is
read back from aioice and checked.

Run against a cluster (or ``signalpost dev``, giving the same URL twice)::

    export SIGNALPOST_JWT_SECRET=...     # the cluster's secret: tokens are minted here
    python examples/aiortc_call.py --edge ws://127.0.0.1:8080/v1/signal \\
        --edge2 ws://127.0.0.1:8081/v1/signal --room demo --relay-only

or import it: ``result = await run_call(edge, edge2, room, token_a, token_b)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceCandidate,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp

from signalpost.auth import mint_token
from signalpost.client import PeerJoined, SignalEvent, SignalpostClient
from signalpost.config import DEV_JWT_SECRET

try:  # aiortc >= 1.10 has the relay ICE transport policy
    from aiortc import RTCIceTransportPolicy

    RELAY_POLICY: Any = RTCIceTransportPolicy.RELAY
except ImportError:  # pragma: no cover - older aiortc: relay-only by SDP filtering
    RELAY_POLICY = None

log = logging.getLogger("aiortc_call")


class CallFailed(Exception):
    """The call did not connect (ICE or DTLS failed) or the exchange went wrong."""

    def __init__(self, message: str, *, candidates: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        #: The candidate types each peer offered in its SDP, for diagnosis.
        self.candidates = candidates or {}


@dataclass(frozen=True)
class SelectedPair:
    """The candidate pair ICE nominated: what the media/data path really is."""

    local_type: str  # host | srflx | prflx | relay
    local_address: tuple[str, int]
    remote_type: str
    remote_address: tuple[str, int]

    @property
    def relayed(self) -> bool:
        """True when this end sends through a TURN relay."""
        return self.local_type == "relay"


@dataclass
class CallResult:
    """What happened in a call."""

    pings_received: list[str] = field(default_factory=list)  # at "b", sent by "a"
    pongs_received: list[str] = field(default_factory=list)  # at "a", sent by "b"
    pairs: dict[str, SelectedPair] = field(default_factory=dict)  # per peer: "a", "b"
    candidates: dict[str, list[str]] = field(default_factory=dict)  # types offered per peer
    ice_servers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    connect_seconds: float = 0.0  # from the offer to both data channels open
    setup_seconds: float = 0.0  # from the first join to both data channels open
    total_seconds: float = 0.0


# --------------------------------------------------------------------------- helpers


def rtc_configuration(ice_servers: list[dict[str, Any]], *, relay_only: bool) -> RTCConfiguration:
    """The RTCConfiguration for the ``ice_servers`` of a ``welcome`` (RTCIceServer dicts)."""
    servers = []
    for server in ice_servers:
        urls = server["urls"] if isinstance(server["urls"], list) else [server["urls"]]
        if relay_only:  # STUN is of no use when only relayed candidates may be used
            urls = [url for url in urls if url.startswith(("turn:", "turns:"))]
        if urls:
            servers.append(
                RTCIceServer(
                    urls=urls, username=server.get("username"), credential=server.get("credential")
                )
            )
    if relay_only and RELAY_POLICY is not None:
        return RTCConfiguration(iceServers=servers, iceTransportPolicy=RELAY_POLICY)
    # An explicit list, even empty: None would make aiortc fall back to a public STUN server.
    return RTCConfiguration(iceServers=servers)


def candidate_types(sdp: str) -> list[str]:
    """The candidate types (host, srflx, relay, ...) listed in ``sdp``."""
    types = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            bits = line.split()
            types.append(bits[bits.index("typ") + 1])
    return types


def relay_only_sdp(sdp: str) -> str:
    """``sdp`` without its non-relay candidate lines (host, srflx, prflx)."""
    kept = [
        line
        for line in sdp.splitlines()
        if not line.startswith("a=candidate:") or " typ relay" in line
    ]
    return "\r\n".join(kept) + "\r\n"


def selected_pair(pc: RTCPeerConnection) -> SelectedPair | None:
    """The nominated candidate pair of the connection's ICE transport, if ICE completed.

    aiortc's ``getStats()`` has no candidate-pair entries, so this reads aioice's
    ``Connection`` under the data channel's ICE transport (component 1).
    """
    sctp = pc.sctp
    if sctp is None:
        return None
    connection = sctp.transport.transport._connection
    pair = getattr(connection, "_nominated", {}).get(1)
    if pair is None:
        return None
    return SelectedPair(
        local_type=pair.local_candidate.type,
        local_address=tuple(pair.local_addr),
        remote_type=pair.remote_candidate.type,
        remote_address=(pair.remote_candidate.host, pair.remote_candidate.port),
    )


def _candidate_from_json(data: dict[str, Any]) -> RTCIceCandidate:
    """An aiortc candidate from a browser's ``RTCIceCandidate.toJSON()``."""
    line = data["candidate"]
    candidate = candidate_from_sdp(line.split(":", 1)[1] if line.startswith("candidate:") else line)
    candidate.sdpMid = data.get("sdpMid")
    candidate.sdpMLineIndex = data.get("sdpMLineIndex")
    return candidate


# --------------------------------------------------------------------------- one peer


class Peer:
    """One side of the call: a signalpost session and an RTCPeerConnection."""

    def __init__(self, name: str, client: SignalpostClient, room: str, relay_only: bool) -> None:
        self.name = name
        self.client = client
        self.room = room
        self.relay_only = relay_only
        self.pc = RTCPeerConnection(rtc_configuration(client.ice_servers, relay_only=relay_only))
        self.remote: str | None = None  # the other peer's session id
        self.offered_types: list[str] = []
        self.channel: asyncio.Future[RTCDataChannel] = asyncio.get_running_loop().create_future()
        self.messages: asyncio.Queue[str] = asyncio.Queue()
        self.state: asyncio.Queue[str] = asyncio.Queue()
        self._pending_candidates: list[RTCIceCandidate | None] = []

        @self.pc.on("connectionstatechange")
        def _on_state() -> None:
            log.info("%s: connection %s", self.name, self.pc.connectionState)
            self.state.put_nowait(self.pc.connectionState)

        @self.pc.on("datachannel")
        def _on_datachannel(channel: RTCDataChannel) -> None:
            self._adopt(channel)

    def _adopt(self, channel: RTCDataChannel) -> None:
        @channel.on("message")
        def _on_message(message: str | bytes) -> None:
            self.messages.put_nowait(message if isinstance(message, str) else message.decode())

        def opened() -> None:
            if not self.channel.done():
                self.channel.set_result(channel)

        if channel.readyState == "open":
            opened()
        else:
            channel.on("open", opened)

    def create_channel(self, label: str) -> None:
        self._adopt(self.pc.createDataChannel(label))

    async def send(self, data: dict[str, Any]) -> None:
        assert self.remote is not None
        await self.client.signal(self.room, data, to=self.remote)

    async def send_description(self) -> None:
        """Send our local description, then end-of-candidates."""
        description = self.pc.localDescription
        sdp = relay_only_sdp(description.sdp) if self.relay_only else description.sdp
        self.offered_types = candidate_types(sdp)
        log.info(
            "%s: sending %s with candidates %s", self.name, description.type, self.offered_types
        )
        if not self.offered_types:
            # aiortc does not even start ICE without a local candidate; a browser would
            # report ICE failure. Either way no path can exist: say why, at once.
            wanted = "relay candidate" if self.relay_only else "candidate"
            raise CallFailed(
                f"{self.name}: no {wanted} gathered, ICE cannot succeed "
                "(TURN allocation refused or TURN/STUN server unreachable?)"
            )
        await self.send({"kind": description.type, "sdp": sdp})
        await self.send({"kind": "candidate", "candidate": None})

    async def offer(self) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())  # gathers candidates
        await self.send_description()

    async def handle(self, data: dict[str, Any]) -> None:
        """Apply one signal from the other peer."""
        kind = data.get("kind")
        if kind in ("offer", "answer"):
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=data["sdp"], type=kind))
            waiting, self._pending_candidates = self._pending_candidates, []
            for candidate in waiting:
                await self.pc.addIceCandidate(candidate)
            if kind == "offer":
                await self.pc.setLocalDescription(await self.pc.createAnswer())
                await self.send_description()
        elif kind == "candidate":
            raw = data.get("candidate")
            # Browsers trickle; a null (or empty) candidate ends the list.
            candidate = _candidate_from_json(raw) if raw and raw.get("candidate") else None
            if self.relay_only and candidate is not None and candidate.type != "relay":
                return
            if self.pc.remoteDescription is None:
                self._pending_candidates.append(candidate)
            else:
                await self.pc.addIceCandidate(candidate)
        else:
            log.info("%s: app data %s", self.name, data)

    async def pump(self) -> None:
        """Apply every signal from the remote peer, in order, until cancelled."""
        while True:
            event: SignalEvent = await self.client.next_event(SignalEvent, timeout=3600)
            if self.remote is None:
                self.remote = event.sender.session
            if event.sender.session == self.remote:
                await self.handle(event.data)

    async def connected(self) -> RTCDataChannel:
        """Wait for the data channel to open; CallFailed as soon as the connection fails."""
        failed = asyncio.create_task(self._failure())
        try:
            waiting: set[asyncio.Future[Any]] = {self.channel, failed}
            await asyncio.wait(waiting, return_when="FIRST_COMPLETED")
        finally:
            failed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await failed
        if self.channel.done():
            return self.channel.result()
        raise CallFailed(f"{self.name}: connection failed (ICE {self.pc.iceConnectionState})")

    async def _failure(self) -> None:
        while await self.state.get() != "failed":
            pass

    async def close(self) -> None:
        await self.pc.close()


# --------------------------------------------------------------------------- the call


async def run_call(
    edge: str,
    edge2: str,
    room: str,
    token_a: str | Callable[[], str],
    token_b: str | Callable[[], str],
    *,
    relay_only: bool = False,
    messages: int = 5,
    timeout: float = 30.0,
) -> CallResult:
    """Connect two aiortc peers through signalpost and exchange data-channel messages.

    "a" connects to ``edge``, "b" to ``edge2``. Raises ``CallFailed`` when the peer
    connection fails (e.g. relay-only without working TURN credentials), when a relay-only
    call's selected pair is not relayed, or when a message goes missing; ``TimeoutError``
    when the whole call takes longer than ``timeout`` seconds.
    """
    result = CallResult()
    started = time.monotonic()
    peers: list[Peer] = []
    tasks: list[asyncio.Task[None]] = []
    client_a = SignalpostClient([edge, edge2], token_a)
    client_b = SignalpostClient([edge2, edge], token_b)
    clients: list[SignalpostClient] = []
    try:
        async with asyncio.timeout(timeout):
            for client in (client_a, client_b):
                await client.connect()
                clients.append(client)
            a = Peer("a", client_a, room, relay_only)
            peers.append(a)
            b = Peer("b", client_b, room, relay_only)
            peers.append(b)
            result.ice_servers = {"a": client_a.ice_servers, "b": client_b.ice_servers}

            joining = time.monotonic()
            await client_a.join(room)
            joined = await client_b.join(room)
            assert any(m["session"] == client_a.session for m in joined["members"]), joined
            arrival: PeerJoined = await client_a.next_event(PeerJoined, timeout=timeout)
            a.remote = arrival.peer.session
            b.remote = client_a.session

            tasks = [asyncio.create_task(peer.pump(), name=f"pump-{peer.name}") for peer in peers]
            a.create_channel("chat")
            negotiated = time.monotonic()
            try:
                await a.offer()
                channel_a, channel_b = await _first_failure(a.connected(), b.connected(), *tasks)
            except CallFailed as exc:
                exc.candidates = {"a": a.offered_types, "b": b.offered_types}
                raise
            result.connect_seconds = time.monotonic() - negotiated
            result.setup_seconds = time.monotonic() - joining
            result.candidates = {"a": a.offered_types, "b": b.offered_types}
            for peer in peers:
                pair = selected_pair(peer.pc)
                if pair is None:
                    raise CallFailed(f"{peer.name}: connected without a nominated pair")
                result.pairs[peer.name] = pair
                log.info("%s: selected pair %s", peer.name, pair)
                if relay_only and not pair.relayed:
                    raise CallFailed(f"{peer.name}: relay-only call not relayed: {pair}")

            for i in range(1, messages + 1):
                channel_a.send(f"ping {i}")
                ping = await b.messages.get()
                result.pings_received.append(ping)
                channel_b.send(ping.replace("ping", "pong", 1))
                result.pongs_received.append(await a.messages.get())
            expected = [f"ping {i}" for i in range(1, messages + 1)]
            if result.pings_received != expected:
                raise CallFailed(f"pings out of order or lost: {result.pings_received}")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for peer in peers:
            await peer.close()
        for client in clients:
            await client.close()
    result.total_seconds = time.monotonic() - started
    return result


async def _first_failure(
    a: Coroutine[Any, Any, RTCDataChannel],
    b: Coroutine[Any, Any, RTCDataChannel],
    *watched: asyncio.Task[None],
) -> tuple[RTCDataChannel, RTCDataChannel]:
    """Both open channels; the first error of either peer or of a signal pump ends the wait."""
    waiters = [asyncio.create_task(a), asyncio.create_task(b)]
    try:
        pending: set[asyncio.Task[Any]] = {*waiters, *watched}
        while not all(w.done() for w in waiters):
            done, pending = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
                if task in watched:  # a pump returned: it never does unless it failed
                    raise CallFailed("a signal pump stopped")
        return waiters[0].result(), waiters[1].result()
    finally:
        for waiter in waiters:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edge", required=True, help="ws URL of the first edge (peer a)")
    parser.add_argument("--edge2", help="ws URL of the second edge (peer b); default --edge")
    parser.add_argument("--room", default="aiortc-demo")
    parser.add_argument("--relay-only", action="store_true", help="only TURN-relayed paths")
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument(
        "--jwt-secret",
        default=os.environ.get("SIGNALPOST_JWT_SECRET", DEV_JWT_SECRET),
        help="HS256 secret to mint the two client tokens (default $SIGNALPOST_JWT_SECRET)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.verbose:
        log.setLevel(logging.INFO)

    def token(user: str) -> Callable[[], str]:
        return lambda: mint_token(args.jwt_secret, user, now=time.time(), ttl=600)

    try:
        result = asyncio.run(
            run_call(
                args.edge,
                args.edge2 or args.edge,
                args.room,
                token("alice"),
                token("bob"),
                relay_only=args.relay_only,
                messages=args.messages,
                timeout=args.timeout,
            )
        )
    except (CallFailed, TimeoutError) as exc:
        print(f"call failed: {exc!r}", file=sys.stderr)
        if isinstance(exc, CallFailed) and exc.candidates:
            print(f"candidates offered: {exc.candidates}", file=sys.stderr)
        return 1
    print(f"connected in {result.connect_seconds:.2f} s; candidates offered {result.candidates}")
    for name, pair in result.pairs.items():
        print(
            f"{name}: {pair.local_type} {pair.local_address} -> "
            f"{pair.remote_type} {pair.remote_address}{'  (relayed)' if pair.relayed else ''}"
        )
    print(f"b got {result.pings_received}")
    print(f"a got {result.pongs_received}")
    print(f"total {result.total_seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
