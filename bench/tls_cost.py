"""What TLS on the edge costs: ``signalpost dev`` with and without a certificate.

    .venv/bin/python -m bench.tls_cost [--rounds 2] [--connections 200] [--signals 20000]

Per round and mode (ws, then wss with a fresh self-signed ECDSA P-256 certificate): the
edge CPU (user + system, psutil) per connection with its hello, over sequential
connections, and per signal relayed between two clients of one room. The clients are
``websockets`` in this process. Figures: docs/configuration.md ("TLS on the edge").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import websockets

from signalpost.auth import mint_token
from tests.tls_certs import CertFiles, make_cert

SECRET = "tls-cost-secret-0123456789abcdef"


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def measure(tls: CertFiles | None, connections: int, signals: int) -> str:
    """One ``signalpost dev`` run: ws when ``tls`` is None, else wss with it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNALPOST_")}
    env.update(
        SIGNALPOST_JWT_SECRET=SECRET,
        SIGNALPOST_RATE_PER_SECOND="1000000",
        SIGNALPOST_RATE_BURST="1000000",
    )
    if tls is not None:
        env.update(SIGNALPOST_TLS_CERT_FILE=str(tls.cert), SIGNALPOST_TLS_KEY_FILE=str(tls.key))
    argv = [sys.executable, "-m", "signalpost.cli", "--log-level", "WARNING", "dev"]
    dev = subprocess.Popen(
        [*argv, "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert dev.stdout is not None
        found = re.search(r"(wss?://\S+/v1/signal)", dev.stdout.readline().decode())
        assert found is not None, "signalpost dev printed no URL"
        url = found.group(1).replace("127.0.0.1", "localhost")
        options: dict[str, Any] = {"compression": None}
        if tls is not None:
            options["ssl"] = tls.client_context()
        edge = psutil.Process(dev.pid)
        per_connection, per_signal = asyncio.run(_drive(url, options, edge, connections, signals))
    finally:
        dev.send_signal(signal.SIGTERM)
        dev.wait(30)
        if dev.stdout is not None:
            dev.stdout.close()
    mode = "wss" if tls is not None else "ws "
    return (
        f"{mode}: {per_connection:.2f} ms edge CPU per connection+hello, "
        f"{per_signal:.1f} us edge CPU per relayed signal"
    )


async def _drive(
    url: str, options: dict[str, Any], edge: psutil.Process, connections: int, signals: int
) -> tuple[float, float]:
    """(edge CPU ms per connection with its hello, edge CPU us per relayed signal)."""
    token = mint_token(SECRET, "u", now=time.time(), ttl=3600)

    async def hello(ws: Any) -> None:
        await ws.send(json.dumps({"type": "hello", "token": token}))
        await ws.recv()

    start = _cpu(edge)
    for _ in range(connections):
        async with websockets.connect(url, **options) as ws:
            await hello(ws)
    per_connection = (_cpu(edge) - start) / connections * 1e3

    a = await websockets.connect(url, **options)
    b = await websockets.connect(url, **options)
    for ws in (a, b):
        await hello(ws)
        await ws.send(json.dumps({"type": "join", "id": 1, "room": "r"}))
        await ws.recv()
    await a.recv()  # peer-joined
    frame = json.dumps({"type": "signal", "room": "r", "data": {"sdp": "x" * 200}})

    async def send() -> None:
        for _ in range(signals):
            await a.send(frame)

    async def receive() -> None:
        got = 0
        while got < signals:
            if '"signal"' in str(await b.recv()):
                got += 1

    start = _cpu(edge)
    await asyncio.gather(send(), receive())
    per_signal = (_cpu(edge) - start) / signals * 1e6
    await a.close()
    await b.close()
    return per_connection, per_signal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--signals", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        cert = make_cert(Path(directory), "edge")
        for _ in range(args.rounds):
            for tls in (None, cert):
                print(measure(tls, args.connections, args.signals), flush=True)


if __name__ == "__main__":
    main()
