"""A real WebRTC call through a real cluster and a real coturn, relay only.

Two aiortc peers (examples/aiortc_call.py) signal through two different edges of a
``signalpost cluster`` whose TURN settings point at a coturn ``turnserver`` started with
``use-auth-secret``. With the relay ICE transport policy the only possible path is through
coturn, so a data-channel round trip proves that the TURN REST credentials the edges mint
are accepted by coturn; the nominated candidate pair shows the path is relayed. With a
TURN secret coturn does not know, no relay can be allocated and the call fails quickly.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from signalpost.auth import turn_credentials
from tests.binaries import require_module
from tests.cluster.conftest import ClusterFactory
from tests.coturn import Coturn
from tests.helpers import load_aiortc_example, token

require_module("aiortc", "pip install -e '.[webrtc]'")

pytestmark = [pytest.mark.cluster, pytest.mark.coturn]

MESSAGES = 5

aiortc_call = load_aiortc_example()


def _log_mentions(path: Path, text: str, timeout: float = 5.0) -> bool:
    """Wait until ``text`` shows up in the log at ``path`` (blocking; run in a thread)."""
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _relay_cluster(cluster_factory: ClusterFactory, server: Coturn, secret: str) -> list[str]:
    cluster = cluster_factory(
        edges=2,
        brokers=1,
        SIGNALPOST_TURN_SECRET=secret,
        SIGNALPOST_TURN_URLS=server.url,
        SIGNALPOST_STUN_URLS=server.stun_url,
        SIGNALPOST_TURN_TTL="600",
    )
    urls: list[str] = cluster.edge_urls
    assert len(urls) == 2
    return urls


# --------------------------------------------------------------------------- tests


async def test_relay_only_call_through_coturn(
    cluster_factory: ClusterFactory, turnserver: Coturn
) -> None:
    # The newest secret: coturn accepts all of its static-auth-secrets (rotation).
    secret = list(turnserver.secrets)[-1]
    edge1, edge2 = _relay_cluster(cluster_factory, turnserver, secret)
    started = time.monotonic()
    async with asyncio.timeout(45):
        result = await aiortc_call.run_call(
            edge1,
            edge2,
            "aiortc-relay",
            token("alice"),
            token("bob"),
            relay_only=True,
            messages=MESSAGES,
            timeout=30,
        )
    elapsed = time.monotonic() - started

    # The edges handed out coturn with TURN REST credentials for each user.
    for peer, user in (("a", "alice"), ("b", "bob")):
        (turn,) = [s for s in result.ice_servers[peer] if "username" in s]
        assert turn["urls"] == [turnserver.url]
        expiry, name = turn["username"].split(":", 1)
        assert name == user and 0 < int(expiry) - time.time() <= 600 + 5
        assert turn["credential"] == turn_credentials(secret, user, 0, int(expiry))[1]

    # Only relayed candidates were offered, and the nominated pair is relay <-> relay,
    # both ends on coturn's relay address.
    assert result.candidates == {"a": ["relay"], "b": ["relay"]}
    for pair in result.pairs.values():
        assert (pair.local_type, pair.remote_type) == ("relay", "relay"), pair
        for host, _port in (pair.local_address, pair.remote_address):
            assert host == turnserver.host, pair
    a_pair, b_pair = result.pairs["a"], result.pairs["b"]
    assert a_pair.local_address == b_pair.remote_address
    assert b_pair.local_address == a_pair.remote_address

    # Data went both ways, in order, over the relayed path.
    assert result.pings_received == [f"ping {i}" for i in range(1, MESSAGES + 1)]
    assert result.pongs_received == [f"pong {i}" for i in range(1, MESSAGES + 1)]
    print(
        f"relay call: connected in {result.connect_seconds:.2f} s, "
        f"whole call {result.total_seconds:.2f} s, test {elapsed:.2f} s"
    )


async def test_wrong_turn_secret_relay_only_call_fails(
    cluster_factory: ClusterFactory, turnserver: Coturn
) -> None:
    wrong = "not-" + list(turnserver.secrets)[-1]
    assert wrong not in list(turnserver.secrets)
    edge1, edge2 = _relay_cluster(cluster_factory, turnserver, wrong)
    started = time.monotonic()
    with pytest.raises(aiortc_call.CallFailed) as failure:
        async with asyncio.timeout(20):
            await aiortc_call.run_call(
                edge1,
                edge2,
                "aiortc-refused",
                token("alice"),
                token("bob"),
                relay_only=True,
                messages=1,
                timeout=20,
            )
    elapsed = time.monotonic() - started
    # coturn refused the allocation (401 with those credentials): no relayed candidate,
    # so with the relay policy there is nothing ICE could even try.
    assert failure.value.candidates.get("a") == [], failure.value.candidates
    assert "no relay candidate" in str(failure.value)
    assert elapsed < 20
    # coturn's own log shows the refused authentication.
    assert await asyncio.to_thread(_log_mentions, turnserver.log_path, "check_stun_auth")
    print(f"refused call failed in {elapsed:.2f} s: {failure.value}")
