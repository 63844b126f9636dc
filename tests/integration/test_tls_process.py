"""TLS in real ``signalpost dev`` and ``signalpost edge`` processes: SIGHUP swaps the
certificate for new handshakes while a connection opened before keeps exchanging messages;
bad files on a reload keep the old certificate and the process; bad settings at start-up
are a clear error (exit 2), not a traceback."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

from signalpost.cluster import free_port
from tests.helpers import SECRET, RawClient, token
from tests.tls_certs import CertFiles, make_cert, peer_fingerprint

CLI = [sys.executable, "-m", "signalpost.cli"]


def _env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIGNALPOST_")}
    return {**clean, "SIGNALPOST_JWT_SECRET": SECRET, **extra}


class Process:
    """A signalpost process whose stderr (its log) goes to a file the test reads."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [*CLI, *args], env=env, stdout=subprocess.PIPE, stderr=self._log
        )

    def first_line(self) -> str:
        """What it printed first (its URL); "" and a failure if it exited instead."""
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline().decode()
        assert line, f"no output; log: {self.log()}"
        return line

    def log(self) -> str:
        return self.log_path.read_text()

    async def wait_log(self, pattern: str, count: int = 1, timeout: float = 10.0) -> None:
        """Until ``pattern`` appears ``count`` times in the log."""
        async with asyncio.timeout(timeout):
            while len(re.findall(pattern, self.log())) < count:
                assert self.popen.poll() is None, f"the process died: {self.log()}"
                await asyncio.sleep(0.05)

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
        self._log.close()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return code


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[Path, Path, CertFiles, CertFiles]]:
    """The edge's cert and key paths (holding ``first``), and two certificates."""
    first, second = make_cert(tmp_path, "first"), make_cert(tmp_path, "second")
    cert, key = tmp_path / "edge.crt", tmp_path / "edge.key"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    yield cert, key, first, second


def _tls_env(cert: Path, key: Path) -> dict[str, str]:
    return _env(SIGNALPOST_TLS_CERT_FILE=str(cert), SIGNALPOST_TLS_KEY_FILE=str(key))


async def _client(url: str, user: str, files: CertFiles) -> RawClient:
    ws = await websockets.connect(url, ssl=files.client_context())
    client = RawClient(ws)
    await client.send({"type": "hello", "token": token(user)})
    client.welcome = await client.recv_type("welcome")
    client.session = client.welcome["session"]
    return client


async def _fingerprint(port: int) -> str:
    return await asyncio.to_thread(peer_fingerprint, "127.0.0.1", port)


async def test_sighup_swaps_the_certificate_of_a_dev_process_without_dropping_anyone(
    tmp_path: Path, files: tuple[Path, Path, CertFiles, CertFiles]
) -> None:
    cert, key, first, second = files
    dev = Process(["dev", "--port", "0"], _tls_env(cert, key), tmp_path / "dev.log")
    try:
        line = dev.first_line()
        match = re.search(r"wss://127\.0\.0\.1:(\d+)/v1/signal", line)
        assert match is not None and "https://127.0.0.1:" in line, line
        port = int(match.group(1))
        url = f"wss://localhost:{port}/v1/signal"
        assert await _fingerprint(port) == first.fingerprint
        before = await _client(url, "alice", first)
        assert (await before.request({"type": "join", "id": 1, "room": "r"}))["type"] == "joined"

        cert.write_bytes(second.cert.read_bytes())
        key.write_bytes(second.key.read_bytes())
        dev.popen.send_signal(signal.SIGHUP)
        await dev.wait_log("TLS certificate .* reloaded")
        assert await _fingerprint(port) == second.fingerprint
        # A client that trusts only the second certificate gets in now.
        after = await _client(url, "bob", second)
        assert (await after.request({"type": "join", "id": 1, "room": "r"}))["type"] == "joined"
        await before.recv_type("peer-joined")
        await before.send({"type": "signal", "id": 2, "room": "r", "data": {"n": 1}})
        assert (await after.recv_type("signal"))["data"] == {"n": 1}

        # Bad files: an error in the log; the process, the second certificate and both
        # connections stay.
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        dev.popen.send_signal(signal.SIGHUP)
        await dev.wait_log("ERROR .*TLS reload failed, still serving the previous certificate")
        cert.write_bytes(first.cert.read_bytes())  # with the second's key: no pair
        dev.popen.send_signal(signal.SIGHUP)
        await dev.wait_log("TLS reload failed", count=2)
        assert "the key does not belong to the certificate" in dev.log()
        assert dev.popen.poll() is None
        assert await _fingerprint(port) == second.fingerprint
        await after.send({"type": "signal", "id": 2, "room": "r", "data": {"n": 2}})
        await before.recv_type("ack")
        assert (await before.recv_type("signal"))["data"] == {"n": 2}
        await after.recv_type("ack")
        await before.close()
        await after.close()
    finally:
        code = dev.stop()
    assert code == 0, dev.log()
    assert "Traceback" not in dev.log()


async def test_sighup_reloads_an_edge_process(
    tmp_path: Path, files: tuple[Path, Path, CertFiles, CertFiles]
) -> None:
    cert, key, first, second = files
    port = free_port()
    env = _tls_env(cert, key)
    env["SIGNALPOST_BROKER_ENDPOINTS"] = f"tcp://127.0.0.1:{free_port()}"  # nobody there
    env["SIGNALPOST_PRESENCE_ENDPOINT"] = f"tcp://127.0.0.1:{free_port()}"
    args = ["edge", "--id", "edge-tls", "--insecure-node-links", "--port", str(port)]
    edge = Process(args, env, tmp_path / "edge.log")
    try:
        line = edge.first_line()
        assert f"ready on wss://127.0.0.1:{port}/v1/signal" in line, line
        assert await _fingerprint(port) == first.fingerprint
        cert.write_bytes(second.cert.read_bytes())
        key.write_bytes(second.key.read_bytes())
        edge.popen.send_signal(signal.SIGHUP)
        await edge.wait_log("TLS certificate .* reloaded")
        assert await _fingerprint(port) == second.fingerprint
        assert edge.popen.poll() is None
    finally:
        code = edge.stop()
    assert code == 0, edge.log()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("kind", ["dev", "edge", "cluster"])
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("cert-only", "tls_cert_file is set but tls_key_file is not"),
        ("key-only", "tls_key_file is set but tls_cert_file is not"),
        ("missing", "cannot read tls_cert_file"),
        ("mismatch", "the key does not belong to the certificate"),
    ],
)
def test_bad_tls_settings_stop_the_process_with_a_clear_error(
    tmp_path: Path,
    files: tuple[Path, Path, CertFiles, CertFiles],
    kind: str,
    setting: str,
    message: str,
) -> None:
    cert, key, _, second = files
    env = {
        "cert-only": {"SIGNALPOST_TLS_CERT_FILE": str(cert)},
        "key-only": {"SIGNALPOST_TLS_KEY_FILE": str(key)},
        "missing": {
            "SIGNALPOST_TLS_CERT_FILE": str(cert.with_name("absent.crt")),
            "SIGNALPOST_TLS_KEY_FILE": str(key),
        },
        "mismatch": {
            "SIGNALPOST_TLS_CERT_FILE": str(cert),
            "SIGNALPOST_TLS_KEY_FILE": str(second.key),
        },
    }[setting]
    args = {
        "dev": ["dev", "--port", "0"],
        "edge": ["edge", "--insecure-node-links"],
        "cluster": ["cluster", "--insecure-node-links", "--state", str(tmp_path / "c.json")],
    }[kind]
    done = _cli(*args, env=_env(**env))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_the_files_can_be_given_as_flags(files: tuple[Path, Path, CertFiles, CertFiles]) -> None:
    cert, _, _, second = files
    done = _cli("dev", "--port", "0", "--tls-cert", str(cert), env=_env())
    assert done.returncode == 2 and "tls_key_file is not" in done.stderr, done.stderr
    done = _cli(
        "dev", "--port", "0", "--tls-cert", str(cert), "--tls-key", str(second.key), env=_env()
    )
    assert done.returncode == 2 and "does not belong" in done.stderr, done.stderr
