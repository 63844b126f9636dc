"""Measure failover times on a real local cluster (docs/reliability.md quotes the output).

    .venv/bin/python scripts/failover_times.py [--runs 3]

For each run, starts ``signalpost cluster`` with the given heartbeat settings and measures:
- broker kill -9: longest gap between consecutive acks of a client signalling every 5 ms
  through the killed room owner (the stall clients see), and whether all arrived once;
- edge kill -9: time from the kill until the SDK resumed on the other edge and got
  ``recovered``;
- presence after edge kill -9: time until a watcher sees the killed edge's user offline.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from signalpost.auth import mint_token
from signalpost.client import (
    PeerJoined,
    PresenceChanged,
    Recovered,
    SignalEvent,
    SignalpostClient,
)
from signalpost.placement import owner

SECRET = "failover-measurement-secret-0123456789"


def start_cluster(
    state: Path, env: dict[str, str], consul: str = "on"
) -> tuple[subprocess.Popen[bytes], list[dict]]:
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "signalpost.cli",
            "cluster",
            "--edges",
            "2",
            "--brokers",
            "2",
            "--state",
            str(state),
            "--consul",
            consul,
        ],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not state.exists():
        if time.monotonic() > deadline or launcher.poll() is not None:
            raise SystemExit("cluster did not start")
        time.sleep(0.05)
    return launcher, json.loads(state.read_text())["processes"]


def token(user: str) -> str:
    return mint_token(SECRET, user, now=time.time())


async def broker_kill(processes: list[dict]) -> tuple[float, bool]:
    edges = [p["url"] for p in processes if p["kind"] == "edge"]
    brokers = {p["url"]: p for p in processes if p["kind"] == "broker"}
    room = "measure"
    doomed = brokers[owner(room, sorted(brokers))]
    async with (
        SignalpostClient(edges[0], token("a"), request_timeout=15) as a,
        SignalpostClient(edges[1], token("b"), request_timeout=15) as b,
    ):
        await a.join(room)
        await b.join(room)
        await a.next_event(PeerJoined)
        assert b.session
        acked_at = []
        for n in range(400):
            if n == 100:
                os.kill(doomed["pid"], signal.SIGKILL)
            await a.signal(room, {"n": n}, to=b.session)
            acked_at.append(time.monotonic())
            await asyncio.sleep(0.005)
        got = [(await b.next_event(SignalEvent, timeout=15)).data["n"] for _ in range(400)]
        gaps = [later - earlier for earlier, later in itertools.pairwise(acked_at)]
        return max(gaps), got == list(range(400))


async def edge_kill(processes: list[dict]) -> tuple[float, float]:
    edges = [p for p in processes if p["kind"] == "edge"]
    urls = [e["url"] for e in edges]
    async with SignalpostClient(urls[0], token("watcher")) as watcher:
        await watcher.watch(["mover"])
        mover = SignalpostClient([urls[1], urls[0]], token("mover"))
        await mover.connect()
        await mover.join("edge-room")
        await watcher.next_event(PresenceChanged)
        killed = time.monotonic()
        os.kill(edges[1]["pid"], signal.SIGKILL)
        await mover.next_event(Recovered, timeout=30)
        resumed = time.monotonic() - killed
        await mover.close()  # a clean close after resuming: offline at once
        offline_event = await watcher.next_event(PresenceChanged, timeout=60)
        assert offline_event.status == "offline"
        return resumed, time.monotonic() - killed


async def presence_after_edge_kill(processes: list[dict]) -> float:
    edges = [p for p in processes if p["kind"] == "edge"]
    async with SignalpostClient(edges[0]["url"], token("watcher2")) as watcher:
        await watcher.watch(["gone"])
        gone = SignalpostClient(edges[1]["url"], token("gone"), auto_resume=False)
        await gone.connect()
        await watcher.next_event(PresenceChanged)
        killed = time.monotonic()
        os.kill(edges[1]["pid"], signal.SIGKILL)
        await watcher.next_event(PresenceChanged, timeout=120)
        return time.monotonic() - killed


def run_once(env: dict[str, str], scenario: str, consul: str) -> object:
    with tempfile.TemporaryDirectory() as tmp:
        launcher, processes = start_cluster(Path(tmp) / "state.json", env, consul)
        try:
            if scenario == "broker":
                return asyncio.run(broker_kill(processes))
            if scenario == "edge":
                return asyncio.run(edge_kill(processes))
            return asyncio.run(presence_after_edge_kill(processes))
        finally:
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--heartbeat-interval", default="0.5")
    parser.add_argument("--liveness", default="6")
    parser.add_argument("--resume-window", default="30")
    parser.add_argument(
        "--consul",
        choices=["on", "off"],
        default="on",
        help="ownership by Consul's view or heartbeats",
    )
    parser.add_argument("--broker-only", action="store_true", help="only the broker kill")
    args = parser.parse_args()
    env = {
        "SIGNALPOST_JWT_SECRET": SECRET,
        "SIGNALPOST_HEARTBEAT_INTERVAL": args.heartbeat_interval,
        "SIGNALPOST_HEARTBEAT_LIVENESS": args.liveness,
        "SIGNALPOST_RESUME_WINDOW": args.resume_window,
        "SIGNALPOST_RATE_PER_SECOND": "100000",
        "SIGNALPOST_RATE_BURST": "100000",
    }
    stalls, exact, resumes, presence = [], [], [], []
    for _ in range(args.runs):
        stall, ok = run_once(env, "broker", args.consul)  # type: ignore[misc]
        stalls.append(stall)
        exact.append(ok)
        if args.broker_only:
            continue
        resumed, _ = run_once(env, "edge", args.consul)  # type: ignore[misc]
        resumes.append(resumed)
        presence.append(run_once(env, "presence", args.consul))
    print(
        f"settings: heartbeat {args.heartbeat_interval}s x liveness {args.liveness}, "
        f"resume window {args.resume_window}s, runs {args.runs}, consul {args.consul}"
    )
    print(
        f"broker kill -9, longest ack stall: median {statistics.median(stalls):.2f}s "
        f"max {max(stalls):.2f}s; exactly once in order: {all(exact)}"
    )
    if args.broker_only:
        return
    print(
        f"edge kill -9, resumed+recovered on the other edge: median "
        f"{statistics.median(resumes):.2f}s max {max(resumes):.2f}s"
    )
    print(
        f"edge kill -9, watcher sees offline: median {statistics.median(presence):.2f}s "
        f"max {max(presence):.2f}s"
    )


if __name__ == "__main__":
    main()
