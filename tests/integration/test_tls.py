"""TLS on the edge over real sockets: wss with the SDK and plain websockets, https for the
HTTP endpoints, nothing in plaintext, and a reload that leaves open connections alone."""

from __future__ import annotations

import asyncio
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websockets
from websockets.exceptions import InvalidMessage

from edge.server import EdgeServer
from signalpost.client import SignalEvent, SignalpostClient
from tests.helpers import RawClient, token
from tests.integration.conftest import DevFactory
from tests.tls_certs import CertFiles, make_cert, peer_fingerprint


@pytest.fixture
def certs(tmp_path: Path) -> tuple[CertFiles, CertFiles]:
    return make_cert(tmp_path, "first"), make_cert(tmp_path, "second")


async def tls_edge(dev_factory: DevFactory, files: CertFiles, **overrides: object) -> EdgeServer:
    return await dev_factory(
        tls_cert_file=str(files.cert), tls_key_file=str(files.key), **overrides
    )


def wss(server: EdgeServer, host: str = "127.0.0.1") -> str:
    return f"wss://{host}:{server.port}/v1/signal"


async def wss_client(server: EdgeServer, user: str, context: ssl.SSLContext) -> RawClient:
    ws = await websockets.connect(wss(server), ssl=context)
    client = RawClient(ws)
    await client.send({"type": "hello", "token": token(user)})
    client.welcome = await client.recv_type("welcome")
    client.session = client.welcome["session"]
    return client


def _get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_a_signal_goes_through_wss_between_the_sdk_and_plain_websockets(
    dev_factory: DevFactory, certs: tuple[CertFiles, CertFiles]
) -> None:
    first, _ = certs
    server = await tls_edge(dev_factory, first)
    # The SDK by name (hostname checked against the certificate), websockets by address.
    sdk_url = wss(server, "localhost")
    async with SignalpostClient(sdk_url, token("alice"), ssl=first.client_context()) as alice:
        assert alice._ws is not None
        peer = alice._ws.transport.get_extra_info("ssl_object")
        assert peer is not None and peer.version() in ("TLSv1.2", "TLSv1.3")
        bob = await wss_client(server, "bob", first.client_context())
        await alice.join("r1")
        joined = await bob.request({"type": "join", "id": 1, "room": "r1"})
        assert joined["type"] == "joined"
        await alice.signal("r1", {"kind": "offer", "sdp": "v=0"}, to=bob.session)
        delivered = await bob.recv_type("signal")
        assert delivered["data"] == {"kind": "offer", "sdp": "v=0"}
        assert delivered["from"] == {"session": alice.session, "user": "alice"}
        await bob.send({"type": "signal", "id": 2, "room": "r1", "data": {"kind": "answer"}})
        assert (await alice.next_event(SignalEvent)).data == {"kind": "answer"}


async def test_the_sdk_refuses_an_edge_whose_certificate_it_does_not_trust(
    dev_factory: DevFactory, certs: tuple[CertFiles, CertFiles]
) -> None:
    first, second = certs
    server = await tls_edge(dev_factory, first)
    client = SignalpostClient(wss(server), token("alice"), ssl=second.client_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        await client.connect()


async def test_nothing_is_served_in_plaintext_on_a_tls_port(
    dev_factory: DevFactory, certs: tuple[CertFiles, CertFiles]
) -> None:
    first, _ = certs
    server = await tls_edge(dev_factory, first)
    with pytest.raises((InvalidMessage, ConnectionError, EOFError)):
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/v1/signal", open_timeout=5):
            pass
    with pytest.raises((OSError, urllib.error.URLError)):  # no HTTP answer at all
        await asyncio.to_thread(_get, f"http://127.0.0.1:{server.port}/healthz")
    # The same endpoints over https: health, metrics, the demo page.
    context = first.client_context()
    base = f"https://localhost:{server.port}"
    assert await asyncio.to_thread(_get, f"{base}/healthz", context) == (200, b"ok\n")
    status, body = await asyncio.to_thread(_get, f"{base}/metrics", context)
    assert status == 200 and b"signalpost_" in body
    status, body = await asyncio.to_thread(_get, f"{base}/", context)
    assert status == 200 and b"<html" in body.lower()


async def test_a_plain_edge_still_serves_ws_and_http(
    dev: EdgeServer, certs: tuple[CertFiles, CertFiles]
) -> None:
    # Behind a TLS load balancer: no certificate configured, nothing changes.
    assert dev.tls is None
    assert await asyncio.to_thread(_get, f"http://127.0.0.1:{dev.port}/healthz") == (200, b"ok\n")
    async with websockets.connect(f"ws://127.0.0.1:{dev.port}/v1/signal") as ws:
        await ws.send(f'{{"type":"hello","token":"{token("alice")}"}}')
        assert '"welcome"' in str(await ws.recv())
    # An SDK given a TLS context still reaches a ws:// URL (a list may mix both).
    url = f"ws://127.0.0.1:{dev.port}/v1/signal"
    async with SignalpostClient(url, token("bob"), ssl=certs[0].client_context()) as bob:
        assert bob.session


async def test_a_connection_that_never_completes_the_tls_handshake_is_dropped(
    dev_factory: DevFactory, certs: tuple[CertFiles, CertFiles]
) -> None:
    server = await tls_edge(dev_factory, certs[0], hello_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"\x16\x03\x01")  # the start of a ClientHello, and nothing more
    await writer.drain()
    try:
        async with asyncio.timeout(3):
            assert await reader.read() == b""  # the server closed it
    finally:
        writer.close()


async def test_a_reload_changes_new_handshakes_and_open_connections_go_on(
    dev_factory: DevFactory, tmp_path: Path, certs: tuple[CertFiles, CertFiles]
) -> None:
    first, second = certs
    cert, key = tmp_path / "edge.crt", tmp_path / "edge.key"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    server = await dev_factory(tls_cert_file=str(cert), tls_key_file=str(key))
    assert server.tls is not None
    port = server.port
    assert await asyncio.to_thread(peer_fingerprint, "127.0.0.1", port) == first.fingerprint
    before = await wss_client(server, "alice", first.client_context())
    assert (await before.request({"type": "join", "id": 1, "room": "r1"}))["type"] == "joined"

    cert.write_bytes(second.cert.read_bytes())
    key.write_bytes(second.key.read_bytes())
    assert server.tls.reload()
    assert await asyncio.to_thread(peer_fingerprint, "127.0.0.1", port) == second.fingerprint
    after = await wss_client(server, "bob", second.client_context())
    assert (await after.request({"type": "join", "id": 1, "room": "r1"}))["type"] == "joined"
    await before.recv_type("peer-joined")
    # The connection made with the first certificate still carries signals both ways.
    await before.send({"type": "signal", "id": 2, "room": "r1", "data": {"n": 1}})
    assert (await after.recv_type("signal"))["data"] == {"n": 1}
    await after.send({"type": "signal", "id": 3, "room": "r1", "data": {"n": 2}})
    await before.recv_type("ack")
    assert (await before.recv_type("signal"))["data"] == {"n": 2}


async def test_the_server_api_is_served_over_https(
    dev_factory: DevFactory, certs: tuple[CertFiles, CertFiles]
) -> None:
    import time

    from signalpost.admin import AdminClient
    from signalpost.api_keys import ALL_SCOPES, mint_api_key
    from tests.helpers import SECRET

    first, _ = certs
    server = await tls_edge(dev_factory, first)
    alice = await wss_client(server, "alice", first.client_context())
    assert (await alice.request({"type": "join", "id": 1, "room": "r1"}))["type"] == "joined"
    key = mint_api_key(SECRET, "backend", ALL_SCOPES, now=time.time())
    api = AdminClient(
        f"https://localhost:{server.port}", key, ssl_context=first.client_context(), retries=0
    )
    await asyncio.to_thread(api.publish, "r1", {"over": "tls"})
    assert (await alice.recv_type("signal"))["data"] == {"over": "tls"}
    assert [r["name"] for r in (await asyncio.to_thread(api.list_rooms))["rooms"]] == ["r1"]
