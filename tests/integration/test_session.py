"""Session set-up against a real dev-mode edge: hello, tokens, close codes, limits."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import jwt
import pytest
import websockets
from prometheus_client import REGISTRY
from websockets.exceptions import ConnectionClosed

from edge.server import EdgeServer
from signalpost.auth import mint_token
from tests.helpers import SECRET, raw_client, token, url_of
from tests.integration.conftest import DevFactory


async def closed_with(ws: websockets.ClientConnection) -> int | None:
    """Read until the server closes; return its close code."""
    async with asyncio.timeout(5):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None


async def test_welcome_carries_session_resume_and_heartbeat(dev: EdgeServer) -> None:
    client = await raw_client(url_of(dev), "alice")
    welcome = client.welcome
    assert welcome["user"] == "alice"
    assert welcome["resumed"] is False
    assert welcome["heartbeat"] == 25
    assert isinstance(welcome["ice_servers"], list)
    assert welcome["session"] and welcome["resume"]
    await client.close()


async def test_hello_id_is_echoed(dev: EdgeServer) -> None:
    async with websockets.connect(url_of(dev)) as ws:
        await ws.send(json.dumps({"type": "hello", "id": "h1", "token": token("alice")}))
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome" and welcome["id"] == "h1"


def _alg_none_token(user: str) -> str:
    def b64(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': user, 'exp': time.time() + 60})}."


@pytest.mark.parametrize(
    "bad_token",
    [
        pytest.param(
            lambda: mint_token("wrong-secret-0123456789abcdefghij", "eve", now=time.time()),
            id="wrong-signature",
        ),
        pytest.param(
            lambda: mint_token(SECRET, "eve", now=time.time() - 7200, ttl=60), id="expired"
        ),
        pytest.param(lambda: _alg_none_token("eve"), id="alg-none"),
        pytest.param(
            lambda: jwt.encode({"exp": time.time() + 60}, SECRET, algorithm="HS256"), id="no-sub"
        ),
        pytest.param(lambda: "not-a-jwt", id="garbage"),
        pytest.param(
            lambda: jwt.encode({"sub": "eve"}, SECRET * 2, algorithm="HS512"), id="unconfigured-alg"
        ),
    ],
)
async def test_bad_tokens_get_unauthorized_and_4401(dev: EdgeServer, bad_token: object) -> None:
    async with websockets.connect(url_of(dev)) as ws:
        await ws.send(json.dumps({"type": "hello", "token": bad_token()}))  # type: ignore[operator]
        error = json.loads(await ws.recv())
        assert error["type"] == "error" and error["code"] == "unauthorized"
        assert await closed_with(ws) == 4401


@pytest.mark.parametrize(
    "first_frame",
    [
        '{"type":"hello"}',
        '{"type":"ping","id":1}',
        "not json",
        '{"type":"join","room":"r"}',
        # ~2 KB nested 1,000 deep: the decoder's recursion limit, not an escaped error
        '{"type":"hello","token":' + "[" * 1000 + "]" * 1000 + "}",
    ],
)
async def test_a_first_frame_other_than_a_good_hello_is_refused(
    dev: EdgeServer, first_frame: str
) -> None:
    async with websockets.connect(url_of(dev)) as ws:
        await ws.send(first_frame)
        error = json.loads(await ws.recv())
        assert error["code"] == "unauthorized"
        assert await closed_with(ws) == 4401


async def test_hello_timeout_closes_4408(dev_factory: DevFactory) -> None:
    server = await dev_factory(hello_timeout=0.3)
    async with websockets.connect(url_of(server)) as ws:
        assert await closed_with(ws) == 4408


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connects and says nothing
        b"GET /v1/sig",  # half a request line
        b"GET /v1/signal HTTP/1.1\r\nHost: x\r\n",  # headers that never end
    ],
)
async def test_a_connection_that_never_completes_its_handshake_is_dropped(
    dev_factory: DevFactory, sent: bytes
) -> None:
    # Slowloris: the hello timeout starts only once the WebSocket is open, so the
    # handshake has its own (the same length).
    server = await dev_factory(hello_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(sent)
    await writer.drain()
    try:
        async with asyncio.timeout(3):
            assert await reader.read() == b""  # the server closed it
    finally:
        writer.close()


async def test_binary_frame_closes_1003(dev: EdgeServer) -> None:
    client = await raw_client(url_of(dev), "alice")
    await client.ws.send(b"\x00\x01binary")
    assert await closed_with(client.ws) == 1003


async def test_binary_hello_closes_1003(dev: EdgeServer) -> None:
    async with websockets.connect(url_of(dev)) as ws:
        await ws.send(b'{"type":"hello"}')
        assert await closed_with(ws) == 1003


async def test_oversized_frame_closes_1009_and_others_are_unaffected(
    dev_factory: DevFactory,
) -> None:
    server = await dev_factory(max_frame=4096)
    bystander = await raw_client(url_of(server), "bob")
    client = await raw_client(url_of(server), "alice")
    await client.send({"type": "signal", "room": "r", "data": {"x": "y" * 5000}})
    assert await closed_with(client.ws) == 1009
    pong = await bystander.request({"type": "ping", "id": 1})
    assert pong == {"type": "pong", "id": 1}
    await bystander.close()


async def test_origin_refused_4403(dev_factory: DevFactory) -> None:
    server = await dev_factory(allowed_origins=["https://app.example"])
    async with websockets.connect(url_of(server), origin="https://evil.example") as ws:  # type: ignore[arg-type]
        assert await closed_with(ws) == 4403
    async with websockets.connect(url_of(server), origin="https://app.example") as ws:  # type: ignore[arg-type]
        await ws.send(json.dumps({"type": "hello", "token": token("alice")}))
        assert json.loads(await ws.recv())["type"] == "welcome"


@pytest.mark.parametrize(("allow_missing", "admitted"), [(True, True), (False, False)])
async def test_a_client_without_origin_follows_allow_missing_origin(
    dev_factory: DevFactory, allow_missing: bool, admitted: bool
) -> None:
    # websockets' client sends no Origin unless told to: like the Python SDK or a native app.
    server = await dev_factory(
        allowed_origins=["https://app.example"], allow_missing_origin=allow_missing
    )
    async with websockets.connect(url_of(server)) as ws:
        if admitted:
            await ws.send(json.dumps({"type": "hello", "token": token("alice")}))
            assert json.loads(await ws.recv())["type"] == "welcome"
        else:
            assert await closed_with(ws) == 4403


async def test_malformed_frames_get_bad_request_and_the_connection_stays(
    dev_factory: DevFactory,
) -> None:
    server = await dev_factory(bad_frame_strikes=50)
    client = await raw_client(url_of(server), "alice")
    bad_frames = [
        "nope",
        "[1,2]",
        '{"type":"teleport","id":7}',
        '{"type":"join","id":8}',
        '{"type":"join","id":9,"room":42}',
        '{"type":"signal","id":10,"room":"r","data":"text"}',
        '{"type":"watch","id":11,"users":"bob"}',
        '{"type":"hello","id":12,"token":"x"}',
        '{"type":"ping","id":"' + "x" * 65 + '"}',
        '{"type":"signal","id":13,"room":"r","data":{"a":' + "[" * 1000 + "]" * 1000 + "}}",
        "[" * 5000 + "]" * 5000,
    ]
    counted = REGISTRY.get_sample_value("signalpost_client_bad_frames_total") or 0.0
    for frame in bad_frames:
        await client.send(frame)
        error = await client.recv_type("error")
        assert error["code"] == "bad_request", (frame, error)
    assert REGISTRY.get_sample_value("signalpost_client_bad_frames_total") == counted + len(
        bad_frames
    )
    # The ids that could be read are echoed.
    await client.send('{"type":"teleport","id":"t1"}')
    assert (await client.recv_type("error"))["id"] == "t1"
    assert await client.request({"type": "ping", "id": 1}) == {"type": "pong", "id": 1}
    await client.close()


async def test_a_client_that_keeps_sending_garbage_is_closed_4400(
    dev_factory: DevFactory,
) -> None:
    server = await dev_factory(bad_frame_strikes=5)
    client = await raw_client(url_of(server), "mallory")
    for _ in range(5):
        await client.send("garbage")
    assert await closed_with(client.ws) == 4400


async def test_a_flood_is_rate_limited_then_closed_4429(dev_factory: DevFactory) -> None:
    server = await dev_factory(rate_per_second=1, rate_burst=3, rate_strikes=5)
    bystander = await raw_client(url_of(server), "bob")
    client = await raw_client(url_of(server), "mallory")
    for n in range(3):
        await client.send({"type": "ping", "id": n})
    for n in range(3):
        assert (await client.recv()) == {"type": "pong", "id": n}
    await client.send({"type": "ping", "id": 99})
    refused = await client.recv_type("error")
    assert refused["code"] == "rate_limited" and refused["id"] == 99
    for n in range(10):
        await client.send({"type": "ping", "id": 100 + n})
    assert await closed_with(client.ws) == 4429
    assert await bystander.request({"type": "ping", "id": 1}) == {"type": "pong", "id": 1}


async def test_ping_and_ice_servers_with_turn_credentials(dev_factory: DevFactory) -> None:
    server = await dev_factory(
        turn_secret="turn-secret",
        turn_urls=["turn:127.0.0.1:3478?transport=udp"],
        stun_urls=["stun:127.0.0.1:3478"],
        turn_ttl=600,
    )
    client = await raw_client(url_of(server), "alice")
    assert client.welcome["ice_servers"][0] == {"urls": ["stun:127.0.0.1:3478"]}
    reply = await client.request({"type": "ice-servers", "id": 7})
    assert reply["type"] == "ice-servers" and reply["id"] == 7
    turn = reply["ice_servers"][1]
    expiry, user = turn["username"].split(":", 1)
    assert user == "alice" and 0 < int(expiry) - time.time() <= 600
    assert turn["urls"] == ["turn:127.0.0.1:3478?transport=udp"] and turn["credential"]
    await client.close()


async def test_http_endpoints(dev: EdgeServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", dev.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = await reader.read()
    writer.close()
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"ok\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", dev.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = await reader.read()
    writer.close()
    assert response.startswith(b"HTTP/1.1 200") and b"<!doctype html" in response.lower()


async def test_watching_too_many_users_is_too_large(dev_factory: DevFactory) -> None:
    server = await dev_factory(max_watch=3)
    client = await raw_client(url_of(server), "alice")
    reply = await client.request({"type": "watch", "id": 1, "users": ["a", "b", "c", "d"]})
    assert reply["type"] == "error" and reply["code"] == "too_large" and reply["id"] == 1
    assert (await client.request({"type": "watch", "id": 2, "users": ["a"]}))["type"] == "watching"


async def test_an_internal_failure_costs_one_request_not_the_connection(
    dev: EdgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await raw_client(url_of(dev), "alice")

    def broken(*args: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(dev.backplane, "to_room_owner", broken)
    reply = await client.request({"type": "join", "id": 5, "room": "r"})
    assert reply["type"] == "error" and reply["code"] == "internal" and reply["id"] == 5
    monkeypatch.undo()
    assert (await client.request({"type": "join", "id": 6, "room": "r"}))["type"] == "joined"


async def _metric(port: int, name: str) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    for line in response.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_metrics_count_frames_and_connections(dev: EdgeServer) -> None:
    frames_in = await _metric(dev.port, "signalpost_frames_in_total")
    frames_out = await _metric(dev.port, "signalpost_frames_out_total")
    connections = await _metric(dev.port, "signalpost_connections")
    client = await raw_client(url_of(dev), "alice")  # hello in, welcome out
    for i in range(5):
        assert (await client.request({"type": "ping", "id": i}))["type"] == "pong"
    assert await _metric(dev.port, "signalpost_frames_in_total") == frames_in + 6
    assert await _metric(dev.port, "signalpost_frames_out_total") == frames_out + 6
    assert await _metric(dev.port, "signalpost_connections") == connections + 1


async def test_a_hello_that_fails_inside_the_server_is_closed_1011(
    dev: EdgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug while handling the hello must not leave the connection open with no welcome
    # and no close (the hello timer stops when the hello arrives).
    def broken(token: str, now: float) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(dev._verifier, "verify", broken)
    async with websockets.connect(url_of(dev)) as ws:
        await ws.send(json.dumps({"type": "hello", "token": token("alice")}))
        assert await closed_with(ws) == 1011


async def test_a_failed_write_to_one_client_does_not_stop_the_others(
    dev: EdgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CI chaos run: uvloop raised on a write to a transport reset before the protocol
    # heard of it; the exception left the flush loop, and every client after it in that
    # loop iteration kept a full outbox that was never flushed again (they are queued only
    # when their outbox is empty): 1,167 acked signals never delivered.
    url = url_of(dev)
    alice, bob = await raw_client(url, "alice"), await raw_client(url, "bob")
    broken = dev.sessions[alice.session]
    fine = dev.sessions[bob.session]

    def refuse(messages: list[bytes]) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    monkeypatch.setattr(broken.link, "send_texts", refuse)
    ping = json.dumps({"type": "pong", "id": "x"}).encode()
    dev._write([broken, fine], ping)  # one loop iteration: alice first, then bob
    assert await bob.recv() == {"type": "pong", "id": "x"}
    dev._write([fine], json.dumps({"type": "pong", "id": "y"}).encode())
    assert await bob.recv() == {"type": "pong", "id": "y"}  # bob is flushed ever after
