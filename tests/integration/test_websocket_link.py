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
    async def open(cls, port: int, pipelined: bytes = b"", trickle: bool = False) -> BareSocket:
        """Connect and upgrade; ``pipelined`` goes out right behind the request, in the
        same write, or with ``trickle`` all of it one byte per TCP segment."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            "GET /v1/signal HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode() + pipelined
        socket = cls(reader, writer)
        await socket.write_in_pieces(request, 1 if trickle else len(request))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert b"Server: signalpost" in head
        return socket

    async def write_in_pieces(self, data: bytes, piece: int) -> None:
        """Write ``data`` ``piece`` bytes at a time, each in its own TCP segment."""
        for start in range(0, len(data), piece):
            self.writer.write(data[start : start + piece])
            await self.writer.drain()
            if piece < len(data):
                await asyncio.sleep(0.001)  # asyncio sets TCP_NODELAY: one segment each

    def send(self, opcode: Opcode, data: bytes, fin: bool = True) -> None:
        self.writer.write(masked(opcode, data, fin))

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


def masked(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    """One client frame on the wire (masked, as RFC 6455 requires of clients)."""
    return Frame(opcode, data, fin).serialize(mask=True, extensions=[])


def text(frame: dict[str, object], padding: int = 0) -> bytes:
    """A text frame of ``frame`` as JSON, made longer with insignificant whitespace."""
    return masked(Opcode.TEXT, json.dumps(frame).encode().replace(b",", b"," + b" " * padding, 1))


def close_codes(frames: list[Frame]) -> list[int]:
    return [Close.parse(f.data).code for f in frames if f.opcode is Opcode.CLOSE]


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
    assert close_codes(frames) == [4429]
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
    assert close_codes(frames) == [4408]
    socket.close()


async def test_a_client_close_ends_the_connection_cleanly(dev: EdgeServer) -> None:
    socket = await BareSocket.open(dev.port)
    socket.send_json({"type": "hello", "token": token("alice")})
    welcome = await socket.read_frame()
    assert welcome is not None and json.loads(welcome.data)["type"] == "welcome"
    socket.send(Opcode.CLOSE, Close(1000, "bye").serialize())
    frames = await socket.until_eof(5)
    assert close_codes(frames) == [1000]
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


async def test_frames_cut_at_every_byte_are_served_whole_and_in_order(dev: EdgeServer) -> None:
    socket = await BareSocket.open(dev.port)
    stream = text({"type": "hello", "token": token("alice"), "id": 0})
    stream += text({"type": "ping", "id": 1}, padding=200)  # 16-bit length form
    stream += masked(Opcode.PING, b"in between")
    stream += text({"type": "ping", "id": 2})
    await socket.write_in_pieces(stream, 1)
    frames = [await socket.read_frame() for _ in range(4)]
    assert all(frame is not None for frame in frames)
    assert [(f.opcode, f.data) for f in frames if f and f.opcode is Opcode.PONG] == [
        (Opcode.PONG, b"in between")
    ]
    texts = _texts([f for f in frames if f is not None])
    assert [(t["type"], t["id"]) for t in texts] == [("welcome", 0), ("pong", 1), ("pong", 2)]
    socket.close()


async def test_frames_in_the_same_write_as_the_request_are_served(dev: EdgeServer) -> None:
    hello = text({"type": "hello", "token": token("alice"), "id": 0})
    socket = await BareSocket.open(dev.port, pipelined=hello + text({"type": "ping", "id": 1}))
    frames = [await socket.read_frame() for _ in range(2)]
    assert [(t["type"], t["id"]) for t in _texts([f for f in frames if f])] == [
        ("welcome", 0),
        ("pong", 1),
    ]
    socket.close()


async def test_a_request_head_and_hello_trickled_byte_by_byte_open_a_session(
    dev: EdgeServer,
) -> None:
    hello = text({"type": "hello", "token": token("alice"), "id": 0})
    socket = await BareSocket.open(dev.port, pipelined=hello, trickle=True)
    welcome = await socket.read_frame()
    assert welcome is not None and json.loads(welcome.data)["type"] == "welcome"
    socket.close()


async def test_a_frame_at_the_size_limit_arriving_in_pieces_is_served(dev: EdgeServer) -> None:
    socket = await BareSocket.open(dev.port)
    socket.send_json({"type": "hello", "token": token("alice")})
    await socket.read_frame()  # welcome
    ping = b'{"type":"ping","id":5}'
    big = ping[:-1] + b" " * (dev.settings.max_frame - len(ping)) + b"}"
    assert len(big) == dev.settings.max_frame
    await socket.write_in_pieces(masked(Opcode.TEXT, big) + text({"type": "ping", "id": 6}), 997)
    frames = [await socket.read_frame() for _ in range(2)]
    assert _texts([f for f in frames if f]) == [
        {"type": "pong", "id": 5},
        {"type": "pong", "id": 6},
    ]
    socket.close()


async def test_a_ping_inside_a_fragmented_message_is_answered_and_the_message_served(
    dev: EdgeServer,
) -> None:
    socket = await BareSocket.open(dev.port)
    socket.send_json({"type": "hello", "token": token("alice")})
    await socket.read_frame()  # welcome
    socket.send(Opcode.TEXT, b'{"type":"ping",', fin=False)
    socket.send(Opcode.PING, b"p")
    socket.send(Opcode.CONT, b'"id":7}', fin=True)
    frames = [await socket.read_frame() for _ in range(2)]
    assert [f.opcode for f in frames if f] == [Opcode.PONG, Opcode.TEXT]
    assert _texts([f for f in frames if f]) == [{"type": "pong", "id": 7}]
    socket.close()


PING = b'{"type":"ping","id":1}'
VIOLATIONS = {
    "unmasked text frame": bytes((0x81, len(PING))) + PING,
    "reserved bit set": bytes((0xC1,)) + masked(Opcode.TEXT, PING)[1:],
    "unknown opcode": bytes((0x83,)) + masked(Opcode.TEXT, PING)[1:],
    "text frame inside a fragmented message": masked(Opcode.TEXT, b'{"type":', fin=False)
    + masked(Opcode.TEXT, PING),
    "continuation with nothing to continue": masked(Opcode.CONT, PING),
}


@pytest.mark.parametrize("violation", VIOLATIONS.values(), ids=VIOLATIONS.keys())
async def test_a_protocol_violation_closes_1002_and_a_bystander_is_unaffected(
    dev: EdgeServer, violation: bytes
) -> None:
    bystander = await raw_client(url_of(dev), "bob")
    socket = await BareSocket.open(dev.port)
    socket.send_json({"type": "hello", "token": token("alice")})
    await socket.read_frame()  # welcome
    socket.writer.write(violation + masked(Opcode.TEXT, PING))
    frames = await socket.until_close_frame(5)
    assert close_codes(frames) == [1002]
    assert _texts(frames) == []  # nothing of it was served, nor the frame after it
    assert await bystander.request({"type": "ping", "id": 1}) == {"type": "pong", "id": 1}
    socket.close()


async def test_a_frame_over_the_limit_is_refused_on_its_header(dev: EdgeServer) -> None:
    socket = await BareSocket.open(dev.port)
    socket.send_json({"type": "hello", "token": token("alice")})
    await socket.read_frame()  # welcome
    too_big = dev.settings.max_frame + 1
    # The header and mask alone: the edge must not wait for (or buffer) the payload.
    socket.writer.write(bytes((0x81, 0xFF)) + too_big.to_bytes(8, "big") + os.urandom(4))
    assert close_codes(await socket.until_close_frame(5)) == [1009]
    socket.close()
