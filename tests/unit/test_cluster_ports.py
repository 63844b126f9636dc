"""``signalpost cluster`` moves an edge whose free port was taken before it could bind it."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from signalpost.cluster import Child, _lost_its_port, _move_edge


def test_an_edge_that_lost_its_port_is_moved_to_another(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        argv = [sys.executable, "-c", f"import socket; socket.create_server(('127.0.0.1', {port}))"]
        child = Child(
            "edge",
            "edge-1",
            [*argv, "--port", str(port)],
            f"ws://127.0.0.1:{port}/v1/signal",
            {},
            tmp_path / "edge-1.log",
            f"http:http://127.0.0.1:{port}/healthz",
        )
        child.log_file = open(child.log_path, "a")  # noqa: SIM115 - as Child.start does
        child.process = subprocess.Popen(
            child.argv[:3], stdout=child.log_file, stderr=subprocess.STDOUT
        )
        child.process.wait(10)
        assert _lost_its_port(child)  # the log says why it died
        _move_edge(child)
    new = child.argv[child.argv.index("--port") + 1]
    assert new != str(port)
    assert child.url == f"ws://127.0.0.1:{new}/v1/signal"
    assert child.probe == f"http:http://127.0.0.1:{new}/healthz"
    broker = Child("broker", "b", [], "tcp://127.0.0.1:1", {}, child.log_path, "tcp:1")
    assert not _lost_its_port(broker)  # a broker is named by its endpoint: never moved


def test_a_relay_that_lost_a_port_is_given_new_ones_and_its_nodes_advertise_them(
    tmp_path: Path,
) -> None:
    from signalpost.cluster import _relay_child, _relay_ports

    broker = Child("broker", "eu-broker-1", [], "tcp://127.0.0.1:5555", {}, tmp_path / "b", "")
    broker.region = "eu"
    relay = _relay_child("eu", [broker], {}, tmp_path, 0.04)
    first = broker.env["SIGNALPOST_WAN_ADVERTISE"]
    assert relay.probe == "log:signalpost wan-relay ready"
    assert f"{first.removeprefix('tcp://')}=127.0.0.1:5555" in relay.argv
    _relay_ports(relay, [broker], 0.04)  # as after "address already in use"
    second = broker.env["SIGNALPOST_WAN_ADVERTISE"]
    assert second != first and f"{second.removeprefix('tcp://')}=127.0.0.1:5555" in relay.argv


def test_a_consul_agent_that_lost_a_port_gets_new_ones_and_its_region_follows(
    tmp_path: Path,
) -> None:
    # A CI run lost a two-region cluster to "bind: address already in use" on an agent's
    # server port, taken between choosing it and Consul binding it.
    from signalpost.cluster import _consul_child, _move_consul

    eu, wan = _consul_child("eu", tmp_path, {}, None)
    us, _ = _consul_child("us", tmp_path, {}, wan)
    node = Child("broker", "eu-broker-1", [], "tcp://127.0.0.1:1", {}, tmp_path / "b", "")
    node.env = {"SIGNALPOST_CONSUL_ADDR": eu.url.removeprefix("http://")}
    before_argv, before_url = list(eu.argv), eu.url
    _move_consul(eu, [eu, node, us])
    assert eu.url != before_url and eu.probe.startswith(f"http:{eu.url}/")
    changed = [a for a, b in zip(eu.argv, before_argv, strict=True) if a != b]
    assert len(changed) == 4  # serf LAN, serf WAN, server, HTTP (DNS and gRPC stay off)
    assert node.env["SIGNALPOST_CONSUL_ADDR"] == eu.url.removeprefix("http://")
    (join,) = [a for a in us.argv if a.startswith("-retry-join-wan=")]
    (serf_wan,) = [a for a in eu.argv if a.startswith("-serf-wan-port=")]
    assert join.rsplit(":", 1)[1] == serf_wan.split("=")[1]


def test_ports_are_never_handed_out_twice_and_a_node_is_ready_by_its_own_word(
    tmp_path: Path,
) -> None:
    """A cluster's Consul agent and a presence node were once given the same port (the
    kernel gave it again); and the node, dead on its bind, looked ready because the port
    answered. Ports are handed out once per process, and a broker or presence node is
    ready when its own ready line appears in this run's part of its log."""
    from signalpost.cluster import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    log = tmp_path / "presence-1.log"
    log.write_text("signalpost presence presence-1 ready on tcp://127.0.0.1:1\n")  # before
    child = Child(
        "presence",
        "presence-1",
        [sys.executable, "-c", "import time; time.sleep(0.2); print('started', flush=True)"],
        "tcp://127.0.0.1:1",
        {},
        log,
        "log:signalpost presence presence-1 ready on tcp://127.0.0.1:1",
    )
    child.start()
    assert child.process is not None
    assert not child.ready()  # the line is the previous run's
    child.process.wait(10)
    assert not child.ready()
    with log.open("a") as out:
        out.write("signalpost presence presence-1 ready on tcp://127.0.0.1:1\n")
    assert child.ready()
    assert child.log_file is not None
    child.log_file.close()
