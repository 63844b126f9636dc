"""Run a real coturn ``turnserver`` on loopback for the tests (Debian package ``coturn``)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.binaries import require_binary


@dataclass(frozen=True)
class Coturn:
    """A running coturn that accepts TURN REST credentials signed with any of ``secrets``."""

    host: str
    port: int
    #: Every static-auth-secret coturn accepts, oldest first (rotation: issue with the last).
    secrets: tuple[str, ...]
    realm: str
    min_port: int
    max_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"turn:{self.host}:{self.port}?transport=udp"

    @property
    def stun_url(self) -> str:
        return f"stun:{self.host}:{self.port}"


def free_udp_tcp_port() -> int:
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


def stun_answers(host: str, port: int) -> bool:
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
def run_coturn(
    workdir: Path, secrets: tuple[str, ...], config: Path | None = None
) -> Iterator[Coturn]:
    """Start ``turnserver`` with ``--use-auth-secret`` and every secret in ``secrets``.

    With ``config``, coturn reads that file first; the loopback listening/relay options
    given here on the command line take precedence over it.
    """
    binary = require_binary("turnserver")
    port = free_udp_tcp_port()
    # A small relay range of its own, so parallel runs rarely collide.
    min_port = random.randrange(50000, 64000, 100)
    workdir.mkdir(parents=True, exist_ok=True)
    server = Coturn(
        "127.0.0.1", port, secrets, "signalpost.test", min_port, min_port + 99, workdir / "turn.log"
    )
    command = [
        binary,
        *(["-c", str(config)] if config is not None else ["-n"]),
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
        while not stun_answers(server.host, port):
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
