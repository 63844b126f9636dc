"""Run a real Consul agent (``consul agent -dev``) on loopback ports of its own, restartably."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from signalpost.cluster import free_port
from tests.binaries import require_binary


class ConsulAgent:
    """A dev-mode Consul agent; ``kill()`` and ``start()`` again keep the same ports.

    With ``master_token``, ACLs are on with ``default_policy = "deny"`` (Consul 1.8
    syntax): that token may do anything (the agent uses it for its own node too), no
    token nothing; this helper's own calls send it.
    """

    def __init__(
        self,
        workdir: Path,
        master_token: str | None = None,
        datacenter: str | None = None,
        join_wan: int | None = None,
    ) -> None:
        """``datacenter``: its name (a region); ``join_wan``: the WAN serf port of another
        datacenter's agent to federate with."""
        self.binary = require_binary("consul")
        self.workdir = workdir
        self.master_token = master_token
        self.datacenter = datacenter
        self.join_wan = join_wan
        self.http_port = free_port()
        self.ports = {
            "http": self.http_port,
            "serf-lan": free_port(),
            "serf-wan": free_port(),
            "server": free_port(),
            "dns": -1,
            "grpc": -1,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the agent and wait until it has a leader (it can take registrations)."""
        self.starts += 1
        log = (self.workdir / f"consul-{self.starts}.log").open("wb")
        data_dir = self.workdir / f"data-{self.starts}"
        acl: list[str] = []
        if self.master_token is not None:
            config = self.workdir / "acl.hcl"
            config.write_text(
                'acl {\n  enabled = true\n  default_policy = "deny"\n'
                f'  tokens {{\n    master = "{self.master_token}"\n'
                f'    agent = "{self.master_token}"\n  }}\n}}\n'
            )
            acl = [f"-config-file={config}"]
        self.process = subprocess.Popen(
            [
                self.binary,
                "agent",
                "-dev",
                "-bind=127.0.0.1",
                "-client=127.0.0.1",
                f"-data-dir={data_dir}",
                *(f"-{name}-port={port}" for name, port in self.ports.items()),
                *acl,
                *([f"-datacenter={self.datacenter}"] if self.datacenter else []),
                *([f"-node=consul-{self.datacenter}"] if self.datacenter else []),
                *([f"-retry-join-wan=127.0.0.1:{self.join_wan}"] if self.join_wan else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"consul exited {self.process.returncode}")
            try:
                if self.get("/v1/status/leader"):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        pytest.fail("consul did not elect a leader")

    def kill(self) -> None:
        """SIGKILL: a crash; a dev agent comes back with no state at all."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        """One HTTP API call (with ``token``, else the master token if any); its JSON."""
        token = token if token is not None else self.master_token
        request = urllib.request.Request(
            f"http://{self.address}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"X-Consul-Token": token} if token else {},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"null")

    def passing(self, kind: str) -> dict[str, str]:
        """``{service id: endpoint}`` of the healthy ``signalpost-<kind>`` instances."""
        entries = self.get(f"/v1/health/service/signalpost-{kind}?passing=1")
        return {e["Service"]["ID"]: e["Service"]["Meta"]["endpoint"] for e in entries}

    def registered(self, kind: str) -> set[str]:
        """Ids of every ``signalpost-<kind>`` instance in the catalog, healthy or not."""
        return {e["ServiceID"] for e in self.get(f"/v1/catalog/service/signalpost-{kind}")}

    def wait_for(self, check: Any, timeout: float = 20.0) -> float:
        """Poll ``check()`` until true; returns the seconds it took (fails after timeout)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if check():
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.1)
        pytest.fail(
            f"Consul never showed what was expected within {timeout} s; it shows: "
            + self.describe()
        )

    def describe(self) -> str:
        """Every check the agent runs and its status and output (for a failure message)."""
        try:
            checks = self.get("/v1/agent/checks") or {}
        except OSError as exc:
            return f"(no answer: {exc})"
        return (
            "; ".join(
                f"{c.get('ServiceID') or c.get('CheckID')}: {c.get('Status')} "
                f"({(c.get('Output') or '').strip()[:120]})"
                for c in checks.values()
            )
            or "(no checks)"
        )
