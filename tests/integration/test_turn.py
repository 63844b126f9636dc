"""TURN REST credentials against a real coturn (``use-auth-secret``, two secrets at once).

A TURN Allocate is what a browser does with the ``ice_servers`` signalpost hands out: a
valid credential gets a relayed address in coturn's relay range; an expired, wrongly signed
or tampered one gets 401 and no relay.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from signalpost.auth import turn_credentials
from tests.binaries import require_module
from tests.conftest import TURN_SECRET_NEW, TURN_SECRET_OLD
from tests.coturn import Coturn
from tests.helpers import raw_client, url_of
from tests.integration.conftest import DevFactory

# aioice comes with aiortc.
aioice_turn = require_module("aioice.turn", "pip install -e '.[webrtc]'")
aioice_stun = require_module("aioice.stun", "pip install -e '.[webrtc]'")

pytestmark = pytest.mark.coturn


class _Sink(asyncio.DatagramProtocol):
    """The application side of a TURN endpoint; these tests only allocate."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


async def allocate(server: Coturn, username: str, password: str) -> tuple[str, int]:
    """Allocate a relay on ``server``; returns the relayed address or raises.

    The allocation is deleted before this returns, so the next one never meets it on a
    reused client port (coturn answers that with 437).
    """
    transport, sink = await aioice_turn.create_turn_endpoint(
        _Sink, (server.host, server.port), username, password, lifetime=60
    )
    try:
        relayed: tuple[str, int] = transport.get_extra_info("sockname")
        return relayed
    finally:
        transport.close()
        async with asyncio.timeout(10):
            await sink.closed.wait()


async def refused(server: Coturn, username: str, password: str) -> int:
    """The STUN error code coturn answers an Allocate with (fails if it allocates)."""
    with pytest.raises(aioice_stun.TransactionFailed) as failure:
        async with asyncio.timeout(10):
            await allocate(server, username, password)
    code: int = failure.value.response.attributes["ERROR-CODE"][0]
    return code


@pytest.mark.parametrize("secret", [TURN_SECRET_NEW, TURN_SECRET_OLD], ids=["new", "old"])
async def test_valid_credentials_allocate_a_relay(turnserver: Coturn, secret: str) -> None:
    # Both secrets work while a rotation is under way.
    username, password = turn_credentials(secret, "alice", ttl=300, now=time.time())
    host, port = await allocate(turnserver, username, password)
    assert host == turnserver.host
    assert turnserver.min_port <= port <= turnserver.max_port


async def test_expired_credentials_are_refused(turnserver: Coturn) -> None:
    username, password = turn_credentials(TURN_SECRET_NEW, "alice", ttl=300, now=time.time() - 600)
    assert await refused(turnserver, username, password) == 401


async def test_credentials_signed_with_an_unknown_secret_are_refused(turnserver: Coturn) -> None:
    username, password = turn_credentials("not-a-secret-coturn-has", "alice", 300, time.time())
    assert await refused(turnserver, username, password) == 401


async def test_a_username_edited_after_signing_is_refused(turnserver: Coturn) -> None:
    # Extending the expiry (or changing the user) breaks the HMAC.
    username, password = turn_credentials(TURN_SECRET_NEW, "alice", ttl=60, now=time.time())
    expiry, user = username.split(":", 1)
    assert await refused(turnserver, f"{int(expiry) + 86400}:{user}", password) == 401


async def test_ice_servers_from_signalpost_allocate_on_coturn(
    dev_factory: DevFactory, turnserver: Coturn
) -> None:
    server = await dev_factory(
        turn_secret=TURN_SECRET_NEW,
        turn_urls=[turnserver.url],
        stun_urls=[turnserver.stun_url],
        turn_ttl=120,
    )
    client = await raw_client(url_of(server), "alice")
    welcome_servers: list[dict[str, Any]] = client.welcome["ice_servers"]
    reply = await client.request({"type": "ice-servers", "id": 1})
    assert reply["type"] == "ice-servers" and reply["id"] == 1
    for servers in (welcome_servers, reply["ice_servers"]):
        assert servers[0] == {"urls": [turnserver.stun_url]}
        (relay,) = [s for s in servers if "username" in s]
        assert relay["urls"] == [turnserver.url]
        expiry, user = relay["username"].split(":", 1)
        assert user == "alice" and 0 < int(expiry) - time.time() <= 120 + 5
        host, port = await allocate(turnserver, relay["username"], relay["credential"])
        assert host == turnserver.host and turnserver.min_port <= port <= turnserver.max_port
