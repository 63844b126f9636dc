"""Property-based fuzzing of live servers: a dev edge over real WebSockets, a broker over
CurveZMQ.

* **Client frames**: random text, random JSON, valid frames with fields replaced, dropped,
  added or retagged, then bytes inserted, deleted or replaced; deep nesting; binary frames;
  frames over ``max_frame``. Sent before and after ``hello`` by a fuzzing client that
  reconnects whenever the edge closes it.
* **Raw WebSocket bytes**: after a real handshake, a client's stream is valid masked frames
  with bytes flipped, lengths lied about, control frames and fragments thrown in: the
  edge's own frame splitter (``edge/websocket_link.py``) sees it all.
* **Node envelopes**: every envelope kind built from its type hints, random msgpack, bodies
  with bytes mutated, frames of the wrong version, sent by a node with valid Curve keys to
  a live broker's ROUTER.

Each example starts a fresh server and checks, once the fuzzer's input was handled (a
marker round trip on the fuzzer's own connection): no exception escaped (no ERROR log
record, nothing reached the event loop's exception handler); the server sent only JSON
frames with a ``type`` and only documented close codes; a well-behaved client (node) is
served afterwards; a room the fuzzer is not in was not disturbed (its members exchange a
signal and see nothing before it).

Bounded: ``SIGNALPOST_FUZZ_EXAMPLES`` examples per test (default: a fixed set of 25, the
same every run, about 10 s in all), each within ``EXAMPLE_TIMEOUT``. A longer run:
``SIGNALPOST_FUZZ_EXAMPLES=500 pytest tests/integration/test_fuzz.py`` (fresh randomness).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import socket
import struct
import typing
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import msgspec
import websockets
import zmq
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from broker.service import BrokerNode
from edge.backplane import LocalBackplane
from edge.server import EdgeServer
from signalpost.config import load_settings
from signalpost.errors import CloseCode
from signalpost.node_keys import SECRET_SUFFIX, create_node_keys, node_keys, read_trusted
from signalpost.transport import DealerLink, frame, unframe
from signalpost.wire import (
    WIRE_VERSION,
    Deliver,
    Envelope,
    Heartbeat,
    JoinCmd,
    Reply,
    SignalCmd,
    decode_batch,
    encode_envelope,
    peer_object,
    sender_object,
)
from tests.helpers import SECRET, RawClient, close_raw_clients, curve_dealer, raw_client, token
from tests.integration.test_transport import Collected

EXAMPLES = int(os.environ.get("SIGNALPOST_FUZZ_EXAMPLES", "0"))
EXAMPLE_TIMEOUT = 20.0
MAX_FRAME = 65536  # the default; some fuzzed frames are over it (close 1009)
CLOSE_CODES = {int(code) for code in CloseCode} | {1002, 1007}  # + websockets' own refusals


def fuzz_settings() -> settings:
    """A fixed set of examples in CI (derandomized); fresh ones with the env var."""
    return settings(
        max_examples=EXAMPLES or 25,
        derandomize=not EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------------- failure capture


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def no_escaped_errors() -> Iterator[list[str]]:
    """Fail if an exception escaped: an ERROR record (every ``log.exception`` of a shell
    that caught a bug), anything reaching the event loop's exception handler, or a task
    that died of one (found by keeping every task: one that died is otherwise reported
    only if and when it is garbage collected)."""
    handler = _Errors()
    root = logging.getLogger()
    root.addHandler(handler)
    loop_errors: list[str] = []
    tasks: list[asyncio.Task[Any]] = []
    loop = asyncio.get_running_loop()

    def keep(
        loop: asyncio.AbstractEventLoop, coro: typing.Coroutine[Any, Any, Any], **kwargs: Any
    ) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        tasks.append(task)
        return task

    loop.set_exception_handler(lambda _, context: loop_errors.append(str(context)))
    loop.set_task_factory(keep)  # type: ignore[arg-type]
    try:
        yield loop_errors
    finally:
        loop.set_task_factory(None)
        root.removeHandler(handler)
        loop.set_exception_handler(None)
    died = [
        f"{task.get_name()}: {task.exception()!r}"
        for task in tasks
        if task.done() and not task.cancelled() and task.exception() is not None
    ]
    assert not died, died
    assert not handler.records, [r.getMessage() for r in handler.records]
    assert not loop_errors, loop_errors


def run(scenario: Callable[[], typing.Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(EXAMPLE_TIMEOUT):
            await scenario()

    asyncio.run(bounded())


# --------------------------------------------------------------------------- client frames

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

TEMPLATES: list[dict[str, Any]] = [
    {"type": "join", "id": 1, "room": "fz"},
    {"type": "join", "id": 2, "room": "victims", "meta": {"device": "x"}},
    {"type": "leave", "id": 3, "room": "fz"},
    {"type": "signal", "id": 4, "room": "fz", "data": {"kind": "offer"}},
    {"type": "signal", "id": 5, "room": "victims", "to": "x", "data": {}},
    {"type": "watch", "id": 6, "users": ["alice", "bob"]},
    {"type": "unwatch", "id": 7, "users": ["alice"]},
    {"type": "ping", "id": 8},
    {"type": "ice-servers", "id": 9},
    {"type": "hello", "id": 10, "token": "x", "rooms": {"fz": {"epoch": "e", "offset": 1}}},
]


@st.composite
def mutated_frames(draw: st.DrawFn) -> str:
    """A valid frame with fields replaced, dropped, added or retagged, then maybe bytes."""
    message = dict(draw(st.sampled_from(TEMPLATES)))
    for _ in range(draw(st.integers(0, 3))):
        operation = draw(st.sampled_from(["set", "drop", "add", "retag"]))
        keys = sorted(message)
        if operation == "set" and keys:
            message[draw(st.sampled_from(keys))] = draw(json_values)
        elif operation == "drop" and keys:
            message.pop(draw(st.sampled_from(keys)))
        elif operation == "add":
            message[draw(st.text(max_size=8))] = draw(json_values)
        else:
            message["type"] = draw(st.sampled_from([t["type"] for t in TEMPLATES]) | st.text())
    text = json.dumps(message)
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.text(min_size=1, max_size=3))
        if kind == "insert":
            text = text[:at] + piece + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at] + piece + text[at + 1 :]
    return text


def nested_signal(depth: int) -> str:
    """A signal whose ``data`` is nested ``depth`` deep."""
    return '{"type":"signal","id":1,"room":"fz","data":{"a":' + "[" * depth + "]" * depth + "}}"


#: Nesting depths: around the interpreter's recursion limit (1,000) and far past it (the
#: limit is higher while hypothesis runs a test), within MAX_FRAME (past it a frame is
#: refused by size first), and any.
DEPTHS = st.sampled_from([1000, 5000, 20000, 30000]) | st.integers(1, 30000)

client_frames: st.SearchStrategy[str | bytes] = st.one_of(
    mutated_frames(),
    mutated_frames(),  # weighed: most frames are almost valid
    st.text(max_size=200),
    json_values.map(json.dumps),
    DEPTHS.map(lambda depth: "[" * depth + "]" * depth),
    # Deep where the schema takes any JSON (a signal's data, a join's meta): typed fields
    # refuse the first wrong level, these are walked to the bottom.
    DEPTHS.map(nested_signal),
    DEPTHS.map(
        lambda depth: (
            '{"type":"join","room":"fz","meta":' + '{"a":' * depth + "1" + "}" * depth + "}"
        )
    ),
    st.binary(max_size=64),
    st.integers(MAX_FRAME - 8, MAX_FRAME + 64).map(
        lambda size: '{"type":"ping","id":"' + "x" * size + '"}'
    ),
)


@asynccontextmanager
async def dev_edge() -> AsyncIterator[EdgeServer]:
    config = load_settings(
        environ={},
        jwt_secret=SECRET,
        host="127.0.0.1",
        port=0,
        max_frame=MAX_FRAME,
        rate_per_second=1e6,
        rate_burst=1_000_000,
        bad_frame_strikes=1_000_000,  # the fuzzer is not closed for garbage: it goes deeper
        hello_timeout=5.0,
    )
    server = EdgeServer(config, LocalBackplane(config), edge_id="dev")
    await server.start()
    try:
        yield server
    finally:
        await close_raw_clients()
        await server.close()


async def victims(url: str) -> tuple[RawClient, RawClient]:
    """Alice and Bob in room ``victims`` (capacity 2: nobody else gets in)."""
    alice = await raw_client(url, "alice")
    bob = await raw_client(url, "bob")
    await alice.request({"type": "join", "id": 1, "room": "victims"})
    await bob.request({"type": "join", "id": 1, "room": "victims"})
    await alice.recv_type("peer-joined")
    return alice, bob


async def undisturbed(alice: RawClient, bob: RawClient, tag: str) -> None:
    """Alice signals Bob; neither saw anything in between (the markers come first)."""
    await alice.send(
        {"type": "signal", "id": tag, "room": "victims", "to": bob.session, "data": {"m": tag}}
    )
    await bob.until_markers({"type": "signal", "data": {"m": tag}})
    await alice.until_markers({"type": "ack", "id": tag})


async def served(url: str) -> None:
    """A well-behaved newcomer: hello, join, signal to nobody, ping."""
    carol = await raw_client(url, "carol")
    assert (await carol.request({"type": "join", "id": 1, "room": "after"}))["type"] == "joined"
    assert await carol.request({"type": "ping", "id": 2}) == {"type": "pong", "id": 2}


class Fuzzer:
    """A client that sends what it is given and reconnects whenever the edge closes it."""

    def __init__(self, url: str, authenticate: bool) -> None:
        self.url = url
        self.authenticate = authenticate
        self.ws: websockets.ClientConnection | None = None
        self.close_codes: list[int | None] = []
        self.reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self.ws = await websockets.connect(self.url, max_size=None)
        if self.authenticate:
            await self.ws.send(json.dumps({"type": "hello", "token": token("mallory")}))
        self.reader = asyncio.create_task(self._read(self.ws))

    async def _read(self, ws: websockets.ClientConnection) -> None:
        try:
            async for raw in ws:
                message = json.loads(raw)  # the server sends JSON text only...
                assert isinstance(message, dict) and isinstance(message.get("type"), str), raw
        except ConnectionClosed as exc:
            self.close_codes.append(exc.rcvd.code if exc.rcvd else None)

    async def send(self, message: str | bytes) -> None:
        if self.ws is None or self.reader is None or self.reader.done():
            if self.reader is not None:
                await self.reader
            await self.connect()
        assert self.ws is not None
        with suppress(ConnectionClosed):  # closed under us: the next send reconnects
            await self.ws.send(message)

    async def finish(self) -> None:
        """The marker: a ping on a fresh, authenticated connection proves the edge went on;
        then the last connection is closed and its reader checked."""
        if self.ws is not None and self.reader is not None:
            await self.ws.close()
            await self.reader
        # ...with documented close codes only (None: the connection dropped without one,
        # as after a protocol error websockets itself fails the connection for).
        assert {code for code in self.close_codes if code is not None} <= CLOSE_CODES, (
            self.close_codes
        )


@fuzz_settings()
@given(frames=st.lists(client_frames, min_size=1, max_size=20), authenticate=st.booleans())
# Issue 14's frames, in every run: deep nesting in a hello and after it.
@example(frames=['{"type":"hello","token":' + "[" * 1000 + "]" * 1000 + "}"], authenticate=False)
@example(frames=[nested_signal(30000).replace('"signal"', '"hello"')], authenticate=False)
@example(frames=[nested_signal(30000)], authenticate=True)
def test_fuzzed_client_frames(frames: list[str | bytes], authenticate: bool) -> None:
    async def scenario() -> None:
        with no_escaped_errors():
            async with dev_edge() as server:
                url = f"ws://127.0.0.1:{server.port}/v1/signal"
                alice, bob = await victims(url)
                fuzzer = Fuzzer(url, authenticate)
                for message in frames:
                    await fuzzer.send(message)
                await fuzzer.send('{"type":"ping","id":"done"}')
                await fuzzer.finish()
                await undisturbed(alice, bob, "after-fuzz")
                await served(url)

    run(scenario)


# --------------------------------------------------------------------------- raw WebSocket bytes


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    """One client WebSocket frame (RFC 6455), masked as clients must."""
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = secrets.token_bytes(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@st.composite
def raw_streams(draw: st.DrawFn) -> bytes:
    """Bytes a client writes after the handshake: frames, some of them broken."""
    out = b""
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["text", "text", "control", "fragment", "random", "lie"]))
        if kind == "text":
            payload = draw(mutated_frames()).encode()
            piece = ws_frame(0x1, payload, mask=draw(st.booleans()) or draw(st.booleans()))
        elif kind == "control":
            opcode = draw(st.sampled_from([0x8, 0x9, 0xA, 0x3, 0xB]))
            piece = ws_frame(opcode, draw(st.binary(max_size=130)))
        elif kind == "fragment":
            piece = ws_frame(0x1, b'{"type":', fin=False) + ws_frame(
                draw(st.sampled_from([0x0, 0x1])), b'"ping"}'
            )
        elif kind == "random":
            piece = draw(st.binary(max_size=40))
        else:  # a header announcing more (or less) than follows
            piece = bytes([0x81, 0x80 | draw(st.integers(0, 127))]) + draw(st.binary(max_size=20))
        if piece and draw(st.integers(0, 4)) == 0:  # flip a byte
            at = draw(st.integers(0, len(piece) - 1))
            piece = piece[:at] + bytes([piece[at] ^ draw(st.integers(1, 255))]) + piece[at + 1 :]
        out += piece
    return out


async def raw_session(port: int, stream: bytes) -> None:
    """Handshake by hand, send a hello, then ``stream``; read until the edge closes or
    ``stream`` was taken (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    writer.write(
        (
            "GET /v1/signal HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = await reader.readuntil(b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 101"), response
    hello = json.dumps({"type": "hello", "token": token("mallory")}).encode()
    writer.write(ws_frame(0x1, hello) + stream)
    try:
        async with asyncio.timeout(0.5):  # the edge closes, or it waits for more bytes
            while await reader.read(65536):
                pass
    except TimeoutError:
        pass
    writer.close()
    with suppress(ConnectionError):
        await writer.wait_closed()


@fuzz_settings()
@given(streams=st.lists(raw_streams(), min_size=1, max_size=3))
def test_fuzzed_websocket_bytes(streams: list[bytes]) -> None:
    async def scenario() -> None:
        with no_escaped_errors():
            async with dev_edge() as server:
                url = f"ws://127.0.0.1:{server.port}/v1/signal"
                alice, bob = await victims(url)
                for stream in streams:
                    await raw_session(server.port, stream)
                await undisturbed(alice, bob, "after-raw")
                await served(url)

    run(scenario)


# --------------------------------------------------------------------------- node envelopes

ENVELOPE_KINDS = typing.get_args(Envelope)

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=16),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=16,
)


@st.composite
def envelope_bodies(draw: st.DrawFn) -> bytes:
    """One body: an envelope of any kind from its type hints (maybe with bytes mutated), or
    random msgpack (maybe shaped like an envelope: a tag first)."""
    choice = draw(st.integers(0, 3))
    body: bytes
    if choice <= 1:
        envelope = draw(st.sampled_from(ENVELOPE_KINDS).flatmap(st.builds))
        try:
            body = encode_envelope(envelope)
        except OverflowError:  # an int past 64 bits: not encodable, send something else
            body = msgspec.msgpack.encode(draw(msgpack_values))
    elif choice == 2:
        body = msgspec.msgpack.encode([draw(st.integers(0, 60)), *draw(st.lists(msgpack_values))])
    else:
        body = msgspec.msgpack.encode(draw(msgpack_values))
    if body and draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + draw(st.binary(max_size=3)) + body[at + 1 :]
    return body


node_frames: st.SearchStrategy[bytes] = st.one_of(
    st.lists(envelope_bodies(), min_size=1, max_size=5).map(frame),
    st.lists(envelope_bodies(), min_size=1, max_size=5).map(frame),
    st.binary(max_size=64).map(lambda junk: WIRE_VERSION + junk),
    st.binary(max_size=64),
    st.integers(1, 200_000).map(lambda depth: WIRE_VERSION + b"\x91" * depth + b"\xc0"),
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def fuzz_broker(keys_dir: Path, node_frames_: list[bytes]) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    create_node_keys(keys_dir, "broker", endpoint, kind="broker")
    create_node_keys(keys_dir, "victim-edge", kind="edge")
    _, fuzz_secret = create_node_keys(keys_dir, "fuzz-edge", kind="edge")
    config = load_settings(
        environ={},
        jwt_secret=SECRET,
        broker_bind=endpoint,
        node_key_file=str(keys_dir / ("broker" + SECRET_SUFFIX)),
        cluster_keys_dir=str(keys_dir),
        heartbeat_interval=0.2,
        ticket_secret="fuzz-ticket-secret-0123456789abcdef",
    )
    broker = BrokerNode(config)
    stop = asyncio.Event()
    running = asyncio.create_task(broker.run(stop.wait))
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    victim_keys = node_keys(
        load_settings(
            environ={},
            node_key_file=str(keys_dir / ("victim-edge" + SECRET_SUFFIX)),
            cluster_keys_dir=str(keys_dir),
        )
    )
    got: Collected[Envelope] = Collected()
    up = asyncio.Event()
    victim = DealerLink(
        context,
        endpoint,
        "victim-edge",
        "inc-victim",
        on_envelope=got.append,
        on_up=lambda link, fresh: up.set(),
        on_down=lambda link: None,
        heartbeat_interval=0.2,
        peer_expiry=5.0,
        keys=victim_keys,
        max_message=config.max_node_message,
    )
    fuzzer = curve_dealer(
        context, endpoint, b"fuzz-edge", fuzz_secret, read_trusted(keys_dir).servers[endpoint]
    )
    try:
        victim.start()
        await up.wait()
        for n, session in enumerate(("sv1", "sv2")):
            victim.send(
                JoinCmd(
                    session,
                    f"c{session}",
                    "victim-edge",
                    1,
                    1,
                    "victims",
                    peer_object(session, f"u{n}", None, None),
                )
            )
        await got.reach(3)  # two replies, one peer-joined
        assert sum(isinstance(e, Reply) for e in got) == 2, got

        for payload in node_frames_:
            fuzzer.send(payload)
        # Marker on the fuzzer's own connection: a heartbeat of a new incarnation is
        # answered at once, after everything it sent before.
        marker = Heartbeat("fuzz-edge", secrets.token_hex(4))
        fuzzer.send(frame([encode_envelope(marker)]))
        answered = False
        while not answered:  # bounded by EXAMPLE_TIMEOUT
            while not fuzzer.poll(0):  # noqa: ASYNC110 - a plain zmq socket
                await asyncio.sleep(0.005)
            batch = unframe(fuzzer.recv())
            assert batch is not None  # the broker sends frames of its own version only
            answered = any(
                isinstance(e, Heartbeat) and e.node == broker.node_id for e in decode_batch(batch)
            )

        # The victims' room is undisturbed: a signal gets its ack and its delivery.
        before = len(got)
        victim.send(
            SignalCmd(
                "sv1",
                "csv1",
                "victim-edge",
                2,
                "after-fuzz",
                "victims",
                "sv2",
                sender_object("sv1", "u0"),
                b'{"m":1}',
            )
        )
        await got.reach(before + 2)
        tail = got[before:]
        assert any(isinstance(e, Reply) and e.session == "sv1" and e.seq == 2 for e in tail), tail
        assert any(isinstance(e, Deliver) and e.sessions == ["sv2"] for e in tail), tail
    finally:
        fuzzer.close()
        await victim.close()
        stop.set()
        await running
        context.destroy(linger=0)


@fuzz_settings()
@given(frames=st.lists(node_frames, min_size=1, max_size=12))
@example(frames=[WIRE_VERSION + b"\x91" * 5000 + b"\xc0"])  # nesting: issue 14
def test_fuzzed_envelopes_at_a_live_broker(frames: list[bytes]) -> None:
    import tempfile

    async def scenario() -> None:
        with (
            tempfile.TemporaryDirectory(prefix="signalpost-fuzz-") as directory,
            no_escaped_errors(),
        ):
            await fuzz_broker(Path(directory), frames)

    run(scenario)
