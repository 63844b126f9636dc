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
import contextlib
import importlib.util
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from signalpost.auth import turn_credentials
from tests.cluster.conftest import ClusterFactory
from tests.helpers import token

pytest.importorskip("aiortc", reason="aiortc is not installed (pip install aiortc)")

pytestmark = [pytest.mark.cluster, pytest.mark.coturn]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "aiortc_call.py"
MESSAGES = 5


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("aiortc_call", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["aiortc_call"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


aiortc_call = _load_example()


# --------------------------------------------------------------------------- coturn


@dataclass(frozen=True)
class Coturn:
    """A running coturn (fallback used when tests/conftest.py has no ``turnserver``)."""

    host: str
    port: int
    secrets: tuple[str, ...]
    realm: str
    min_port: int
    max_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"turn:{self.host}:{self.port}?transport=udp"


def _free_port() -> int:
    """A port free for both UDP and TCP on loopback (coturn listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def _stun_answers(host: str, port: int) -> bool:
    """True when a STUN Binding request gets a response (coturn is serving)."""
    request = struct.pack("!HHI", 0x0001, 0, 0x2112A442) + os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.sendto(request, (host, port))
            data = sock.recv(2048)
        except OSError:
            return False
    return data[:2] == b"\x01\x01" and data[8:20] == request[8:20]


@contextlib.contextmanager
def _run_coturn(tmp_path: Path, secrets: tuple[str, ...]) -> Iterator[Coturn]:
    binary = shutil.which("turnserver")
    if binary is None:
        pytest.skip("turnserver (Debian package coturn) is not installed")
    port = _free_port()
    min_port = random.randrange(50000, 64000, 100)
    workdir = tmp_path / "coturn"
    workdir.mkdir()
    server = Coturn(
        "127.0.0.1", port, secrets, "signalpost.test", min_port, min_port + 99, workdir / "turn.log"
    )
    command = [
        binary,
        "-n",
        "--listening-ip=127.0.0.1",
        "--relay-ip=127.0.0.1",
        f"--listening-port={port}",
        f"--min-port={server.min_port}",
        f"--max-port={server.max_port}",
        "--use-auth-secret",
        *(f"--static-auth-secret={secret}" for secret in secrets),
        f"--realm={server.realm}",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--fingerprint",
        # Both peers' relayed addresses are on 127.0.0.1: coturn refuses loopback peers
        # unless told otherwise (never do this in production).
        "--allow-loopback-peers",
        "--no-rfc5780",
        f"--userdb={workdir / 'turndb'}",
        f"--pidfile={workdir / 'turn.pid'}",
        f"--log-file={server.log_path}",
        "--simple-log",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _stun_answers(server.host, port):
            if process.poll() is not None or time.monotonic() > deadline:
                log = server.log_path.read_text() if server.log_path.exists() else ""
                pytest.fail(f"turnserver did not start (exit {process.poll()}):\n{log[-2000:]}")
            time.sleep(0.05)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def coturn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The shared ``turnserver`` fixture when tests/conftest.py has one, else our own.

    Either way: ``host``, ``port`` and ``secrets`` (every static-auth-secret coturn accepts).
    """
    try:
        shared = request.getfixturevalue("turnserver")
    except pytest.FixtureLookupError:
        with _run_coturn(tmp_path, ("turn-secret-old", "turn-secret-new")) as server:
            yield server
        return
    yield shared


def _log_mentions(path: Path, text: str, timeout: float = 5.0) -> bool:
    """Wait until ``text`` shows up in the log at ``path`` (blocking; run in a thread)."""
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _secrets(server: Any) -> list[str]:
    """Every static-auth-secret of ``server``, oldest first."""
    secrets = getattr(server, "secrets", None) or [server.secret]
    return [secrets] if isinstance(secrets, str) else list(secrets)


def _turn_url(server: Any) -> str:
    return f"turn:{server.host}:{server.port}?transport=udp"


def _relay_cluster(cluster_factory: ClusterFactory, server: Any, secret: str) -> list[str]:
    cluster = cluster_factory(
        edges=2,
        brokers=1,
        SIGNALPOST_TURN_SECRET=secret,
        SIGNALPOST_TURN_URLS=_turn_url(server),
        SIGNALPOST_STUN_URLS=f"stun:{server.host}:{server.port}",
        SIGNALPOST_TURN_TTL="600",
    )
    urls: list[str] = cluster.edge_urls
    assert len(urls) == 2
    return urls


# --------------------------------------------------------------------------- tests


async def test_relay_only_call_through_coturn(cluster_factory: ClusterFactory, coturn: Any) -> None:
    # The newest secret: coturn accepts all of its static-auth-secrets (rotation).
    secret = _secrets(coturn)[-1]
    edge1, edge2 = _relay_cluster(cluster_factory, coturn, secret)
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
        assert turn["urls"] == [_turn_url(coturn)]
        expiry, name = turn["username"].split(":", 1)
        assert name == user and 0 < int(expiry) - time.time() <= 600 + 5
        assert turn["credential"] == turn_credentials(secret, user, 0, int(expiry))[1]

    # Only relayed candidates were offered, and the nominated pair is relay <-> relay,
    # both ends on coturn's relay address.
    assert result.candidates == {"a": ["relay"], "b": ["relay"]}
    for pair in result.pairs.values():
        assert (pair.local_type, pair.remote_type) == ("relay", "relay"), pair
        for host, _port in (pair.local_address, pair.remote_address):
            assert host == coturn.host, pair
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
    cluster_factory: ClusterFactory, coturn: Any
) -> None:
    wrong = "not-" + _secrets(coturn)[-1]
    assert wrong not in _secrets(coturn)
    edge1, edge2 = _relay_cluster(cluster_factory, coturn, wrong)
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
    log_path = getattr(coturn, "log_path", None)
    if log_path is not None:  # our own coturn: its log names the refused user
        assert await asyncio.to_thread(_log_mentions, Path(log_path), "check_stun_auth")
    print(f"refused call failed in {elapsed:.2f} s: {failure.value}")
