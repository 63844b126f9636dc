"""Consul with ACLs on (default deny): nodes with a token of the documented policy work,
nodes without one stop at start-up saying which setting is missing.

The agent is a real ``consul agent -dev`` (1.8) with an ``acl`` block; the policy is the one
docs/security.md ("Consul ACLs") gives, read from there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from signalpost.client import SignalEvent, SignalpostClient
from signalpost.cluster import free_port
from tests.cluster.conftest import FAST_ENV, ClusterFactory
from tests.consul import ConsulAgent
from tests.helpers import token

pytestmark = [pytest.mark.cluster, pytest.mark.consul]

MASTER = "8b4c3c9e-7c1e-4d2a-9f4e-0a1b2c3d4e5f"
SECURITY_MD = Path(__file__).parents[2] / "docs" / "security.md"


def documented_policy() -> str:
    text = SECURITY_MD.read_text()
    match = re.search(
        r"<!-- consul-policy:start -->\s*```hcl\n(.*?)```\s*<!-- consul-policy:end -->",
        text,
        re.DOTALL,
    )
    assert match, "docs/security.md has no consul-policy block"
    return match.group(1)


@pytest.fixture
def acl_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ConsulAgent]:
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    monkeypatch.delenv("SIGNALPOST_CONSUL_TOKEN", raising=False)
    agent = ConsulAgent(tmp_path / "consul", master_token=MASTER)
    agent.workdir.mkdir()
    agent.start()
    yield agent
    agent.stop()


def node_token(agent: ConsulAgent) -> str:
    """A token holding exactly the documented policy."""
    agent.call("PUT", "/v1/acl/policy", {"Name": "signalpost", "Rules": documented_policy()})
    created = agent.call("PUT", "/v1/acl/token", {"Policies": [{"Name": "signalpost"}]})
    secret: str = created["SecretID"]
    return secret


async def test_nodes_with_a_token_register_keep_their_views_and_route(
    cluster_factory: ClusterFactory, acl_agent: ConsulAgent
) -> None:
    secret = node_token(acl_agent)
    # Default deny really denies: the anonymous token may not even list the services.
    assert acl_agent.call("GET", "/v1/agent/services", token="anonymous") == {}
    cluster = cluster_factory(
        edges=2,
        brokers=2,
        SIGNALPOST_CONSUL_ADDR=acl_agent.address,
        SIGNALPOST_CONSUL_TOKEN=secret,
    )
    acl_agent.wait_for(
        lambda: (
            len(acl_agent.passing("edge")) == 2
            and len(acl_agent.passing("broker")) == 2
            and len(acl_agent.passing("presence")) == 1
        ),
        timeout=30,
    )
    brokers = {b["url"] for b in cluster.of_kind("broker")}

    def view_of(tier: str) -> set[str]:
        import base64
        import json

        (entry,) = acl_agent.get(f"/v1/kv/signalpost/{tier}/view")
        return set(json.loads(base64.b64decode(entry["Value"]))["brokers"])

    acl_agent.wait_for(lambda: view_of("brokers") == brokers, timeout=30)
    acl_agent.wait_for(
        lambda: view_of("presence") == {p["url"] for p in cluster.of_kind("presence")},
        timeout=30,
    )
    edge1, edge2 = cluster.edge_urls
    async with (
        SignalpostClient(edge1, token("alice")) as alice,
        SignalpostClient(edge2, token("bob")) as bob,
    ):
        rooms = [f"room-{n}" for n in range(6)]  # over both brokers
        for room in rooms:
            await alice.join(room)
            await bob.join(room)
        for room in rooms:
            await alice.signal(room, {"room": room}, to=bob.session)
        got = sorted([(await bob.next_event(SignalEvent, timeout=10)).room for _ in rooms])
        assert got == sorted(rooms)


def run_broker(agent: ConsulAgent, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "signalpost.cli", "broker", "--insecure-node-links"],
        env={
            **os.environ,
            **FAST_ENV,
            "SIGNALPOST_CONSUL_ADDR": agent.address,
            "SIGNALPOST_BROKER_BIND": f"tcp://127.0.0.1:{free_port()}",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("consul_token", [None, "0e5b7d51-0000-4000-8000-000000000000"])
def test_a_node_without_a_good_token_stops_with_a_clear_error(
    acl_agent: ConsulAgent, consul_token: str | None
) -> None:
    env = {} if consul_token is None else {"SIGNALPOST_CONSUL_TOKEN": consul_token}
    broker = run_broker(acl_agent, **env)
    try:
        _out, err = broker.communicate(timeout=30)
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.communicate()
    assert broker.returncode == 2, err
    assert "refused to register" in err and "permission denied" in err, err
    assert "SIGNALPOST_CONSUL_TOKEN" in err, err
    assert acl_agent.registered("broker") == set()


def test_consul_http_token_is_honoured(acl_agent: ConsulAgent) -> None:
    secret = node_token(acl_agent)
    broker = run_broker(acl_agent, CONSUL_HTTP_TOKEN=secret)
    try:
        acl_agent.wait_for(lambda: len(acl_agent.passing("broker")) == 1, timeout=30)
        # (A 404 until it exists: wait_for retries.)
        acl_agent.wait_for(lambda: acl_agent.get("/v1/kv/signalpost/brokers/view"), timeout=30)
    finally:
        broker.terminate()
        broker.communicate(timeout=15)
