"""The relay floor F: the least a relay on signalpost's own stack can do per message.

One process, ``websockets`` on uvloop like ``signalpost dev``; per frame: one
``msgspec`` decode (``data`` kept raw, as signalpost does), one dict lookup of the
target, one frame built by concatenation and written with ``broadcast`` (no await), and
the ack. It speaks just enough of protocol v1 for ``bench.loadgen``: ``hello`` (the
token is not checked), ``join`` (no capacity), ``signal`` (with or without ``to``),
``leave``, ``ping``. No auth, limits, offsets, history, presence or metrics: everything
signalpost does beyond this is what the ratio to F measures.

    .venv/bin/python -m bench.floor_relay --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal

import msgspec
from websockets.asyncio.server import ServerConnection, serve
from websockets.asyncio.server import broadcast as _broadcast
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State


class Frame(msgspec.Struct):
    type: str
    id: int | str | None = None
    room: str | None = None
    to: str | None = None
    data: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))
    token: str | None = None


_decode = msgspec.json.Decoder(Frame).decode
_encode = msgspec.json.encode
_ids = itertools.count(1)

sessions: dict[str, ServerConnection] = {}
rooms: dict[str, dict[str, ServerConnection]] = {}


#: ``--coalesce``: frames for one connection written with one ``transport.write`` per
#: loop iteration instead of one per frame (an experiment; see docs/performance.md).
_pending: dict[ServerConnection, None] = {}


def _flush() -> None:
    for ws in _pending:
        chunks = ws.protocol.data_to_send()
        if chunks and all(chunks):  # b"" would mean EOF: leave that to websockets
            ws.transport.write(b"".join(chunks))
        else:
            ws.send_data()
    _pending.clear()


def _coalesced(connections: list[ServerConnection], payload: bytes) -> None:
    for ws in connections:
        if ws.protocol.state is State.OPEN:
            ws.protocol.send_text(payload)
            if not _pending:
                asyncio.get_running_loop().call_soon(_flush)
            _pending[ws] = None


def broadcast(connections: list[ServerConnection], payload: bytes) -> None:
    """Write ``payload`` to each connection (replaced by ``_coalesced`` with --coalesce)."""
    _broadcast(connections, payload, text=True)


def _reply(kind: str, request_id: int | str | None, extra: bytes = b"") -> bytes:
    return b'{"type":"%s","id":%s%s}' % (kind.encode(), _encode(request_id), extra)


async def handler(ws: ServerConnection) -> None:
    session = f"s{next(_ids)}"
    sender = b'{"session":"%s","user":"bench"}' % session.encode()
    joined: set[str] = set()
    try:
        hello = _decode(await ws.recv())
        if hello.type != "hello":
            await ws.close(4401, "hello first")
            return
        sessions[session] = ws
        broadcast(
            [ws],
            b'{"type":"welcome","session":"%s","user":"bench","resume":"",'
            b'"resumed":false,"ice_servers":[],"heartbeat":25}' % session.encode(),
        )
        async for raw in ws:
            try:
                frame = _decode(raw)
            except msgspec.DecodeError:
                broadcast([ws], b'{"type":"error","code":"bad_request","message":""}')
                continue
            kind = frame.type
            if kind == "signal":
                members = rooms.get(frame.room or "")
                if members is None or session not in members:
                    broadcast(
                        [ws],
                        b'{"type":"error","code":"not_in_room","message":"",'
                        b'"id":%s}' % _encode(frame.id),
                    )
                    continue
                out = b'{"type":"signal","room":%s,"data":%s,"from":%s}' % (
                    _encode(frame.room),
                    bytes(frame.data),
                    sender,
                )
                if frame.to is not None:
                    target = members.get(frame.to)
                    targets = [target] if target is not None else []
                else:
                    targets = [c for s, c in members.items() if s != session]
                broadcast(targets, out)
                if frame.id is not None:
                    broadcast([ws], _reply("ack", frame.id))
            elif kind == "join":
                name = frame.room or ""
                members = rooms.setdefault(name, {})
                peer = b'{"session":"%s","user":"bench","meta":{}}' % session.encode()
                others = [s for s in members if s != session]
                listing = b",".join(
                    b'{"session":"%s","user":"bench","meta":{}}' % s.encode() for s in others
                )
                members[session] = ws
                joined.add(name)
                broadcast(
                    [ws],
                    _reply(
                        "joined", frame.id, b',"room":%s,"members":[%s]' % (_encode(name), listing)
                    ),
                )
                broadcast(
                    [members[s] for s in others],
                    b'{"type":"peer-joined","room":%s,"peer":%s}' % (_encode(name), peer),
                )
            elif kind == "leave":
                _leave(session, frame.room or "")
                joined.discard(frame.room or "")
                broadcast([ws], _reply("left", frame.id, b',"room":%s' % _encode(frame.room)))
            elif kind == "ping":
                broadcast([ws], _reply("pong", frame.id))
    except (ConnectionClosed, msgspec.DecodeError):
        pass
    finally:
        sessions.pop(session, None)
        for name in joined:
            _leave(session, name)


def _leave(session: str, name: str) -> None:
    members = rooms.get(name)
    if members is None or members.pop(session, None) is None:
        return
    if not members:
        del rooms[name]
        return
    broadcast(
        list(members.values()),
        b'{"type":"peer-left","room":%s,"peer":{"session":"%s"},"reason":"left"}'
        % (_encode(name), session.encode()),
    )


async def main(host: str, port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(
            sig, lambda: stop.done() or stop.set_result(None)
        )
    async with serve(
        handler,
        host,
        port,
        compression=None,
        max_size=65536,
        max_queue=64,
        ping_interval=25,
        ping_timeout=25,
    ) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"floor relay: ws://{host}:{bound}/v1/signal", flush=True)
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--coalesce",
        action="store_true",
        help="one write per connection per loop iteration (experiment)",
    )
    options = parser.parse_args()
    if options.coalesce:
        broadcast = _coalesced
    import uvloop

    uvloop.run(main(options.host, options.port))
