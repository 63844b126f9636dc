"""The server API (edge/server_api.py) against a dev-mode edge, over real HTTP.

The admin client (``signalpost.admin``) is blocking: it runs in a thread
(``asyncio.to_thread``) while the edge serves in this event loop.
"""

from __future__ import annotations

import asyncio
import http.client as httpclient
import json
import os
import sys
import time
from typing import Any

import pytest
import websockets

from edge.server import EdgeServer
from signalpost.admin import AdminClient
from signalpost.api_keys import ALL_SCOPES, mint_api_key
from signalpost.client import Disconnected, RoomClosed, SignalEvent, SignalpostClient
from signalpost.errors import Forbidden, NotFound, Unauthorized, UnknownPeer
from tests.helpers import SECRET, RawClient, raw_client, token, url_of
from tests.integration.conftest import DevFactory


def api_key(*scopes: str, name: str = "backend") -> str:
    return mint_api_key(SECRET, name, scopes or ALL_SCOPES, now=time.time())


def admin(server: EdgeServer, key: str | None = None) -> AdminClient:
    return AdminClient(f"http://127.0.0.1:{server.port}", key or api_key(), retries=0)


def http(
    server: EdgeServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request (blocking: call in a thread)."""
    connection = httpclient.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


async def call(server: EdgeServer, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    status, _headers, body = await asyncio.to_thread(http, server, method, path, **kw)
    return status, json.loads(body) if body else None


async def joined_pair(server: EdgeServer, room: str = "r1") -> tuple[RawClient, RawClient]:
    alice = await raw_client(url_of(server), "alice")
    bob = await raw_client(url_of(server), "bob")
    assert (await alice.request({"type": "join", "id": 1, "room": room}))["type"] == "joined"
    assert (await bob.request({"type": "join", "id": 2, "room": room}))["type"] == "joined"
    await alice.recv_type("peer-joined")
    return alice, bob


# --------------------------------------------------------------------------- keys, scopes


async def test_no_key_no_api(dev: EdgeServer) -> None:
    status, body = await call(dev, "GET", "/v1/api/rooms")
    assert status == 401 and body["code"] == "unauthorized"
    status, body = await call(
        dev, "GET", "/v1/api/rooms", headers={"Authorization": "Bearer not-a-jwt"}
    )
    assert status == 401 and body["code"] == "unauthorized"


async def test_a_client_token_is_no_api_key(dev: EdgeServer) -> None:
    with pytest.raises(Unauthorized, match="not a server API key"):
        await asyncio.to_thread(admin(dev, token("alice")).list_rooms)


async def test_an_api_key_is_no_client_token(dev: EdgeServer) -> None:
    ws = await websockets.connect(url_of(dev))
    await ws.send(json.dumps({"type": "hello", "token": api_key()}))
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_a_key_signed_with_another_secret_is_refused(dev: EdgeServer) -> None:
    forged = mint_api_key("another-secret-0123456789abcdef-0123", "x", ALL_SCOPES, now=time.time())
    with pytest.raises(Unauthorized, match="invalid token"):
        await asyncio.to_thread(admin(dev, forged).list_rooms)


async def test_each_endpoint_needs_its_scope(dev: EdgeServer) -> None:
    only_read = admin(dev, api_key("rooms:read"))
    await asyncio.to_thread(only_read.list_rooms)
    for attempt, scope in [
        (lambda: only_read.publish("r1", {"x": 1}), "publish"),
        (lambda: only_read.close_room("r1"), "rooms:close"),
        (lambda: only_read.kick("alice"), "kick"),
        (lambda: only_read.mint_token("alice"), "tokens:mint"),
        (lambda: only_read.presence("alice"), "presence:read"),
    ]:
        with pytest.raises(Forbidden, match=scope):
            await asyncio.to_thread(attempt)
    with pytest.raises(Forbidden, match="rooms:read"):
        await asyncio.to_thread(admin(dev, api_key("publish")).room, "r1")


# --------------------------------------------------------------------------- HTTP and input


async def test_openapi_document_is_served_without_a_key(dev: EdgeServer) -> None:
    status, body = await call(dev, "GET", "/v1/api/openapi.json")
    assert status == 200 and body["openapi"].startswith("3.0")
    assert "/v1/api/rooms/{room}/publish" in body["paths"]


async def test_bad_input_is_refused_with_the_protocol_codes(dev: EdgeServer) -> None:
    auth = {"Authorization": f"Bearer {api_key()}", "Content-Type": "application/json"}
    status, body = await call(
        dev, "POST", "/v1/api/rooms/r1/publish", body=b"{not json", headers=auth
    )
    assert status == 400 and body["code"] == "bad_request"
    status, body = await call(
        dev, "POST", "/v1/api/rooms/r1/publish", body=b'{"data": 5}', headers=auth
    )
    assert status == 400 and body["code"] == "bad_request"
    status, body = await call(dev, "GET", "/v1/api/rooms?limit=0", headers=auth)
    assert status == 400
    status, body = await call(dev, "GET", "/v1/api/rooms?cursor=" + "x" * 129, headers=auth)
    assert status == 400 and "cursor" in body["message"]
    status, body = await call(dev, "DELETE", "/v1/api/rooms", headers=auth)
    assert status == 405
    status, body = await call(dev, "GET", "/v1/api/nothing", headers=auth)
    assert status == 404 and body["code"] == "not_found"


async def test_a_body_past_the_bound_is_refused_413(dev_factory: DevFactory) -> None:
    server = await dev_factory(api_max_body=1000)
    auth = {"Authorization": f"Bearer {api_key()}", "Content-Type": "application/json"}
    big = json.dumps({"data": {"x": "y" * 2000}}).encode()
    status, body = await call(server, "POST", "/v1/api/rooms/r1/publish", body=big, headers=auth)
    assert status == 413 and body["code"] == "too_large"


async def test_websockets_and_pages_still_work_beside_the_api(dev: EdgeServer) -> None:
    status, _headers, body = await asyncio.to_thread(http, dev, "GET", "/healthz")
    assert status == 200 and body == b"ok\n"
    alice = await raw_client(url_of(dev), "alice")
    assert (await alice.request({"type": "ping", "id": 1}))["type"] == "pong"


async def test_keep_alive_serves_several_requests_on_one_connection(dev: EdgeServer) -> None:
    def two_requests() -> list[int]:
        connection = httpclient.HTTPConnection("127.0.0.1", dev.port, timeout=10)
        statuses = []
        for _ in range(2):
            connection.request("GET", "/v1/api/rooms", headers={"Authorization": f"Bearer {key}"})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        connection.close()
        return statuses

    key = api_key()
    assert await asyncio.to_thread(two_requests) == [200, 200]


# --------------------------------------------------------------------------- rooms


async def test_list_rooms_pages_through_every_room_in_name_order(dev: EdgeServer) -> None:
    names = [f"room-{n}" for n in (3, 1, 4, 0, 2)]
    clients = []
    for name in names:
        client = await raw_client(url_of(dev), f"u-{name}")
        assert (await client.request({"type": "join", "id": 1, "room": name}))["type"] == "joined"
        clients.append(client)
    api = admin(dev)
    first = await asyncio.to_thread(api.list_rooms, 2)
    assert [r["name"] for r in first["rooms"]] == ["room-0", "room-1"]
    assert first["rooms"][0]["members"] == 1 and first["next_cursor"]
    listed = await asyncio.to_thread(lambda: [r["name"] for r in api.iter_rooms(2)])
    assert listed == sorted(names)
    last = await asyncio.to_thread(api.list_rooms, 5)
    assert last["next_cursor"] is None


async def test_one_room_with_its_members(dev: EdgeServer) -> None:
    alice, bob = await joined_pair(dev)
    room = await asyncio.to_thread(admin(dev).room, "r1")
    assert room["name"] == "r1" and room["offset"] >= 1
    members = {m["session"]: m for m in room["members"]}
    assert members[alice.session]["user"] == "alice" and members[alice.session]["connected"]
    assert members[bob.session]["user"] == "bob"
    with pytest.raises(NotFound):
        await asyncio.to_thread(admin(dev).room, "nobody-here")


# --------------------------------------------------------------------------- publish


async def test_publish_to_the_room_reaches_every_member_from_the_server(dev: EdgeServer) -> None:
    alice, bob = await joined_pair(dev)
    published = await asyncio.to_thread(admin(dev).publish, "r1", {"text": "hello"})
    for client in (alice, bob):
        signal = await client.recv_type("signal")
        assert signal["data"] == {"text": "hello"} and signal["offset"] == published["offset"]
        assert signal["from"] == {
            "session": "~server",
            "user": "~server",
            "server": True,
            "key": "backend",
        }


async def test_publish_to_one_session_and_to_one_user(dev_factory: DevFactory) -> None:
    server = await dev_factory(room_capacity=3)
    alice, bob = await joined_pair(server)
    bob2 = await raw_client(url_of(server), "bob")
    assert (await bob2.request({"type": "join", "id": 3, "room": "r1"}))["type"] == "joined"
    await alice.recv_type("peer-joined")
    await bob.recv_type("peer-joined")
    api = admin(server)
    await asyncio.to_thread(lambda: api.publish("r1", {"n": 1}, to=alice.session))
    assert (await alice.recv_type("signal"))["data"] == {"n": 1}
    await asyncio.to_thread(lambda: api.publish("r1", {"n": 2}, to_user="bob"))
    assert (await bob.recv_type("signal"))["data"] == {"n": 2}
    assert (await bob2.recv_type("signal"))["data"] == {"n": 2}
    # Nothing reached alice for the user publish: her next frame is her own pong.
    assert await alice.request({"type": "ping", "id": 9}) == {"type": "pong", "id": 9}
    with pytest.raises(UnknownPeer):
        await asyncio.to_thread(lambda: api.publish("r1", {"n": 3}, to_user="carol"))
    with pytest.raises(NotFound):
        await asyncio.to_thread(lambda: api.publish("empty-room", {"n": 4}))


async def test_a_retried_publish_is_applied_once(dev: EdgeServer) -> None:
    alice, _bob = await joined_pair(dev)
    api = admin(dev)
    first = await asyncio.to_thread(
        lambda: api.publish("r1", {"n": 1}, to=alice.session, idempotency_key="k-1")
    )
    again = await asyncio.to_thread(
        lambda: api.publish("r1", {"n": 1}, to=alice.session, idempotency_key="k-1")
    )
    assert again == first
    await asyncio.to_thread(lambda: api.publish("r1", {"marker": 1}, to=alice.session))
    await alice.until_markers({"data": {"n": 1}}, {"data": {"marker": 1}})
    # The same key for another publish is refused, not applied.
    status, body = await call(
        dev,
        "POST",
        "/v1/api/rooms/r1/publish",
        body=json.dumps({"data": {"n": 2}, "idempotency_key": "k-1"}).encode(),
        headers={"Authorization": f"Bearer {api_key()}"},
    )
    assert status == 409 and body["code"] == "bad_request" and "already used" in body["message"]
    # Keys are per API key name: another key's "k-1" is another publish.
    other = admin(dev, api_key(name="other"))
    moved = await asyncio.to_thread(
        lambda: other.publish("r1", {"n": 1}, to=alice.session, idempotency_key="k-1")
    )
    assert moved["offset"] > first["offset"]


async def test_a_published_signal_is_replayed_on_resume(dev: EdgeServer) -> None:
    _alice, bob = await joined_pair(dev)
    joined_offset = (await asyncio.to_thread(admin(dev).room, "r1"))["offset"]
    resume = bob.welcome["resume"]
    assert bob.ws.transport is not None
    bob.ws.transport.abort()
    await asyncio.sleep(0.1)
    await asyncio.to_thread(admin(dev).publish, "r1", {"missed": True})
    room = await asyncio.to_thread(admin(dev).room, "r1")
    epoch = room["epoch"]
    ws = await websockets.connect(url_of(dev))
    raw = RawClient(ws)
    await raw.send(
        {
            "type": "hello",
            "token": token("bob"),
            "resume": resume,
            "rooms": {"r1": {"epoch": epoch, "offset": joined_offset}},
        }
    )
    assert (await raw.recv_type("welcome"))["resumed"] is True
    replayed = await raw.recv_type("signal")
    assert replayed["data"] == {"missed": True} and replayed["from"]["server"] is True


# --------------------------------------------------------------------------- kick, close


async def test_kick_closes_4410_and_refuses_the_resume(dev: EdgeServer) -> None:
    alice, bob = await joined_pair(dev)
    resume = bob.welcome["resume"]
    kicked = await asyncio.to_thread(lambda: admin(dev).kick("bob", bob.session, "bye"))
    assert kicked == [bob.session]
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await bob.ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4410
    left = await alice.recv_type("peer-left")
    assert left["peer"]["session"] == bob.session and left["reason"] == "disconnected"
    again = await raw_client(url_of(dev), "bob", resume=resume)
    assert again.welcome["resumed"] is False and again.session != bob.session
    with pytest.raises(NotFound):
        await asyncio.to_thread(lambda: admin(dev).kick("bob", bob.session))


async def test_kick_every_session_of_a_user(dev: EdgeServer) -> None:
    first = await raw_client(url_of(dev), "bob")
    second = await raw_client(url_of(dev), "bob")
    kicked = await asyncio.to_thread(admin(dev).kick, "bob")
    assert sorted(kicked) == sorted([first.session, second.session])
    for client in (first, second):
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await client.ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4410


async def test_close_room_sends_room_closed_and_every_member_leaves(dev: EdgeServer) -> None:
    alice, bob = await joined_pair(dev)
    closed = await asyncio.to_thread(lambda: admin(dev).close_room("r1", "meeting over"))
    for client in (alice, bob):
        event = await client.recv_type("room-closed")
        assert event == {
            "type": "room-closed",
            "room": "r1",
            "offset": closed["offset"],
            "reason": "meeting over",
        }
    frames = [await alice.recv(), await bob.recv()]
    for frame in frames:
        assert frame["type"] in ("left", "peer-left"), frame
    with pytest.raises(NotFound):
        for _ in range(50):
            await asyncio.to_thread(admin(dev).room, "r1")
            await asyncio.sleep(0.05)
    # Not a member any more: a signal there is refused.
    refused = await alice.request({"type": "signal", "id": 7, "room": "r1", "data": {}})
    while refused["type"] != "error":
        refused = await alice.recv()
    assert refused["code"] == "not_in_room"


# --------------------------------------------------------------------------- presence, tokens


async def test_presence_of_users(dev: EdgeServer) -> None:
    alice = await raw_client(url_of(dev), "alice")
    users = await asyncio.to_thread(admin(dev).presence, "alice", "nobody")
    by_user = {u["user"]: u for u in users}
    assert by_user["alice"]["status"] == "online"
    assert by_user["alice"]["sessions"] == [
        {"session": alice.session, "edge": "dev", "connected": True}
    ]
    assert by_user["nobody"]["status"] == "offline" and by_user["nobody"]["sessions"] == []


async def test_minted_tokens_open_sessions(dev: EdgeServer) -> None:
    minted = await asyncio.to_thread(lambda: admin(dev).mint_token("dora", rooms=["r9"]))
    ws = await websockets.connect(url_of(dev))
    client = RawClient(ws)
    await client.send({"type": "hello", "token": minted})
    assert (await client.recv_type("welcome"))["user"] == "dora"
    refused = await client.request({"type": "join", "id": 1, "room": "other"})
    assert refused["code"] == "forbidden"


# --------------------------------------------------------------------------- the CLI


async def cli(server: EdgeServer, *args: str, key: str | None = None) -> tuple[int, str]:
    """``signalpost api ...`` as a process against ``server``: (exit code, output)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "signalpost.cli",
        "api",
        "--url",
        f"http://127.0.0.1:{server.port}",
        "--key",
        key or api_key(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SIGNALPOST_JWT_SECRET": SECRET},
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_signalpost_api_commands_call_every_endpoint(dev: EdgeServer) -> None:
    alice, bob = await joined_pair(dev)
    code, output = await cli(dev, "rooms")
    assert code == 0 and [r["name"] for r in json.loads(output)["rooms"]] == ["r1"]
    code, output = await cli(dev, "room", "r1")
    assert code == 0 and len(json.loads(output)["members"]) == 2
    code, output = await cli(dev, "presence", "alice")
    assert code == 0 and json.loads(output)[0]["status"] == "online"
    code, output = await cli(dev, "publish", "r1", '{"via": "cli"}', "--to", alice.session)
    assert code == 0 and json.loads(output)["offset"] >= 1
    assert (await alice.recv_type("signal"))["data"] == {"via": "cli"}
    code, output = await cli(dev, "token", "dora", "--room", "r9")
    assert code == 0 and output.count(".") == 2
    code, output = await cli(dev, "kick", "bob", "--session", bob.session)
    assert code == 0 and json.loads(output) == [bob.session]
    code, output = await cli(dev, "close", "r1", "--reason", "done")
    assert code == 0
    assert (await alice.recv_type("peer-left"))["peer"]["session"] == bob.session
    assert (await alice.recv_type("room-closed"))["reason"] == "done"
    # A refused request: its code and message, exit 1.
    code, output = await cli(dev, "room", "r1", key=api_key("publish"))
    assert code == 1 and "forbidden" in output
    code, output = await cli(dev, "key", "--name", "ops", "--scope", "rooms:read")
    assert code == 0
    assert (await asyncio.to_thread(admin(dev, output.strip()).list_rooms))["rooms"] == []


# --------------------------------------------------------------------------- the SDK


async def test_the_python_sdk_sees_server_signals_room_closed_and_a_final_kick(
    dev: EdgeServer,
) -> None:
    url = url_of(dev)
    async with SignalpostClient(url, token("alice")) as alice:
        await alice.join("r1")
        await asyncio.to_thread(admin(dev).publish, "r1", {"hi": 1})
        signal = await alice.next_event(SignalEvent)
        assert signal.sender.server and signal.sender.key == "backend"
        await asyncio.to_thread(admin(dev).close_room, "r1", "over")
        closed = await alice.next_event(RoomClosed)
        assert closed.reason == "over"
        for _ in range(50):  # the server's `left` follows
            if "r1" not in alice.positions:
                break
            await asyncio.sleep(0.02)
        assert "r1" not in alice.positions
        await asyncio.to_thread(admin(dev).kick, "alice")
        disconnected = await alice.next_event(Disconnected)
        assert disconnected.code == 4410 and disconnected.final


async def test_an_idle_or_trickling_api_connection_is_closed(
    dev: EdgeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge.server_api

    monkeypatch.setattr(edge.server_api, "IDLE_TIMEOUT", 0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", dev.port)
    writer.write(b"POST /v1/api/rooms/r1/publish HTTP/1.1\r\nHost: x\r\n")  # never finished
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the edge
    assert time.monotonic() - started < 3
    writer.close()


async def test_a_chunked_body_past_the_bound_is_refused(dev_factory: DevFactory) -> None:
    server = await dev_factory(api_max_body=1000)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /v1/api/rooms/r1/publish HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n"
    )
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"too_large"' in answer
    writer.close()


async def test_a_draining_edge_answers_the_api_503(dev: EdgeServer) -> None:
    dev._draining = True  # what drain() sets first (SIGTERM)
    status, body = await call(
        dev, "GET", "/v1/api/rooms", headers={"Authorization": f"Bearer {api_key()}"}
    )
    assert status == 503 and body["code"] == "unavailable"
    dev._draining = False


async def test_a_member_away_when_the_room_closed_leaves_when_it_resumes(
    dev: EdgeServer,
) -> None:
    alice, bob = await joined_pair(dev)
    joined_offset = (await asyncio.to_thread(admin(dev).room, "r1"))["offset"]
    epoch = (await asyncio.to_thread(admin(dev).room, "r1"))["epoch"]
    assert bob.ws.transport is not None
    bob.ws.transport.abort()
    await asyncio.sleep(0.1)
    await asyncio.to_thread(admin(dev).close_room, "r1", "gone")
    assert (await alice.recv_type("room-closed"))["reason"] == "gone"
    await alice.recv_type("left")
    room = await asyncio.to_thread(admin(dev).room, "r1")
    assert [m["connected"] for m in room["members"]] == [False]  # bob, away
    ws = await websockets.connect(url_of(dev))
    raw = RawClient(ws)
    await raw.send(
        {
            "type": "hello",
            "token": token("bob"),
            "resume": bob.welcome["resume"],
            "rooms": {"r1": {"epoch": epoch, "offset": joined_offset}},
        }
    )
    assert (await raw.recv_type("welcome"))["resumed"] is True
    assert (await raw.recv_type("room-closed"))["reason"] == "gone"
    frames = [await raw.recv(), await raw.recv()]
    assert {f["type"] for f in frames} == {"recovered", "left"}, frames
    with pytest.raises(NotFound):
        await asyncio.to_thread(admin(dev).room, "r1")


async def test_expect_100_continue_is_answered_at_once(dev: EdgeServer) -> None:
    _alice, _bob = await joined_pair(dev)
    body = json.dumps({"data": {"pad": "x" * 2000}}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", dev.port)
    writer.write(
        b"POST /v1/api/rooms/r1/publish HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        + f"Authorization: Bearer {api_key()}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    )
    assert await asyncio.wait_for(reader.readline(), 0.5) == b"HTTP/1.1 100 \r\n"
    await reader.readline()
    writer.write(body)
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200 ")
    writer.close()
