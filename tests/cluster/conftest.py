"""Fixtures for cluster tests: ``signalpost cluster`` as real processes on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from signalpost.placement import owner
from signalpost.tickets import TICKET_SECRET_FILE
from tests.helpers import SECRET, close_raw_clients

START_TIMEOUT = 120.0  # the launcher bounds each step; this bounds the whole


def ticket_secret_of(keys_dir: Path) -> str:
    """The seat tickets' secret ``signalpost cluster`` gave its brokers and presence (a
    broker or presence node a test adds needs it too)."""
    return (keys_dir / TICKET_SECRET_FILE).read_text().strip()


@dataclass
class Cluster:
    """A running ``signalpost cluster`` and what its state file says."""

    launcher: subprocess.Popen[bytes]
    state_path: Path
    processes: list[dict[str, Any]] = field(default_factory=list)
    keys_dir: Path = Path()  # the cluster keys directory (node_keys): add a node's pair here

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [p for p in self.processes if p["kind"] == kind]

    @property
    def edge_urls(self) -> list[str]:
        return [p["url"] for p in self.of_kind("edge")]

    def kill(self, process_id: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one child (SIGKILL by default: a crash, no goodbye)."""
        (process,) = [p for p in self.processes if p["id"] == process_id]
        os.kill(process["pid"], sig)

    def alive(self, process_id: str) -> bool:
        (process,) = [p for p in self.processes if p["id"] == process_id]
        try:
            os.kill(process["pid"], 0)
        except ProcessLookupError:
            return False
        # A zombie still answers kill(0); its state in /proc says it is dead.
        stat = Path(f"/proc/{process['pid']}/stat").read_text()
        return stat.split(")")[-1].split()[0] != "Z"

    def reload(self) -> None:
        """Re-read the state file (``--restart`` rewrites it with new pids)."""
        self.processes = json.loads(self.state_path.read_text())["processes"]

    def pid(self, process_id: str) -> int:
        (process,) = [p for p in self.processes if p["id"] == process_id]
        pid: int = process["pid"]
        return pid

    def brokers(self) -> dict[str, str]:
        """Broker placement id (the endpoint edges hash) -> process id."""
        return {p["url"]: p["id"] for p in self.of_kind("broker")}

    def presence_owner_of(self, user: str) -> str:
        """The process id of the presence node that owns ``user`` while all are up."""
        nodes = {p["url"]: p["id"] for p in self.of_kind("presence")}
        node: str = nodes[owner(user, sorted(nodes))]
        return node

    def owner_of(self, room: str) -> str:
        """The process id of the broker that owns ``room`` while all brokers are up."""
        brokers = self.brokers()
        return brokers[owner(room, sorted(brokers))]

    def log(self, process_id: str) -> str:
        path = self.state_path.with_name(self.state_path.name + ".logs") / f"{process_id}.log"
        return path.read_text() if path.exists() else ""


ClusterFactory = Callable[..., Cluster]

#: Fast failure detection for tests: 0.2 s heartbeats, dead after 1 s.
FAST_ENV = {
    "SIGNALPOST_JWT_SECRET": SECRET,
    "SIGNALPOST_HEARTBEAT_INTERVAL": "0.2",
    "SIGNALPOST_HEARTBEAT_LIVENESS": "5",
    "SIGNALPOST_DRAIN_TIMEOUT": "3",
}


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[ClusterFactory]:
    """Start clusters; each is stopped (and every child reaped) at teardown."""
    started: list[Cluster] = []

    def start(
        edges: int = 2,
        brokers: int = 1,
        consul: str = "off",
        restart: bool = False,
        presence: int = 1,
        regions: str = "",
        wan_delay: str = "0ms",
        **env: str,
    ) -> Cluster:
        state_path = tmp_path / f"cluster-{len(started)}.json"
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "signalpost.cli",
                "cluster",
                "--edges",
                str(edges),
                "--brokers",
                str(brokers),
                "--presence",
                str(presence),
                "--state",
                str(state_path),
                "--consul",
                consul,
                *(["--restart"] if restart else []),
                *(["--regions", regions, "--wan-delay", wan_delay] if regions else []),
            ],
            env={**os.environ, **FAST_ENV, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        cluster = Cluster(launcher, state_path)
        started.append(cluster)
        deadline = time.monotonic() + START_TIMEOUT
        while not state_path.exists():
            if launcher.poll() is not None:
                stderr = launcher.stderr.read().decode() if launcher.stderr else ""
                pytest.fail(f"signalpost cluster exited {launcher.returncode}: {stderr}")
            if time.monotonic() > deadline:
                pytest.fail("signalpost cluster did not become ready")
            time.sleep(0.05)
        state = json.loads(state_path.read_text())
        cluster.processes = state["processes"]
        cluster.keys_dir = Path(state["keys_dir"])
        return cluster

    yield start
    for cluster in started:
        if cluster.launcher.poll() is None:
            cluster.launcher.send_signal(signal.SIGTERM)
            try:
                cluster.launcher.wait(20)
            except subprocess.TimeoutExpired:
                cluster.launcher.kill()
                cluster.launcher.wait()
        for process in cluster.processes:  # nothing may outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(process["pid"], signal.SIGKILL)
        if cluster.launcher.stderr is not None:
            cluster.launcher.stderr.close()


@pytest.fixture(autouse=True)
async def _close_raw_clients() -> AsyncIterator[None]:
    yield
    await close_raw_clients()
