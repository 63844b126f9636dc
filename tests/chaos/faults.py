"""The cluster of a chaos run, as real processes, and the faults injected into it.

``ChaosCluster`` starts ``python -m signalpost.cli cluster --restart`` (Consul on, fast
heartbeats) the way ``tests/cluster/conftest.py`` does, reads its state file through that
module's ``Cluster``, and stops everything it started, whatever happens: SIGCONT to any
process it stopped, SIGTERM to the launcher, then SIGKILL to every pid it ever saw.

``FaultInjector.inject`` picks one fault from a seeded ``random.Random``, injects it, waits
until the cluster is whole again (bounded) and returns its ``FaultLog``:

- ``broker_kill``: SIGKILL a broker; the launcher restarts it.
- ``broker_stop``: SIGSTOP a broker for 1.5 to 3 heartbeat expiries, then SIGCONT: it
  wakes up believing it still owns its rooms.
- ``edge_kill``: SIGKILL an edge; its clients resume on the other one; launcher restart;
  once they have resumed, they drop (abort) and resume on it again: both edges keep clients.
- ``presence_kill``: SIGKILL the presence node; launcher restart.
- ``link_reset``: ``ss -K`` the TCP connections to, from or both ways of a broker's or the
  presence node's ZeroMQ port (ZeroMQ reconnects by itself), or of an edge's WebSocket
  port (its clients resume elsewhere, then move back as after ``edge_kill``).
- ``consul_restart``: SIGKILL the Consul agent, 1 to 4 s down, then a fresh dev agent (no
  state) on the same ports; the nodes register again.
- ``client_drop``: a client aborts its connection (no close frame), or leaves it half open,
  and resumes on the other edge.

With ``regions`` (``signalpost cluster --regions eu,us --wan-delay ...``), two more
(``REGION_FAULT_WEIGHTS``), and ``consul_restart`` restarts one region's agent:

- ``region_kill``: kill -9 every process of one region (edges, brokers, presence nodes,
  its Consul agent and its WAN relay) with the launcher paused (SIGSTOP: its ``--restart``
  would bring the nodes back at once, and it never restarts Consul); 3 to 6 s later a fresh
  Consul dev agent of that datacenter (no state, WAN-joined again), then the launcher goes
  on and restarts the rest; the region's clients, which resumed in the other region, then
  move back to their own edges.
- ``wan_reset``: ``ss -K`` the TCP connections to, from or both ways of one region's WAN
  relay ports (one port or all): what the other region's nodes dial.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.chaos.checker import FaultLog
from tests.chaos.workload import ChaosClient
from tests.cluster.conftest import FAST_ENV, Cluster

#: Heartbeats of the run's cluster (FAST_ENV): a node is dead after 0.2 s x 5.
HEARTBEAT_EXPIRY = float(FAST_ENV["SIGNALPOST_HEARTBEAT_INTERVAL"]) * float(
    FAST_ENV["SIGNALPOST_HEARTBEAT_LIVENESS"]
)
START_TIMEOUT = 120.0
#: Seconds a killed process has to come back before the run goes on without waiting.
RESTART_TIMEOUT = 20.0

FAULT_WEIGHTS: dict[str, int] = {
    "broker_kill": 3,
    "broker_stop": 2,
    "edge_kill": 2,
    "presence_kill": 1,
    "presence_stop": 1,
    "link_reset": 3,
    "consul_restart": 1,
    "client_drop": 3,
}
#: Added to FAULT_WEIGHTS when the cluster has regions.
REGION_FAULT_WEIGHTS: dict[str, int] = {
    "region_kill": 1,
    "wan_reset": 2,
}
#: Seconds a killed region stays down (``region_kill``).
REGION_DOWN = (3.0, 6.0)


def _port(url: str) -> int:
    return int(url.rstrip("/").split(":")[-1].split("/")[0])


async def _tcp_ready(port: int) -> bool:
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks after boot), or None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # state, ..., starttime (field 22)


def _argv(pid: int) -> list[str]:
    """The command line of a running process."""
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200 and response.read().strip(b'"\n'))
    except OSError:
        return False


class ChaosCluster:
    """``signalpost cluster --restart --consul on`` as processes, and everything it started."""

    def __init__(
        self,
        workdir: Path,
        *,
        edges: int,
        brokers: int,
        env: dict[str, str],
        presence: int = 2,
        regions: Sequence[str] = (),
        wan_delay: str = "40ms",
    ) -> None:
        self.workdir = workdir
        self.edges = edges
        self.brokers = brokers
        self.presence = presence
        self.regions = tuple(regions)
        self.wan_delay = wan_delay
        self.env = {**os.environ, **FAST_ENV, **env}
        self.state_path = workdir / "cluster.json"
        self.cluster: Cluster | None = None
        # Consul agents we restarted, and every agent's command line, by process id.
        self.consul: dict[str, subprocess.Popen[bytes]] = {}
        self.consul_argv: dict[str, list[str]] = {}
        self.launcher_paused = False
        self.stopped: set[int] = set()  # pids we sent SIGSTOP and no SIGCONT yet
        self.seen: dict[int, str] = {}  # pid -> its start time: a reused pid is not ours
        self._stderr: Any = None

    @property
    def log_dir(self) -> Path:
        return self.state_path.with_name(self.state_path.name + ".logs")

    def launch(self) -> None:
        """Start the launcher (``ready`` waits for it)."""
        self._stderr = (self.workdir / "launcher.log").open("wb")
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "signalpost.cli",
                "cluster",
                "--edges",
                str(self.edges),
                "--brokers",
                str(self.brokers),
                "--presence",
                str(self.presence),
                "--state",
                str(self.state_path),
                "--consul",
                "on",
                "--restart",
                *(
                    ["--regions", ",".join(self.regions), "--wan-delay", self.wan_delay]
                    if self.regions
                    else []
                ),
            ],
            env=self.env,
            stdout=self._stderr,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.cluster = Cluster(launcher, self.state_path)

    async def ready(self) -> None:
        """Return once the launcher's state file says every node is ready."""
        assert self.cluster is not None
        launcher = self.cluster.launcher
        deadline = time.monotonic() + START_TIMEOUT
        while not self.state_path.exists():
            if launcher.poll() is not None:
                said = (self.workdir / "launcher.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"signalpost cluster exited {launcher.returncode}: {said}")
            if time.monotonic() > deadline:
                raise RuntimeError("signalpost cluster did not become ready")
            await asyncio.sleep(0.1)
        self.reload()
        self.consul_argv = {c["id"]: _argv(c["pid"]) for c in self.of_kind("consul")}

    def reload(self) -> None:
        """Re-read the state file (the launcher rewrites it with the pids of restarts)."""
        assert self.cluster is not None
        for _ in range(20):
            try:
                self.cluster.reload()
                break
            except (OSError, ValueError):  # mid-replace: try again
                time.sleep(0.01)
        for process in self.cluster.processes:
            started = _start_time(process["pid"])
            if started is not None:
                self.seen.setdefault(process["pid"], started)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        assert self.cluster is not None
        return self.cluster.of_kind(kind)

    def in_region(self, region: str, kind: str | None = None) -> list[dict[str, Any]]:
        """The processes of ``region`` (of one kind, or all)."""
        assert self.cluster is not None
        return [
            p
            for p in self.cluster.processes
            if p.get("region", "") == region and kind in (None, p["kind"])
        ]

    def process(self, process_id: str) -> dict[str, Any]:
        assert self.cluster is not None
        (process,) = [p for p in self.cluster.processes if p["id"] == process_id]
        return process

    def ours(self, pid: int) -> bool:
        """Whether ``pid`` is still the process this cluster started under that pid."""
        started = _start_time(pid)
        return started is not None and self.seen.get(pid) == started

    def signal(self, process_id: str, sig: int) -> int:
        """Send ``sig`` to a node; return its pid."""
        self.reload()
        pid: int = self.process(process_id)["pid"]
        if not self.ours(pid):
            return pid  # gone (and its pid maybe reused): the launcher restarts it
        if sig == signal.SIGSTOP:
            self.stopped.add(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if sig == signal.SIGCONT:
            self.stopped.discard(pid)
        return pid

    async def wait_restarted(self, process_id: str, old_pid: int) -> bool:
        """Wait until the launcher restarted ``process_id`` and it accepts connections."""
        assert self.cluster is not None
        deadline = time.monotonic() + RESTART_TIMEOUT
        while time.monotonic() < deadline:
            self.reload()
            process = self.process(process_id)
            if (
                process["pid"] != old_pid
                and self.ours(process["pid"])
                and await _tcp_ready(self.listen_port(process))
            ):
                return True
            await asyncio.sleep(0.1)
        return False

    async def whole(self) -> bool:
        """Every node alive, not stopped, and accepting connections; Consul answering."""
        assert self.cluster is not None
        self.reload()
        if self.launcher_paused:
            return False
        for process in self.cluster.processes:
            if process["kind"] == "consul":
                continue
            if not self.ours(process["pid"]) or process["pid"] in self.stopped:
                return False
            if not await _tcp_ready(self.listen_port(process)):
                return False
        return await self.consul_ready()

    def listen_port(self, process: dict[str, Any]) -> int:
        """A port the process accepts connections on (a relay's first listening port)."""
        if process["kind"] == "wan-relay":
            return self.relay_ports(process["id"])[0]
        return _port(process["url"])

    def relay_ports(self, relay_id: str) -> list[int]:
        """The ports a WAN relay listens on (``--pair 127.0.0.1:PORT=...``), from its argv."""
        argv = (
            _argv(self.process(relay_id)["pid"]) if self.ours(self.process(relay_id)["pid"]) else []
        )
        return [
            int(pair.split("=", 1)[0].rsplit(":", 1)[1])
            for flag, pair in itertools.pairwise(argv)
            if flag == "--pair"
        ] or [0]

    @property
    def consul_url(self) -> str:
        url: str = self.of_kind("consul")[0]["url"]
        return url

    async def consul_ready(self) -> bool:
        """Every Consul agent (one per region) has a leader."""
        urls = [f"{c['url']}/v1/status/leader" for c in self.of_kind("consul")]
        answers = await asyncio.gather(*(asyncio.to_thread(_http_ok, url) for url in urls))
        return all(answers)

    async def passing(self) -> dict[str, list[str]]:
        """Per kind, the node ids Consul lists as healthy (each region's nodes in its own
        datacenter's agent; none of a region whose Consul does not answer)."""

        def ask(consul_url: str, kind: str) -> list[str]:
            url = f"{consul_url}/v1/health/service/signalpost-{kind}?passing=1"
            try:
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    return sorted(e["Service"]["ID"] for e in json.loads(response.read()))
            except (OSError, ValueError):
                return []

        kinds = ("edge", "broker", "presence")
        agents = [c["url"] for c in self.of_kind("consul")]
        found = await asyncio.gather(
            *(asyncio.to_thread(ask, agent, kind) for kind in kinds for agent in agents)
        )
        per_kind: dict[str, list[str]] = {kind: [] for kind in kinds}
        for index, ids in enumerate(found):
            per_kind[kinds[index // len(agents)]] += ids
        return {kind: sorted(ids) for kind, ids in per_kind.items()}

    async def kill_consul(self, consul_id: str | None = None) -> None:
        """SIGKILL a Consul agent (the launcher's, or the one we restarted); default the
        first (the only one without regions)."""
        consul_id = consul_id or self.of_kind("consul")[0]["id"]
        restarted = self.consul.pop(consul_id, None)
        if restarted is not None:
            restarted.kill()
            await asyncio.to_thread(restarted.wait)
        else:
            pid: int = self.process(consul_id)["pid"]
            if self.ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _spawn_consul(self, consul_id: str) -> None:
        data_dir = self.workdir / f"consul-data-{time.monotonic_ns()}"
        argv = [
            f"-data-dir={data_dir}" if arg.startswith("-data-dir=") else arg
            for arg in self.consul_argv[consul_id]
        ]
        # WAN-join every other region's agent (the first region's agent joined nobody).
        for other_id, other in self.consul_argv.items():
            wan = [a.split("=", 1)[1] for a in other if a.startswith("-serf-wan-port=")]
            join = f"-retry-join-wan=127.0.0.1:{wan[0]}" if wan else ""
            if other_id != consul_id and join and join not in argv:
                argv.append(join)
        with (self.log_dir / f"{consul_id}-restarted.log").open("ab") as log_file:
            self.consul[consul_id] = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def start_consul(self, consul_id: str | None = None) -> bool:
        """A fresh dev agent on the same ports (a dev agent comes back with no state)."""
        consul_id = consul_id or self.of_kind("consul")[0]["id"]
        self._spawn_consul(consul_id)
        url = f"{self.process(consul_id)['url']}/v1/status/leader"
        deadline = time.monotonic() + RESTART_TIMEOUT
        while time.monotonic() < deadline:
            if await asyncio.to_thread(_http_ok, url):
                return True
            await asyncio.sleep(0.2)
        return False

    def pause_launcher(self, paused: bool) -> None:
        """SIGSTOP (no restarts while a region is down) or SIGCONT the launcher."""
        assert self.cluster is not None
        launcher = self.cluster.launcher
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)
        self.launcher_paused = paused

    async def stop(self) -> None:
        """Stop everything this cluster started; nothing outlives it."""
        if self.cluster is None:
            return
        for pid in list(self.stopped):
            if self.ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        self.stopped.clear()
        if self.launcher_paused:
            self.pause_launcher(False)
        launcher = self.cluster.launcher
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(launcher.wait, 20)
            except subprocess.TimeoutExpired:
                launcher.kill()
                await asyncio.to_thread(launcher.wait)
        for restarted in self.consul.values():
            restarted.kill()
            await asyncio.to_thread(restarted.wait)
        self.consul.clear()
        with contextlib.suppress(OSError, ValueError):
            self.reload()
        for pid in self.seen:  # a child the launcher lost track of, if any
            if self.ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._stderr is not None:
            self._stderr.close()


class FaultInjector:
    """Injects one fault at a time, chosen by a seeded ``random.Random``."""

    def __init__(
        self,
        cluster: ChaosCluster,
        clients: Sequence[ChaosClient],
        rng: random.Random,
        clock: Callable[[], float],
        weights: dict[str, int] | None = None,
    ) -> None:
        self.cluster = cluster
        self.clients = clients
        self.rng = rng
        self.clock = clock
        weights = weights or FAULT_WEIGHTS
        self.kinds = list(weights)
        self.weights = [weights[k] for k in self.kinds]

    async def inject(self) -> FaultLog:
        """Pick a fault, inject it, and return once the cluster has recovered (bounded)."""
        kind = self.rng.choices(self.kinds, self.weights)[0]
        fault: FaultLog = await getattr(self, f"_{kind}")()
        fault.ended_at = self.clock()
        return fault

    def _pick(self, kind: str) -> str:
        node: str = self.rng.choice(self.cluster.of_kind(kind))["id"]
        return node

    async def _kill(self, kind: str) -> FaultLog:
        target = self._pick(kind)
        fault = FaultLog(f"{kind}_kill", target, self.clock())
        pid = self.cluster.signal(target, signal.SIGKILL)
        if not await self.cluster.wait_restarted(target, pid):
            fault.detail = f"not restarted within {RESTART_TIMEOUT:.0f} s"
        return fault

    async def _move_home(self, edge: str) -> str:
        """Clients of ``edge`` that resumed elsewhere drop (abort) and resume on it again.

        Without this, every edge fault would leave all clients on the other edge.
        """
        homed = [c for c in self.clients if c.home_edge == edge and not c.lost]
        await asyncio.gather(*(c.wait_ready(10.0) for c in homed))  # resumed elsewhere first
        away = [c for c in homed if c.ready and c.edge != edge]
        for client in away:
            await client.drop(half_open=False)
        back = await asyncio.gather(*(c.wait_ready(15.0) for c in away))
        return f"{sum(back)} of {len(away)} clients moved back"

    async def _broker_kill(self) -> FaultLog:
        return await self._kill("broker")

    async def _edge_kill(self) -> FaultLog:
        fault = await self._kill("edge")
        fault.detail = "; ".join(filter(None, [fault.detail, await self._move_home(fault.target)]))
        return fault

    async def _presence_kill(self) -> FaultLog:
        return await self._kill("presence")

    async def _broker_stop(self) -> FaultLog:
        return await self._stop("broker")

    async def _presence_stop(self) -> FaultLog:
        return await self._stop("presence")

    async def _stop(self, kind: str) -> FaultLog:
        """Pause a node (SIGSTOP) past its heartbeat expiry, then let it go on (SIGCONT)."""
        target = self._pick(kind)
        hold = self.rng.uniform(1.5, 3.0) * HEARTBEAT_EXPIRY
        fault = FaultLog(f"{kind}_stop", target, self.clock(), detail=f"{hold:.1f} s")
        self.cluster.signal(target, signal.SIGSTOP)
        try:
            await asyncio.sleep(hold)
        finally:
            self.cluster.signal(target, signal.SIGCONT)
        return fault

    async def _link_reset(self) -> FaultLog:
        kind = self.rng.choice(["broker", "broker", "presence", "edge"])
        target = self._pick(kind)
        port = _port(self.cluster.process(target)["url"])
        side = self.rng.choice(["to", "from", "both"])
        fault = FaultLog("link_reset", target, self.clock())
        killed = await self._ss_kill(fault, port, side)
        fault.detail += f"{side} port {port}: {killed} sockets reset"
        if kind == "edge":
            await asyncio.sleep(0.5)  # the resets reach the clients
            fault.detail += "; " + await self._move_home(target)
        return fault

    async def _consul_restart(self) -> FaultLog:
        down = self.rng.uniform(1.0, 4.0)
        target = self._pick("consul")
        fault = FaultLog("consul_restart", target, self.clock(), detail=f"down {down:.1f} s")
        await self.cluster.kill_consul(target)
        await asyncio.sleep(down)
        if not await self.cluster.start_consul(target):
            fault.detail += "; did not come back"
        return fault

    async def _region_kill(self) -> FaultLog:
        """kill -9 a whole region (Consul and relay too), then bring it all back."""
        region = self.rng.choice(self.cluster.regions)
        down = self.rng.uniform(*REGION_DOWN)
        fault = FaultLog("region_kill", region, self.clock(), detail=f"down {down:.1f} s")
        self.cluster.reload()
        nodes = [p for p in self.cluster.in_region(region) if p["kind"] != "consul"]
        (consul,) = self.cluster.in_region(region, "consul")
        self.cluster.pause_launcher(True)
        try:
            old = {p["id"]: self.cluster.signal(p["id"], signal.SIGKILL) for p in nodes}
            await self.cluster.kill_consul(consul["id"])
            await asyncio.sleep(down)
            if not await self.cluster.start_consul(consul["id"]):
                fault.detail += "; Consul did not come back"
        finally:
            self.cluster.pause_launcher(False)
        back = await asyncio.gather(
            *(self.cluster.wait_restarted(node_id, pid) for node_id, pid in old.items())
        )
        missing = [node_id for node_id, ok in zip(old, back, strict=True) if not ok]
        if missing:
            fault.detail += f"; not restarted within {RESTART_TIMEOUT:.0f} s: {missing}"
        moved = [await self._move_home(e["id"]) for e in self.cluster.in_region(region, "edge")]
        fault.detail += "; " + "; ".join(moved)
        return fault

    async def _wan_reset(self) -> FaultLog:
        """``ss -K`` the connections through one region's WAN relay (one port or all)."""
        region = self.rng.choice(self.cluster.regions)
        (relay,) = self.cluster.in_region(region, "wan-relay")
        ports = self.cluster.relay_ports(relay["id"])
        if self.rng.random() < 0.5:
            ports = [self.rng.choice(ports)]
        side = self.rng.choice(["to", "from", "both"])
        fault = FaultLog("wan_reset", relay["id"], self.clock())
        killed = 0
        for port in ports:
            killed += await self._ss_kill(fault, port, side)
        fault.detail += f"{side} ports {','.join(map(str, ports))}: {killed} sockets reset"
        return fault

    async def _ss_kill(self, fault: FaultLog, port: int, side: str) -> int:
        """Reset the TCP connections to (``to``), from or both ways of ``port``."""
        filters = []
        if side in ("to", "both"):  # the connecting side (DEALERs, clients)
            filters.append(["dst", "127.0.0.1", "dport", "=", f":{port}"])
        if side in ("from", "both"):  # the accepted side (ROUTER, edge server, relay)
            filters.append(["src", "127.0.0.1", "sport", "=", f":{port}"])
        killed = 0
        for condition in filters:
            process = await asyncio.create_subprocess_exec(
                "ss",
                "-K",
                "-t",
                "-H",
                *condition,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), 10)
            killed += len(out.splitlines())
            if process.returncode:
                fault.detail = f"ss failed: {err.decode().strip()} "
        return killed

    async def _client_drop(self) -> FaultLog:
        half_open = self.rng.random() < 0.5
        client = self.rng.choice(self.clients)  # not among the ready ones: a seed replays
        mode = "half open" if half_open else "abort"
        fault = FaultLog("client_drop", client.name, self.clock(), detail=mode)
        if not await client.wait_ready(5.0) or not await client.drop(half_open=half_open):
            fault.detail += "; not connected: skipped"
            return fault
        if not await client.wait_ready(15.0):
            fault.detail += "; not resumed within 15 s"
        return fault


def state_summary(state_path: Path) -> str:
    """The processes of a state file, one line."""
    processes = json.loads(state_path.read_text())["processes"]
    return ", ".join(f"{p['id']}={p['url']}" for p in processes)
