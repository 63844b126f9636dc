"""Helpers shared by the integration and cluster tests."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import websockets
import zmq
import zmq.auth
from websockets.asyncio.client import ClientConnection

from signalpost.auth import mint_token
from signalpost.node_keys import NodeKeys

SECRET = "integration-secret-0123456789abcdef"


def token(user: str, **claims: Any) -> str:
    return mint_token(SECRET, user, now=time.time(), **claims)


def url_of(server: Any) -> str:
    """The ws URL of an in-process edge server."""
    return f"ws://127.0.0.1:{server.port}/v1/signal"


class RawClient:
    """A bare WebSocket speaking the protocol by hand, to check exact frames."""

    #: Every client a test opened; an autouse fixture closes them after each test.
    opened: ClassVar[list[RawClient]] = []

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        RawClient.opened.append(self)
        self.session = ""
        self.welcome: dict[str, Any] = {}

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            raw = await self.ws.recv()
        frame: dict[str, Any] = json.loads(raw)
        return frame

    async def recv_type(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame of ``kind``; fails on any other frame in between."""
        frame = await self.recv(timeout)
        assert frame["type"] == kind, frame
        return frame

    async def until_markers(
        self, *markers: dict[str, Any], timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """Read until a frame matching each marker came; fail if any other frame came first.

        How a test shows that nothing else arrived, without waiting a fixed time: after
        whatever might send an unwanted frame, it has a marker sent down the same path
        (one sender's frames reach a client in order), so an unwanted frame is read
        before its marker. Markers on different paths may come in any order. A frame
        matches a marker when it has every field of the marker, equal. Returns the
        matching frames, in the order of ``markers``.
        """
        found: dict[int, dict[str, Any]] = {}
        before: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(timeout):
                while len(found) < len(markers):
                    frame: dict[str, Any] = json.loads(await self.ws.recv())
                    for index, marker in enumerate(markers):
                        if index not in found and marker.items() <= frame.items():
                            found[index] = frame
                            break
                    else:
                        before.append(frame)
        except TimeoutError:
            missing = [m for i, m in enumerate(markers) if i not in found]
            raise AssertionError(f"no {missing} within {timeout} s; came: {before}") from None
        assert not before, f"came before the marker: {before}"
        return [found[i] for i in range(len(markers))]

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        await self.send(frame)
        return await self.recv()

    async def close(self) -> None:
        await self.ws.close()


async def raw_client(server_url: str, user: str, **hello: Any) -> RawClient:
    ws = await websockets.connect(server_url)
    client = RawClient(ws)
    await client.send({"type": "hello", "token": token(user), **hello})
    client.welcome = await client.recv_type("welcome")
    client.session = client.welcome["session"]
    return client


async def close_raw_clients() -> None:
    """Close every RawClient opened so far."""
    while RawClient.opened:
        await RawClient.opened.pop().ws.close()


def unversioned(frame: dict[str, Any]) -> dict[str, Any]:
    """A server frame without its presence status versions (``version``, ``versions``),
    for comparing the rest exactly."""
    return {k: v for k, v in frame.items() if k not in ("version", "versions")}


def status_of(event: Any) -> tuple[str, str]:
    """A ``PresenceChanged`` event's user and status (its version aside)."""
    return (event.user, event.status)


def curve_dealer(
    context: zmq.Context[Any],
    endpoint: str,
    identity: bytes,
    client: NodeKeys | Path,
    server: bytes,
) -> zmq.Socket[bytes]:
    """A bare CurveZMQ DEALER, connected to ``endpoint`` (whose public key is ``server``)
    under the routing id ``identity`` with ``client``'s key pair (loaded keys, or the
    ``.key_secret`` file): what a node forging envelopes would open."""
    if isinstance(client, Path):
        public, secret = zmq.auth.load_certificate(client)
        assert secret is not None, f"{client} holds no secret key"
    else:
        public, secret = client.public, client.secret
    dealer: zmq.Socket[bytes] = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, identity)
    dealer.setsockopt(zmq.LINGER, 0)
    # A refused handshake leaves the DEALER without a peer between reconnects, where a send
    # would block for ever: it raises zmq.Again instead.
    dealer.setsockopt(zmq.SNDTIMEO, 5000)
    dealer.setsockopt(zmq.CURVE_SERVERKEY, server)
    dealer.setsockopt(zmq.CURVE_PUBLICKEY, public)
    dealer.setsockopt(zmq.CURVE_SECRETKEY, secret)
    dealer.connect(endpoint)
    return dealer


def load_aiortc_example() -> ModuleType:
    """``examples/aiortc_call.py`` as a module (aiortc must be installed)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "aiortc_call.py"
    spec = importlib.util.spec_from_file_location("aiortc_call", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["aiortc_call"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module
