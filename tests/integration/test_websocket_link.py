"""The edge's own WebSocket shell (edge.websocket_link) against real clients.

What the websockets asyncio server used to do for the edge and the shell now does
itself: fragmented messages, UTF-8 checks, keepalive pings, the closing handshake with a
timeout, frames pipelined behind the hello, HTTP answers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os

import pytest
import websockets
from websockets.frames import Close, Frame, Opcode

import edge.websocket_link
from edge.server import MAX_EARLY_FRAMES, EdgeServer
from signalpost.wire import ClaimReply
from tests.helpers import raw_client, token, url_of
from tests.integration.conftest import DevFactory
from tests.integration.test_session import closed_with


class BareSocket:
    """A WebSocket client written by hand: it answers nothing unless told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> BareSocket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                "GET /v1/signal HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"Server: signalpost" in head
        return cls(reader, writer)

    def send(self, opcode: Opcode, data: bytes, fin: bool = True) -> None:
        self.writer.write(Frame(opcode, data, fin).serialize(mask=True, extensions=[]))

    def send_json(self, frame: dict[str, object]) -> None:
        self.send(Opcode.TEXT, json.dumps(frame).encode())

    async def read_frame(self, timeout: float = 5.0) -> Frame | None:
        """The next frame from the server (unmasked, RFC 6455 5.2); None at EOF."""
        try:
            async with asyncio.timeout(timeout):
                head = await self.reader.readexactly(2)
                length = head[1] & 0x7F
                if length == 126:
                    length = int.from_bytes(await self.reader.readexactly(2))
                elif length == 127:
                    length = int.from_bytes(await self.reader.readexactly(8))
                data = await self.reader.readexactly(length)
        except asyncio.IncompleteReadError:
            return None
        return Frame(Opcode(head[0] & 0x0F), data, bool(head[0] & 0x80))

    async def until_eof(self, timeout: float) -> list[Frame]:
        """Every frame the server sends until it drops the TCP connection."""
        frames = []
        async with asyncio.timeout(timeout):
            while (frame := await self.read_frame(timeout)) is not None:
                frames.append(frame)
        return frames

    async def until_close_frame(self, timeout: float) -> list[Frame]:
        """Every frame the server sends up to and including its close frame."""
        frames = []
        async with asyncio.timeout(timeout):
            while (frame := await self.read_frame(timeout)) is not None:
                frames.append(frame)
                if frame.opcode is Opcode.CLOSE:
                    break
        return frames

    def close(self) -> None:
        self.writer.close()


def _texts(frames: list[Frame]) -> list[dict[str, object]]:
    return [json.loads(f.data) for f in frames if f.opcode is Opcode.TEXT]


async def test_a_fragmented_message_is_served_whole(dev: EdgeServer) -> None:
    client = await raw_client(url_of(dev), "alice")
    await client.ws.send(['{"type":"pi', 'ng","i', 'd":3}'])
    assert await client.recv() == {"type": "pong", "id": 3}


async def test_invalid_utf8_closes_1007_and_a_bystander_is_unaffected(dev: EdgeServer) -> None:
    bystander = await raw_client(url_of(dev), "bob")
    client = await raw_client(url_of(dev), "alice")
    await client.ws.send(b'{"type":"ping","id":"\xff\xfe"}', text=True)
    assert await closed_with(client.ws) == 1007
    assert await bystander.request({"type": "ping", "id": 1}) == {"type": "pong", "id": 1}


async def test_frames_pipelined_behind_hello_are_served_after_the_welcome_in_order(
    dev: EdgeServer,
) -> None:
    async with websockets.connect(url_of(dev)) as ws:
        await ws.send(json.dumps({"type": "hello", "token": token("alice"), "id": 0}))
        for i in range(1, 6):
            await ws.send(json.dumps({"type": "ping", "id": i}))
        frames = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(6)]
    assert frames[0]["type"] == "welcome"
    assert [(f["type"], f["id"]) for f in frames[1:]] == [("pong", i) for i in range(1, 6)]


async def test_a_flood_before_the_welcome_is_refused(
    dev: EdgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await raw_client(url_of(dev), "alice")
    first.ws.transport.abort()  # dropped: the session waits to be resumed

    async def slow_claim(session: str, user: str, conn: str) -> ClaimReply:
        await asyncio.sleep(1)  # presence is slow to answer the resume claim
        return ClaimReply(session, conn, True)

    monkeypatch.setattr(dev, "_claim", slow_claim)
    socket = await BareSocket.open(dev.port)
    socket.send_json({"type": "hello", "token": token("alice"), "resume": first.welcome["resume"]})
    for i in range(MAX_EARLY_FRAMES + 1):
        socket.send_json({"type": "ping", "id": i})
    frames = await socket.until_close_frame(5)
    assert [Close.parse(f.data).code for f in frames if f.opcode is Opcode.CLOSE] == [4429]
    assert _texts(frames) == []  # no welcome: the session was not taken over
    socket.close()


async def test_a_client_that_stops_answering_pings_is_closed_1011(
    dev_factory: DevFactory,
) -> None:
    server = await dev_factory(heartbeat=1)
    silent = await BareSocket.open(server.port)
    silent.send_json({"type": "hello", "token": token("mute")})
    answering = await raw_client(url_of(server), "alice")  # websockets answers pings
    frames = await silent.until_eof(6)
    assert _texts(frames)[0]["type"] == "welcome"
    assert any(f.opcode is Opcode.PING for f in frames)
    close = [f for f in frames if f.opcode is Opcode.CLOSE]
    assert close and Close.parse(close[0].data).code == 1011
    # The client that answers its pings is still there after the same time.
    assert await answering.request({"type": "ping", "id": 9}) == {"type": "pong", "id": 9}
    silent.close()


async def test_a_client_that_never_completes_the_close_is_dropped(
    dev_factory: DevFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge.websocket_link, "CLOSE_TIMEOUT", 0.5)
    server = await dev_factory(hello_timeout=0.2)
    socket = await BareSocket.open(server.port)
    # No hello: the edge closes with 4408 and, without an answer, drops the connection.
    frames = await socket.until_eof(5)
    assert [Close.parse(f.data).code for f in frames if f.opcode is Opcode.CLOSE] == [4408]
    socket.close()


async def test_a_client_close_ends_the_connection_cleanly(dev: EdgeServer) -> None:
    socket = await BareSocket.open(dev.port)
    socket.send_json({"type": "hello", "token": token("alice")})
    welcome = await socket.read_frame()
    assert welcome is not None and json.loads(welcome.data)["type"] == "welcome"
    socket.send(Opcode.CLOSE, Close(1000, "bye").serialize())
    frames = await socket.until_eof(5)
    assert [Close.parse(f.data).code for f in frames if f.opcode is Opcode.CLOSE] == [1000]
    socket.close()
    for _ in range(50):
        if not dev.sessions:
            break
        await asyncio.sleep(0.05)
    assert not dev.sessions


async def test_plain_http_on_the_signal_path_gets_426_and_unknown_paths_404(
    dev: EdgeServer,
) -> None:
    for path, status in ((b"/v1/signal", b"426"), (b"/nope", b"404"), (b"/metrics", b"200")):
        reader, writer = await asyncio.open_connection("127.0.0.1", dev.port)
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert response.startswith(b"HTTP/1.1 " + status), response[:80]
        assert b"\r\nServer: signalpost\r\n" in response
