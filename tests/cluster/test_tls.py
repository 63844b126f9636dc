"""``signalpost cluster`` with TLS: every edge serves wss, Consul's check of an edge passes
over https, a signal crosses two edges, and SIGHUP to the launcher reloads every edge."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from signalpost.client import SignalEvent, SignalpostClient
from tests.cluster.conftest import ClusterFactory
from tests.consul import ConsulAgent
from tests.helpers import token
from tests.tls_certs import make_cert, peer_fingerprint

pytestmark = [pytest.mark.cluster, pytest.mark.consul]


@pytest.fixture
def consul_agent(tmp_path: Path) -> Iterator[ConsulAgent]:
    agent = ConsulAgent(tmp_path / "consul")
    agent.workdir.mkdir()
    agent.start()
    yield agent
    agent.stop()


async def _until_served(port: int, fingerprint: str, timeout: float = 10.0) -> None:
    """Until a new connection to ``port`` is shown the certificate ``fingerprint``."""
    seen = ""
    for _ in range(int(timeout / 0.05)):
        seen = await asyncio.to_thread(peer_fingerprint, "127.0.0.1", port)
        if seen == fingerprint:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"port {port} still shows {seen} after {timeout} s")


async def test_a_tls_cluster_registers_relays_and_reloads_on_sighup(
    cluster_factory: ClusterFactory, consul_agent: ConsulAgent, tmp_path: Path
) -> None:
    first, second = make_cert(tmp_path, "first"), make_cert(tmp_path, "second")
    cert, key = tmp_path / "edge.crt", tmp_path / "edge.key"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    cluster = cluster_factory(
        edges=2,
        SIGNALPOST_CONSUL_ADDR=consul_agent.address,
        SIGNALPOST_TLS_CERT_FILE=str(cert),
        SIGNALPOST_TLS_KEY_FILE=str(key),
    )
    edge1, edge2 = cluster.edge_urls
    assert edge1.startswith("wss://127.0.0.1:") and edge2.startswith("wss://127.0.0.1:")
    # Consul checks https://.../healthz without verifying the certificate: both pass.
    consul_agent.wait_for(lambda: set(consul_agent.passing("edge").values()) == {edge1, edge2})
    ports = [int(url.rsplit(":", 1)[1].split("/")[0]) for url in (edge1, edge2)]
    for port in ports:
        assert await asyncio.to_thread(peer_fingerprint, "127.0.0.1", port) == first.fingerprint

    name1, name2 = (url.replace("127.0.0.1", "localhost") for url in (edge1, edge2))
    async with (
        SignalpostClient(name1, token("alice"), ssl=first.client_context()) as alice,
        SignalpostClient(name2, token("bob"), ssl=first.client_context()) as bob,
    ):
        await alice.join("r1")
        await bob.join("r1")
        await alice.signal("r1", {"n": 1}, to=bob.session)
        assert (await bob.next_event(SignalEvent, timeout=10)).data == {"n": 1}

        cert.write_bytes(second.cert.read_bytes())
        key.write_bytes(second.key.read_bytes())
        cluster.launcher.send_signal(signal.SIGHUP)
        for port in ports:
            await _until_served(port, second.fingerprint)
        # The connections made before the reload carry on, both ways.
        await bob.signal("r1", {"n": 2}, to=alice.session)
        assert (await alice.next_event(SignalEvent, timeout=10)).data == {"n": 2}
        await alice.signal("r1", {"n": 3}, to=bob.session)
        assert (await bob.next_event(SignalEvent, timeout=10)).data == {"n": 3}
    assert cluster.launcher.poll() is None
    assert all(cluster.alive(p["id"]) for p in cluster.processes)
