"""Publishes per second through the server API, and the servers' CPU per publish.

    .venv/bin/python -m bench.api_publish [--system dev|cluster] [--seconds 5]
        [--connections 8] [--members 2]

Starts ``signalpost dev`` (one process) or ``signalpost cluster`` (1 edge, 2 brokers with
replication, 1 presence; plaintext node links, no Consul), joins ``--members`` WebSocket
clients to one room, then publishes into the room for ``--seconds`` over ``--connections``
keep-alive HTTP/1.1 connections (one request at a time each, every publish with its own
idempotency key, a 60-byte ``data``), from this process. Reports publishes per second
(acknowledged by the room's owner), the latency of each (p50/p99), the servers' CPU (user
+ system of every server process, psutil) per publish, and checks that every member
received every publish exactly once. Figures: docs/performance.md ("The server API").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import websockets

from signalpost.api_keys import ALL_SCOPES, mint_api_key
from signalpost.auth import mint_token

SECRET = "api-bench-secret-0123456789abcdef-0123"
ROOM = "bench-room"


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _env(members: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNALPOST_")}
    env.update(
        SIGNALPOST_JWT_SECRET=SECRET,
        SIGNALPOST_RATE_PER_SECOND="1000000",
        SIGNALPOST_RATE_BURST="1000000",
        SIGNALPOST_ROOM_CAPACITY=str(max(2, members)),
    )
    return env


def start_dev(members: int) -> tuple[subprocess.Popen[bytes], str, list[psutil.Process]]:
    argv = [sys.executable, "-m", "signalpost.cli", "--log-level", "WARNING", "dev"]
    dev = subprocess.Popen(
        [*argv, "--port", "0"],
        env=_env(members),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert dev.stdout is not None
    found = re.search(r"(ws://\S+/v1/signal)", dev.stdout.readline().decode())
    assert found is not None, "signalpost dev printed no URL"
    return dev, found.group(1), [psutil.Process(dev.pid)]


def start_cluster(
    members: int, state: Path
) -> tuple[subprocess.Popen[bytes], str, list[psutil.Process]]:
    argv = [sys.executable, "-m", "signalpost.cli", "--log-level", "WARNING", "cluster"]
    argv += ["--edges", "1", "--brokers", "2", "--presence", "1", "--consul", "off"]
    argv += ["--insecure-node-links", "--state", str(state)]
    launcher = subprocess.Popen(
        argv, env=_env(members), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while not state.exists():
        if launcher.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("signalpost cluster did not start")
        time.sleep(0.1)
    processes = json.loads(state.read_text())["processes"]
    (edge,) = [p for p in processes if p["kind"] == "edge"]
    servers = [psutil.Process(p["pid"]) for p in processes]
    time.sleep(2)  # brokers see each other (replication on) before the room is made
    return launcher, edge["url"], servers


async def _http_publisher(
    host: str, port: int, key: str, until: float, latencies: list[float], tag: str
) -> int:
    """Publish sequentially on one keep-alive connection until ``until``; the count."""
    reader, writer = await asyncio.open_connection(host, port)
    done = 0
    try:
        while time.monotonic() < until:
            body = json.dumps(
                {
                    "data": {"n": done, "by": tag, "pad": "x" * 30},
                    "idempotency_key": f"{tag}-{done}",
                }
            ).encode()
            head = (
                f"POST /v1/api/rooms/{ROOM}/publish HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            started = time.perf_counter()
            writer.write(head + body)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            if b" 200 " not in status_line:
                raise SystemExit(f"publish refused: {status_line!r}")
            latencies.append(time.perf_counter() - started)
            done += 1
    finally:
        writer.close()
    return done


async def _drive(
    url: str, servers: list[psutil.Process], seconds: float, connections: int, members: int
) -> str:
    clients = []
    for n in range(members):
        ws = await websockets.connect(url, compression=None, max_queue=None)
        token = mint_token(SECRET, f"member-{n}", now=time.time())
        await ws.send(json.dumps({"type": "hello", "token": token}))
        await ws.recv()
        await ws.send(json.dumps({"type": "join", "id": 1, "room": ROOM}))
        while json.loads(await ws.recv()).get("type") != "joined":
            pass
        clients.append(ws)
    received = [0] * members
    seen: list[set[tuple[str, int]]] = [set() for _ in range(members)]

    async def receive(index: int) -> None:
        async for raw in clients[index]:
            frame = json.loads(raw)
            if frame.get("type") == "signal":
                data = frame["data"]
                seen[index].add((data["by"], data["n"]))
                received[index] += 1

    receivers = [asyncio.create_task(receive(i)) for i in range(members)]
    await asyncio.sleep(0.5)  # the peer-joined frames are out of the way
    key = mint_api_key(SECRET, "bench", ALL_SCOPES, now=time.time())
    host, port = re.match(r"ws://([^:/]+):(\d+)", url).groups()  # type: ignore[union-attr]
    latencies: list[float] = []
    cpu_before = _cpu(servers)
    started = time.monotonic()
    until = started + seconds
    counts = await asyncio.gather(
        *(
            _http_publisher(host, int(port), key, until, latencies, f"c{c}")
            for c in range(connections)
        )
    )
    elapsed = time.monotonic() - started
    published = sum(counts)
    deadline = time.monotonic() + 30
    while min(received) < published and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    cpu = _cpu(servers) - cpu_before
    for task in receivers:
        task.cancel()
    for ws in clients:
        await ws.close()
    exactly_once = all(
        r == published and len(s) == published for r, s in zip(received, seen, strict=True)
    )
    latencies.sort()
    p50 = statistics.median(latencies) * 1e3
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1e3
    return (
        f"{published / elapsed:,.0f} publishes/s ({published} in {elapsed:.1f} s, "
        f"{connections} connections), latency p50 {p50:.1f} ms p99 {p99:.1f} ms, "
        f"server CPU {cpu / published * 1e6:.0f} us per publish "
        f"({cpu / elapsed * 100:.0f}% of a core), {members} members each got every "
        f"publish once: {exactly_once}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=("dev", "cluster"), default="dev")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--members", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        if args.system == "dev":
            process, url, servers = start_dev(args.members)
        else:
            process, url, servers = start_cluster(args.members, Path(directory) / "state.json")
        try:
            line = asyncio.run(_drive(url, servers, args.seconds, args.connections, args.members))
            print(f"{args.system}: {line}", flush=True)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
            if process.stdout is not None:
                process.stdout.close()


if __name__ == "__main__":
    main()
