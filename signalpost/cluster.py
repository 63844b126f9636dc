"""``signalpost cluster``: a local multi-process cluster on loopback, for development and tests.

Starts a Consul dev agent (when wanted and installed), ``--presence`` presence nodes,
``--brokers`` brokers and ``--edges`` edges as child processes, waits until each is ready
(with Consul: until the views are formed; with regions: the datacenters WAN-joined and
every presence node linked to the other regions' presence nodes), then writes the state
file: ``{"processes": [{"kind", "id", "pid", "url"}, ...]}`` (``url`` is the
ws URL of an edge, the ZeroMQ endpoint of a broker or presence node, the HTTP address of
Consul). Children that die are left dead unless ``--restart``; SIGTERM/SIGINT stops all.
Each child's output goes to ``<state file>.logs/<id>.log``.

Node links use CurveZMQ: the launcher writes a key pair per node into a fresh directory
under the logs directory (``signalpost.node_keys``; brokers and presence with the endpoint
they bind) and gives each child its own secret file and that directory as the cluster keys
directory; the state file names it (``keys_dir``), so a test can add a node. The seat
tickets' secret (``signalpost.tickets``) is written there too (``ticket.secret``) and given
to brokers and presence (``SIGNALPOST_TICKET_SECRET``), never to edges. With
``insecure_node_links`` (``--insecure-node-links``) no keys are made and links are plaintext.

With ``tls_cert_file`` and ``tls_key_file`` (``--tls-cert``/``--tls-key`` or the settings),
every edge serves ``wss`` with them (its state file ``url`` says ``wss://``), and SIGHUP to
the launcher is passed on to the edges, which reload them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from signalpost.config import Settings
from signalpost.node_keys import SECRET_SUFFIX, create_node_keys
from signalpost.ownership import BROKERS, PRESENCE, Tier, decode_view
from signalpost.tickets import write_ticket_secret

log = logging.getLogger("signalpost.cluster")

READY_TIMEOUT = 20.0


#: Ports ``free_port`` handed out in this process (the newest last), never handed twice:
#: the kernel may give a port just released again, and a cluster's Consul agent and a
#: presence node were once given the same one (the node could not bind it).
_HANDED_OUT: OrderedDict[int, None] = OrderedDict()
_MAX_HANDED_OUT = 4096


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, and not handed out before by
    this process."""
    for _ in range(1000):  # (far fewer are ever handed out than the kernel has)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port not in _HANDED_OUT:
            break
    _HANDED_OUT[port] = None
    if len(_HANDED_OUT) > _MAX_HANDED_OUT:
        _HANDED_OUT.popitem(last=False)
    return port


@dataclass
class Child:
    """One process of the cluster and how to (re)start it."""

    kind: str
    id: str
    argv: list[str]
    url: str
    env: dict[str, str]
    log_path: Path
    probe: str  # "http:<url>", "tcp:<port>" or "log:<its ready line>"
    region: str = ""  # with --regions: the region it belongs to
    process: subprocess.Popen[bytes] | None = None
    log_file: TextIO | None = field(default=None, repr=False)
    log_start: int = 0  # where this run's output begins in the log (a restart appends)

    def start(self) -> None:
        self.log_file = open(self.log_path, "a")  # noqa: SIM115 - lives as long as the child
        self.log_start = self.log_file.tell()
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop them
        )

    def ready(self) -> bool:
        kind, _, target = self.probe.partition(":")
        if kind == "log":
            # Its own word that it is up (a port that answers may be another program's
            # that took it first: the node then dies on its bind).
            try:
                with self.log_path.open("rb") as log:
                    log.seek(self.log_start)
                    return target.encode() in log.read()
            except OSError:
                return False
        try:
            if kind == "http":
                # An edge with its own TLS: whether it serves, not who it is (loopback).
                context = _UNVERIFIED if target.startswith("https:") else None
                with urllib.request.urlopen(target, timeout=0.5, context=context) as response:
                    return bool(response.status == 200)
            with socket.create_connection(("127.0.0.1", int(target)), timeout=0.5):
                return True
        except OSError:
            return False

    def describe(self) -> dict[str, Any]:
        assert self.process is not None
        described: dict[str, Any] = {
            "kind": self.kind,
            "id": self.id,
            "pid": self.process.pid,
            "url": self.url,
        }
        if self.region:
            described["region"] = self.region
        return described


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


_UNVERIFIED = _unverified()


def _python_child(kind: str, node_id: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "signalpost.cli", kind, "--id", node_id, *args]


def plan(
    settings: Settings,
    *,
    edges: int,
    brokers: int,
    log_dir: Path,
    consul: bool,
    presence: int = 1,
    keys_dir: Path | None = None,
    regions: list[str] | None = None,
    wan_delay: float = 0.0,
) -> list[Child]:
    """The children of a cluster, with ports picked and settings passed by environment.

    With ``keys_dir``, each signalpost node gets a key pair written there (plaintext links
    without: then ``settings.insecure_node_links`` must be set). With ``regions``, each
    region gets the same set of nodes (ids prefixed with the region), its own Consul
    datacenter (WAN-joined to the first region's), and a WAN relay in front of its brokers
    and presence nodes that holds every byte ``wan_delay`` seconds each way: what nodes of
    other regions dial (``wan_advertise``). A variable ``SIGNALPOST_<SETTING>__<REGION>``
    sets ``<setting>`` for that region's nodes only (e.g. ``SIGNALPOST_TURN_URLS__EU``).
    """
    env = dict(os.environ)
    env.setdefault("SIGNALPOST_JWT_SECRET", settings.jwt_secret)
    if keys_dir is None:
        env["SIGNALPOST_INSECURE_NODE_LINKS"] = "true"
    else:
        env["SIGNALPOST_CLUSTER_KEYS_DIR"] = str(keys_dir)
        env.pop("SIGNALPOST_INSECURE_NODE_LINKS", None)
        env.pop("SIGNALPOST_NODE_SECRET_KEY", None)
    for name in ("SIGNALPOST_REGION", "SIGNALPOST_WAN_ADVERTISE"):
        env.pop(name, None)  # set per region and per node below
    if regions:
        env["SIGNALPOST_REGIONS"] = ",".join(regions)
    children: list[Child] = []
    first_wan_port: int | None = None
    for region in regions or [""]:
        region_env = {**env, "SIGNALPOST_REGION": region} if region else dict(env)
        region_env.update(region_settings(env, region))
        if consul:
            agent, first_wan_port = _consul_child(region, log_dir, region_env, first_wan_port)
            children.append(agent)
            region_env["SIGNALPOST_CONSUL_ADDR"] = agent.url.removeprefix("http://")
        nodes = _region_children(
            region,
            region_env,
            log_dir,
            edges=edges,
            brokers=brokers,
            presence=presence,
            tls_cert_file=settings.tls_cert_file,
            tls_key_file=settings.tls_key_file,
        )
        if region:
            # Started before the nodes that advertise its ports (which may still change).
            children.append(_relay_child(region, nodes, region_env, log_dir, wan_delay))
        children += nodes
    if keys_dir is not None:
        # Brokers and presence share the seat tickets' secret; edges never see it.
        ticket_secret = write_ticket_secret(keys_dir).read_text().strip()
        for child in children:
            if child.kind in ("consul", "wan-relay"):
                continue
            if child.kind != "edge":
                child.env = {**child.env, "SIGNALPOST_TICKET_SECRET": ticket_secret}
            create_node_keys(
                keys_dir,
                child.id,
                None if child.kind == "edge" else child.url,
                kind=child.kind,
            )
            child.env = {
                **child.env,
                "SIGNALPOST_NODE_KEY_FILE": str(keys_dir / (child.id + SECRET_SUFFIX)),
            }
    return children


def region_settings(env: Mapping[str, str], region: str) -> dict[str, str]:
    """``SIGNALPOST_<SETTING>__<REGION>`` variables as ``SIGNALPOST_<SETTING>``, for the
    nodes of ``region`` (each region of a local cluster its own TURN URLs, say)."""
    suffix = f"__{region.upper().replace('-', '_')}"
    return {
        name.removesuffix(suffix): value
        for name, value in env.items()
        if region and name.startswith("SIGNALPOST_") and name.endswith(suffix)
    }


def _consul_child(
    region: str, log_dir: Path, env: dict[str, str], join_wan: int | None
) -> tuple[Child, int]:
    """A Consul dev agent (the region's datacenter, WAN-joined to ``join_wan``'s agent)."""
    consul_port = free_port()
    ports = {
        "dns": -1,
        "grpc": -1,
        "serf_lan": free_port(),
        "serf_wan": free_port(),
        "server": free_port(),
        "http": consul_port,
    }
    name = f"{region}-consul" if region else "consul"
    data_dir = tempfile.mkdtemp(prefix=f"signalpost-{name}-", dir=log_dir)
    argv = [
        "consul",
        "agent",
        "-dev",
        "-bind=127.0.0.1",
        "-client=127.0.0.1",
        f"-data-dir={data_dir}",
        *(
            f"-{key.replace('_', '-')}-port={port}" if "_" in key else f"-{key}-port={port}"
            for key, port in ports.items()
        ),
    ]
    if region:
        argv += [f"-datacenter={region}", f"-node={name}"]
    if join_wan is not None:
        argv.append(f"-retry-join-wan=127.0.0.1:{join_wan}")
    child = Child(
        "consul",
        name,
        argv,
        f"http://127.0.0.1:{consul_port}",
        env,
        log_dir / f"{name}.log",
        f"http:http://127.0.0.1:{consul_port}/v1/status/leader",
        region=region,
    )
    return child, join_wan if join_wan is not None else ports["serf_wan"]


def _region_children(
    region: str,
    env: dict[str, str],
    log_dir: Path,
    *,
    edges: int,
    brokers: int,
    presence: int,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
) -> list[Child]:
    """One region's presence nodes, brokers and edges (the whole cluster without regions)."""
    prefix = f"{region}-" if region else ""
    presence_endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(presence)]
    broker_endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(brokers)]
    if not env.get("SIGNALPOST_CONSUL_ADDR"):
        # Without Consul the nodes learn each other from static endpoints.
        env = {
            **env,
            "SIGNALPOST_PRESENCE_ENDPOINT": ",".join(presence_endpoints),
            "SIGNALPOST_BROKER_ENDPOINTS": ",".join(broker_endpoints),
        }
    children: list[Child] = []
    for kind, endpoints in (("presence", presence_endpoints), ("broker", broker_endpoints)):
        for index, endpoint in enumerate(endpoints, 1):
            node_id = f"{prefix}{kind}-{index}"
            children.append(
                Child(
                    kind,
                    node_id,
                    _python_child(kind, node_id, "--bind", endpoint),
                    endpoint,
                    env,
                    log_dir / f"{node_id}.log",
                    f"log:signalpost {kind} {node_id} ready on {endpoint}",
                    region=region,
                )
            )
    edge_env, secure = env, ""
    if tls_cert_file and tls_key_file:
        # Every edge serves wss with the same certificate (SIGHUP to the launcher reloads).
        secure = "s"
        edge_env = {
            **env,
            "SIGNALPOST_TLS_CERT_FILE": str(Path(tls_cert_file).resolve()),
            "SIGNALPOST_TLS_KEY_FILE": str(Path(tls_key_file).resolve()),
        }
    for index in range(1, edges + 1):
        edge_id = f"{prefix}edge-{index}"
        port = free_port()
        children.append(
            Child(
                "edge",
                edge_id,
                _python_child("edge", edge_id, "--host", "127.0.0.1", "--port", str(port)),
                f"ws{secure}://127.0.0.1:{port}/v1/signal",
                edge_env,
                log_dir / f"{edge_id}.log",
                f"http:http{secure}://127.0.0.1:{port}/healthz",
                region=region,
            )
        )
    return children


def _relay_child(
    region: str, nodes: list[Child], env: dict[str, str], log_dir: Path, delay: float
) -> Child:
    """The region's emulated WAN: a relay port per broker and presence node, which the node
    advertises (``wan_advertise``) to the other regions."""
    name = f"{region}-wan-relay"
    relay = Child("wan-relay", name, [], "", env, log_dir / f"{name}.log", "", region=region)
    _relay_ports(relay, nodes, delay)
    return relay


def _relay_ports(relay: Child, nodes: list[Child], delay: float) -> None:
    """Give ``relay`` a free port per broker and presence node of its region (its argv and
    probe), and each node the port to advertise."""
    pairs = []
    for child in nodes:
        if child.region == relay.region and child.kind in ("broker", "presence"):
            listen = free_port()
            pairs += ["--pair", f"127.0.0.1:{listen}={child.url.removeprefix('tcp://')}"]
            child.env = {**child.env, "SIGNALPOST_WAN_ADVERTISE": f"tcp://127.0.0.1:{listen}"}
    argv = [sys.executable, "-m", "signalpost.cli", "wan-relay", "--delay", f"{delay}", *pairs]
    argv += ["--stats", str(relay.log_path.with_suffix(".json"))]  # bytes that crossed
    relay.argv = argv
    relay.probe = "log:signalpost wan-relay ready"


def _write_state(path: Path, children: list[Child], keys_dir: Path | None) -> None:
    state: dict[str, Any] = {"processes": [child.describe() for child in children]}
    if keys_dir is not None:
        state["keys_dir"] = str(keys_dir)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(state, indent=2))
    partial.replace(path)  # readers never see half a file


#: Times an edge whose free port was taken before it bound it is started on another one.
PORT_RETRIES = 3


def _lost_its_port(child: Child) -> bool:
    """Whether ``child`` died because a port of its was taken (an edge, a WAN relay or a
    Consul agent)."""
    if child.kind not in ("edge", "wan-relay", "consul") or child.process is None:
        return False
    if child.process.poll() is None:
        return False
    try:
        return "address already in use" in child.log_path.read_text()[-4000:].lower()
    except OSError:
        return False


def _move_edge(child: Child) -> None:
    """Give an edge a new free port (its argv, URL and probe)."""
    old = child.argv[child.argv.index("--port") + 1]
    new = str(free_port())
    child.argv[child.argv.index("--port") + 1] = new
    child.url = child.url.replace(f":{old}/", f":{new}/")
    child.probe = child.probe.replace(f":{old}/", f":{new}/")
    if child.log_file is not None:
        child.log_file.close()
    log.warning("%s: port %s was taken; starting it on %s", child.id, old, new)


def _move_consul(child: Child, children: list[Child]) -> None:
    """Give a Consul agent new free ports: its HTTP port in its URL, its probe and the
    ``SIGNALPOST_CONSUL_ADDR`` of the nodes that use it (none started yet: an agent starts
    before its region's nodes), its WAN port where another agent joins it."""
    moved: dict[str, str] = {}
    for index, arg in enumerate(child.argv):
        flag, eq, port = arg.partition("=")
        if eq and flag.endswith("-port") and port.isdigit() and port != "-1":
            moved[port] = str(free_port())
            child.argv[index] = f"{flag}={moved[port]}"
    old_http = child.url.rsplit(":", 1)[1]
    new_http = moved[old_http]
    old_addr, new_addr = f"127.0.0.1:{old_http}", f"127.0.0.1:{new_http}"
    child.url = child.url.replace(old_addr, new_addr)
    child.probe = child.probe.replace(old_addr, new_addr)
    for other in children:
        if other.env.get("SIGNALPOST_CONSUL_ADDR") == old_addr:
            other.env = {**other.env, "SIGNALPOST_CONSUL_ADDR": new_addr}
        if other.kind == "consul" and other is not child:
            other.argv = [
                f"-retry-join-wan=127.0.0.1:{moved[a.rsplit(':', 1)[1]]}"
                if a.startswith("-retry-join-wan=") and a.rsplit(":", 1)[1] in moved
                else a
                for a in other.argv
            ]
    if child.log_file is not None:
        child.log_file.close()
    log.warning("%s: a port was taken; starting it on new ports (HTTP %s)", child.id, new_http)


def _wait_ready(child: Child, deadline: float) -> bool:
    while time.monotonic() < deadline:
        assert child.process is not None
        if child.process.poll() is not None:
            return False
        if child.ready():
            return True
        time.sleep(0.05)
    return False


def _wait_for_view(
    consul_url: str, members: set[str], deadline: float, tier: Tier = BROKERS
) -> bool:
    """Wait until the ownership view of ``tier`` in Consul holds every member, then long
    enough for every node to have read it (one query interval): until then a room's owner
    may have no runner-up in its view, and what it acks is not replicated."""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(
                f"{consul_url}/v1/kv/{tier.view_key}?raw&consistent", timeout=2
            ) as response:
                view = decode_view(response.read())
        except OSError:
            view = None
        if view is not None and set(view.members) == members:
            time.sleep(0.5)
            return True
        time.sleep(0.1)
    return False


def _wait_for_views(children: list[Child], deadline: float) -> str | None:
    """Wait until each region's brokers and presence nodes formed their views in its
    Consul, and the regions' datacenters know each other; what did not happen, or None."""
    agents = [c for c in children if c.kind == "consul"]
    for agent in agents:
        where = f" in {agent.region}" if agent.region else ""
        for kind, tier in (("broker", BROKERS), ("presence", PRESENCE)):
            urls = {c.url for c in children if c.kind == kind and c.region == agent.region}
            if not _wait_for_view(agent.url, urls, deadline, tier):
                return f"the {kind} nodes did not form a view in Consul{where}"
    regions = {agent.region for agent in agents if agent.region}
    if len(regions) > 1 and not _wait_for_datacenters(agents[0].url, regions, deadline):
        return f"the Consul datacenters {sorted(regions)} did not WAN-join"
    return None


#: Of a node of each kind, the tier of every other region it links to from the start (an
#: edge follows another region's brokers once a room homed there is used).
_FOLLOWS: Mapping[str, str] = {"presence": "presence"}


def _metrics_url(child: Child) -> str | None:
    """Where a broker or presence node serves ``/metrics``: it says so in its ready line
    (its health port is picked at start)."""
    marker = ", metrics "
    for line in child.log_path.read_text(errors="replace").splitlines():
        if " ready on " in line and marker in line:
            return line.rsplit(marker, 1)[1].strip()
    return None


def _links_alive(url: str) -> dict[tuple[str, str], float]:
    """``signalpost_region_links_alive`` from a node's metrics: (region, tier) -> links up."""
    context = _UNVERIFIED if url.startswith("https:") else None
    with urllib.request.urlopen(url, timeout=2, context=context) as response:
        text = response.read().decode()
    alive: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("signalpost_region_links_alive{"):
            labels, _, value = line.rpartition(" ")
            region = labels.split('region="', 1)[1].split('"', 1)[0]
            tier = labels.split('tier="', 1)[1].split('"', 1)[0]
            alive[(region, tier)] = float(value)
    return alive


def _wait_for_region_links(children: list[Child], deadline: float) -> str | None:
    """With two or more regions, wait until every presence node has a live link to every
    presence node of each other region: until then a user online elsewhere is not seen
    online here. What did not happen, or None."""
    regions = {c.region for c in children if c.region}
    if len(regions) < 2:
        return None
    for child in children:
        tier = _FOLLOWS.get(child.kind)
        if tier is None:
            continue
        wanted = {
            (region, tier): sum(1 for c in children if c.kind == tier and c.region == region)
            for region in regions - {child.region}
        }
        url = None
        while True:
            url = url or _metrics_url(child)  # its ready line, read until found
            try:
                alive = _links_alive(url) if url else {}
            except (OSError, ValueError, IndexError):
                alive = {}
            if all(alive.get(key, 0) >= count for key, count in wanted.items()):
                break
            if time.monotonic() > deadline:
                return f"{child.id} did not link to the other regions' {tier} nodes"
            time.sleep(0.1)
    return None


def _wait_for_datacenters(consul_url: str, regions: set[str], deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{consul_url}/v1/catalog/datacenters", timeout=2) as r:
                if regions <= set(json.loads(r.read())):
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return False


def _stop(children: list[Child], grace: float) -> None:
    for child in reversed(children):  # edges first: they drain clients
        if child.process is not None and child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in reversed(children):
        if child.process is None:
            continue
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
        if child.log_file is not None:
            child.log_file.close()


def run_cluster(
    settings: Settings,
    *,
    edges: int,
    brokers: int,
    state_file: str,
    restart: bool,
    consul: str,
    presence: int = 1,
    regions: list[str] | None = None,
    wan_delay: float = 0.0,
) -> int:
    """Run the cluster until SIGTERM/SIGINT; return the exit status."""
    state_path = Path(state_file)
    log_dir = state_path.with_name(state_path.name + ".logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    want_consul = consul == "on" or (consul == "auto" and shutil.which("consul") is not None)
    if consul == "on" and shutil.which("consul") is None:
        print("signalpost cluster: --consul on, but consul is not on PATH", file=sys.stderr)
        return 2
    keys_dir = (
        None
        if settings.insecure_node_links
        else Path(tempfile.mkdtemp(prefix="signalpost-keys-", dir=log_dir))
    )
    children = plan(
        settings,
        edges=edges,
        brokers=brokers,
        presence=presence,
        log_dir=log_dir,
        consul=want_consul,
        keys_dir=keys_dir,
        regions=regions,
        wan_delay=wan_delay,
    )

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    def hangup(signum: int, frame: object) -> None:
        # The edges re-read their TLS certificate (nothing else reloads on SIGHUP).
        for child in children:
            process = child.process
            if child.kind == "edge" and process is not None and process.poll() is None:
                process.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if settings.tls_cert_file:
        signal.signal(signal.SIGHUP, hangup)
    try:
        for child in children:
            # Each child has its own time to start: on a loaded machine a two-region cluster
            # starts a dozen processes one after the other.
            deadline = time.monotonic() + READY_TIMEOUT
            child.start()
            ready = _wait_ready(child, deadline)
            for _retry in range(PORT_RETRIES):
                if ready or not _lost_its_port(child):
                    break
                # The free port was taken meanwhile (other programs on the machine): an
                # edge, a relay or a Consul agent takes another one (brokers and presence
                # are named by theirs; they start after their relay and their agent).
                if child.kind == "edge":
                    _move_edge(child)
                elif child.kind == "consul":
                    _move_consul(child, children)
                else:
                    if child.log_file is not None:
                        child.log_file.close()
                    _relay_ports(child, children, wan_delay)
                child.start()
                ready = _wait_ready(child, deadline)
            if not ready:
                print(
                    f"signalpost cluster: {child.id} did not become ready; see {child.log_path}",
                    file=sys.stderr,
                )
                return 1
        deadline = time.monotonic() + READY_TIMEOUT
        problem = _wait_for_views(children, deadline) or _wait_for_region_links(children, deadline)
        if problem:
            print(f"signalpost cluster: {problem}", file=sys.stderr)
            return 1
        _write_state(state_path, children, keys_dir)
        print(f"signalpost cluster ready: {state_path}", flush=True)
        while not stopping:
            time.sleep(0.2)
            for child in children:
                assert child.process is not None
                code = child.process.poll()
                if code is None or stopping:
                    continue
                if restart and child.kind != "consul":
                    log.warning("%s exited with %s; restarting", child.id, code)
                    child.start()
                    _write_state(state_path, children, keys_dir)
        return 0
    finally:
        _stop(children, settings.drain_timeout + 2.0)
