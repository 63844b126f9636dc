"""A JWK Set that rotates, served by a real HTTP server on 127.0.0.1, and a dev edge on it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import websockets
from prometheus_client import REGISTRY

from signalpost.auth import TokenVerifier
from signalpost.config import load_settings
from signalpost.errors import Unauthorized
from signalpost.jwks import JwksKeys
from tests.helpers import SECRET, raw_client, url_of
from tests.integration.conftest import DevFactory
from tests.unit.test_jwks import Signer, document


class JwksServer:
    """Serves ``body`` at ``/jwks.json`` with ``status``; counts the requests."""

    def __init__(self) -> None:
        self.body = document()
        self.status = 200
        self.delay = 0.0
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                time.sleep(server.delay)
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"

    def publish(self, *signers: Signer) -> None:
        self.body = document(*(s.jwk for s in signers))


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def verifier_for(source: str, clock: Clock, **overrides: Any) -> TokenVerifier:
    settings = load_settings(environ={}, jwt_secret=SECRET, jwks_source=source, **overrides)
    verifier = TokenVerifier(settings)
    verifier.jwks = JwksKeys(settings, clock=clock)
    return verifier


def fetches(result: str) -> float:
    return REGISTRY.get_sample_value("signalpost_jwks_fetches_total", {"result": result}) or 0.0


async def test_rotation_new_key_after_refresh_old_key_in_grace_then_refused(
    jwks_server: JwksServer,
) -> None:
    old, new = Signer("2026-old"), Signer("2026-new")
    jwks_server.publish(old)
    clock = Clock()
    verifier = verifier_for(jwks_server.url, clock, jwks_min_refresh=10, jwks_grace=60)
    await verifier.start()
    try:
        assert jwks_server.requests == 1
        now = time.time()
        assert (await verifier.authenticate(old.token(now=now), now)).user == "alice"

        # The provider rotates: only the new key is published. A token signed with it names
        # a kid the edge has not seen: one fetch, then it is accepted.
        jwks_server.publish(new)
        clock.now += 10
        assert (await verifier.authenticate(new.token("bob", now=now), now)).user == "bob"
        assert jwks_server.requests == 2
        # The old key left the set at that fetch: still accepted for the grace period...
        clock.now += 59
        assert (await verifier.authenticate(old.token(now=now), now)).user == "alice"
        # ... and refused after it, with the same error as any bad token.
        clock.now += 1
        with pytest.raises(Unauthorized, match="not in the JWK Set"):
            await verifier.authenticate(old.token(now=now), now)
    finally:
        await verifier.close()


async def test_unknown_kids_fetch_at_most_once_per_min_refresh(jwks_server: JwksServer) -> None:
    signer = Signer("k1")
    jwks_server.publish(signer)
    clock = Clock()
    verifier = verifier_for(jwks_server.url, clock, jwks_min_refresh=10)
    await verifier.start()
    try:
        now = time.time()
        clock.now += 10
        # 50 random kids at once: one fetch, all of them refused.
        strangers = [Signer(f"random-{n}").token(now=now) for n in range(50)]
        outcomes = await asyncio.gather(
            *(verifier.authenticate(t, now) for t in strangers), return_exceptions=True
        )
        assert all(isinstance(o, Unauthorized) for o in outcomes)
        assert jwks_server.requests == 2
        # Within min_refresh: refused at once, without a fetch.
        clock.now += 9.9
        for token in strangers:
            with pytest.raises(Unauthorized, match="not in the JWK Set"):
                await verifier.authenticate(token, now)
        assert jwks_server.requests == 2
        # Once the interval is over, one more fetch (and only one).
        clock.now += 0.1
        for token in strangers[:5]:
            with pytest.raises(Unauthorized, match="not in the JWK Set"):
                await verifier.authenticate(token, now)
        assert jwks_server.requests == 3
        # A known kid is never held up by the limit.
        assert (await verifier.authenticate(signer.token(now=now), now)).user == "alice"
    finally:
        await verifier.close()


async def test_a_failing_fetch_keeps_the_last_good_set(
    jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    signer = Signer("k1")
    jwks_server.publish(signer)
    clock = Clock()
    verifier = verifier_for(jwks_server.url, clock, jwks_min_refresh=1)
    await verifier.start()
    assert verifier.jwks is not None
    failed_before = fetches("failed")
    try:
        now = time.time()
        for status, body in [(500, b"oops"), (200, b"<html>not json</html>"), (200, b"{}")]:
            jwks_server.status, jwks_server.body = status, body
            clock.now += 1
            await verifier.jwks.refresh()
            assert (await verifier.authenticate(signer.token(now=now), now)).user == "alice"
        jwks_server.httpd.shutdown()  # unreachable (the socket still accepts: no answer)
        jwks_server.httpd.server_close()  # refused
        clock.now += 1
        await verifier.jwks.refresh()
        assert (await verifier.authenticate(signer.token(now=now), now)).user == "alice"
        assert fetches("failed") - failed_before == 4
        assert verifier.jwks.keys.failures == 4
        assert "keeping the 1 keys held (k1)" in caplog.text
    finally:
        await verifier.close()


async def test_a_slow_jwks_server_does_not_block_the_event_loop(jwks_server: JwksServer) -> None:
    signer = Signer("k1")
    jwks_server.publish(signer)
    jwks_server.delay = 1.0
    verifier = verifier_for(jwks_server.url, Clock())
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await verifier.start()
    finally:
        task.cancel()
        await verifier.close()
    assert ticks > 10  # the loop ran while the fetch waited a second (blocked: 0)


def write_jwks(path: Path, *signers: Signer) -> None:
    path.write_bytes(document(*(s.jwk for s in signers)))


async def test_a_dev_edge_accepts_a_token_by_kid_from_a_jwks_file(
    dev_factory: DevFactory, tmp_path: Path
) -> None:
    first, second = Signer("first"), Signer("second")
    path = tmp_path / "jwks.json"
    write_jwks(path, first)
    dev = await dev_factory(jwks_source=str(path), jwks_min_refresh=0.05)
    client = await raw_client(url_of(dev), "", token=first.token("alice", now=time.time()))
    assert client.welcome["user"] == "alice"

    # A kid the file does not hold: the same unauthorized error and 4401 as any bad token.
    async with websockets.connect(url_of(dev)) as ws:
        await ws.send(json.dumps({"type": "hello", "token": second.token(now=time.time())}))
        error = json.loads(await ws.recv())
        assert (error["type"], error["code"]) == ("error", "unauthorized")
        assert "not in the JWK Set" in error["message"]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401

    # The file is rotated: the new key's token gets in (the file is read again).
    write_jwks(path, second)
    await asyncio.sleep(0.1)
    client = await raw_client(url_of(dev), "", token=second.token("bob", now=time.time()))
    assert client.welcome["user"] == "bob"
    # HS256 tokens without a kid still work beside the JWK Set.
    client = await raw_client(url_of(dev), "carol")
    assert client.welcome["user"] == "carol"
