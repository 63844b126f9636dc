"""Experiment: the floor relay's logic on websockets' sans-I/O core, without its asyncio shell.

Same protocol subset and same per-message work as ``bench.floor_relay`` (msgspec decode
with raw ``data``, one lookup, one frame built by concatenation, the ack), but the I/O is
an ``asyncio.Protocol`` feeding ``websockets.server.ServerProtocol`` directly: bytes in,
events out, handled synchronously in ``data_received`` (no task per connection, no
future per frame), and every connection's output written once per loop iteration. This
is the shape the STYLE.md anchor describes ("the asyncio shell's data_received is ~30
lines: feed bytes in, take events out, write") and what an edge built that way could cost.

    .venv/bin/python -m bench.experiments.sansio_relay --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal

import msgspec
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol


class Frame(msgspec.Struct):
    type: str
    id: int | str | None = None
    room: str | None = None
    to: str | None = None
    data: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))


_decode = msgspec.json.Decoder(Frame).decode
_encode = msgspec.json.encode
_ids = itertools.count(1)

rooms: dict[str, dict[str, RelayConnection]] = {}
_dirty: dict[RelayConnection, None] = {}


def _flush() -> None:
    for connection in _dirty:
        connection.flush()
    _dirty.clear()


def _reply(kind: str, request_id: int | str | None, extra: bytes = b"") -> bytes:
    return b'{"type":"%s","id":%s%s}' % (kind.encode(), _encode(request_id), extra)


class RelayConnection(asyncio.Protocol):
    """One client: a sans-I/O WebSocket protocol plus the floor's relay logic."""

    def __init__(self) -> None:
        self.ws = ServerProtocol(max_size=65536)  # no extensions: no compression
        self.transport: asyncio.Transport | None = None
        self.session = f"s{next(_ids)}"
        self.sender = b'{"session":"%s","user":"bench"}' % self.session.encode()
        self.joined: set[str] = set()
        self.hello = False

    # ----------------------------------------------------------------- I/O

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Request):
                self.ws.send_response(self.ws.accept(event))
            elif isinstance(event, WsFrame) and event.opcode is Opcode.TEXT:
                self.on_text(event.data)
        self.mark()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self.mark()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        _dirty.pop(self, None)
        for name in self.joined:
            _leave(self, name)
        self.joined.clear()

    def send(self, payload: bytes) -> None:
        if self.ws.state is State.OPEN:
            self.ws.send_text(payload)
            self.mark()

    def mark(self) -> None:
        if not _dirty:
            asyncio.get_running_loop().call_soon(_flush)
        _dirty[self] = None

    def flush(self) -> None:
        assert self.transport is not None
        chunks = self.ws.data_to_send()
        if not chunks:
            return
        if all(chunks):
            self.transport.write(b"".join(chunks))
        else:  # b"" asks to half-close after the data before it
            for chunk in chunks:
                if chunk:
                    self.transport.write(chunk)
                else:
                    self.transport.close()
                    return

    # ----------------------------------------------------------------- relay logic

    def on_text(self, raw: bytes) -> None:
        try:
            frame = _decode(raw)
        except msgspec.DecodeError:
            self.send(b'{"type":"error","code":"bad_request","message":""}')
            return
        kind = frame.type
        if kind == "signal":
            members = rooms.get(frame.room or "")
            if members is None or self.session not in members:
                self.send(
                    b'{"type":"error","code":"not_in_room","message":"","id":%s}'
                    % _encode(frame.id)
                )
                return
            out = b'{"type":"signal","room":%s,"data":%s,"from":%s}' % (
                _encode(frame.room),
                bytes(frame.data),
                self.sender,
            )
            if frame.to is not None:
                target = members.get(frame.to)
                if target is not None:
                    target.send(out)
            else:
                for session, member in members.items():
                    if session != self.session:
                        member.send(out)
            if frame.id is not None:
                self.send(_reply("ack", frame.id))
        elif kind == "hello" and not self.hello:
            self.hello = True
            self.send(
                b'{"type":"welcome","session":"%s","user":"bench","resume":"",'
                b'"resumed":false,"ice_servers":[],"heartbeat":25}' % self.session.encode()
            )
        elif kind == "join":
            name = frame.room or ""
            members = rooms.setdefault(name, {})
            others = [s for s in members if s != self.session]
            listing = b",".join(
                b'{"session":"%s","user":"bench","meta":{}}' % s.encode() for s in others
            )
            members[self.session] = self
            self.joined.add(name)
            self.send(
                _reply("joined", frame.id, b',"room":%s,"members":[%s]' % (_encode(name), listing))
            )
            peer = b'{"session":"%s","user":"bench","meta":{}}' % self.session.encode()
            for s in others:
                members[s].send(
                    b'{"type":"peer-joined","room":%s,"peer":%s}' % (_encode(name), peer)
                )
        elif kind == "leave":
            _leave(self, frame.room or "")
            self.joined.discard(frame.room or "")
            self.send(_reply("left", frame.id, b',"room":%s' % _encode(frame.room)))
        elif kind == "ping":
            self.send(_reply("pong", frame.id))


def _leave(connection: RelayConnection, name: str) -> None:
    members = rooms.get(name)
    if members is None or members.pop(connection.session, None) is None:
        return
    if not members:
        del rooms[name]
        return
    left = b'{"type":"peer-left","room":%s,"peer":{"session":"%s"},"reason":"left"}' % (
        _encode(name),
        connection.session.encode(),
    )
    for member in members.values():
        member.send(left)


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    server = await loop.create_server(RelayConnection, host, port)
    bound = server.sockets[0].getsockname()[1]
    print(f"floor relay: ws://{host}:{bound}/v1/signal (sans-I/O experiment)", flush=True)
    await stop
    server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args()
    import uvloop

    uvloop.run(main(options.host, options.port))
