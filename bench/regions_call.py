"""Call setup inside a region and across regions, over an emulated WAN.

Starts ``signalpost cluster --regions eu,us --wan-delay <delay>`` (one edge, one broker and
one presence node per region, Consul per region), then alternates real WebRTC calls
(aiortc peers, ``examples/aiortc_call.py``: join, offer, answer, trickled candidates, a
data channel open both ways) in fresh rooms:

- *inside eu*: both peers on eu's edge (the room is homed in eu);
- *across*: the caller on eu's edge (first member: the room is homed in eu), the callee on
  us's edge: its join, answer and candidates cross to eu's broker, what it is sent
  crosses back.

For each call: the setup time (first join to both data channels open) and the bytes that
crossed the WAN (both regions' relays, ``--stats``), beside the bytes that cross while no
call runs (the links' heartbeats) over the same time. Media go over loopback, not through
the relay: only signalling is delayed.

    .venv/bin/python -m bench.regions_call --calls 5 --wan-delay 40ms
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from signalpost.auth import mint_token
from signalpost.wan_relay import parse_delay

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-regions-secret-0123456789abcdef"


def _example() -> ModuleType:
    path = ROOT / "examples" / "aiortc_call.py"
    spec = importlib.util.spec_from_file_location("aiortc_call", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["aiortc_call"] = module
    spec.loader.exec_module(module)
    return module


def _start(state: Path, delay: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SIGNALPOST_JWT_SECRET": SECRET, "SIGNALPOST_ROOM_CAPACITY": "2"}
    argv = [sys.executable, "-m", "signalpost.cli", "--log-level", "WARNING", "cluster"]
    argv += ["--edges", "1", "--brokers", "1", "--presence", "1", "--consul", "on"]
    argv += ["--regions", "eu,us", "--wan-delay", delay, "--state", str(state)]
    launcher = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not state.exists():
        if launcher.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the two-region cluster did not start")
        time.sleep(0.2)
    return launcher


def _crossed(stats: list[Path]) -> int:
    """Bytes both relays have moved so far (each direction)."""
    total = 0
    for path in stats:
        try:
            for pair in json.loads(path.read_text()):
                total += int(pair["to_target"]) + int(pair["from_target"])
        except (OSError, ValueError):
            pass
    return total


async def _call(
    example: ModuleType, caller: str, callee: str, room: str, stats: list[Path]
) -> tuple[float, int, float]:
    before, started = _crossed(stats), time.monotonic()

    def token(user: str) -> str:
        return mint_token(SECRET, user, now=time.time())

    result = await example.run_call(
        caller, callee, room, token("alice"), token("bob"), messages=3, timeout=30
    )
    await asyncio.sleep(0.6)  # the relays' stats file is rewritten every 0.5 s
    return float(result.setup_seconds), _crossed(stats) - before, time.monotonic() - started


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    example = _example()
    workdir = Path(tempfile.mkdtemp(prefix="signalpost-regions-bench-"))
    state = workdir / "cluster.json"
    launcher = _start(state, args.wan_delay)
    try:
        processes = json.loads(state.read_text())["processes"]
        edge = {p["region"]: p["url"] for p in processes if p["kind"] == "edge"}
        logs = state.with_name(state.name + ".logs")
        stats = [logs / f"{region}-wan-relay.json" for region in ("eu", "us")]
        # Warm up: the us edge learns eu's brokers (Consul ?dc=, links over the WAN).
        await _call(example, edge["eu"], edge["us"], "warm-across", stats)
        await _call(example, edge["eu"], edge["eu"], "warm-inside", stats)
        idle_before, idle_started = _crossed(stats), time.monotonic()
        await asyncio.sleep(3.0)
        idle_rate = (_crossed(stats) - idle_before) / (time.monotonic() - idle_started)
        rows: dict[str, list[tuple[float, int, float]]] = {"inside eu": [], "across": []}
        for n in range(args.calls):
            rows["inside eu"].append(await _call(example, edge["eu"], edge["eu"], f"in-{n}", stats))
            rows["across"].append(await _call(example, edge["eu"], edge["us"], f"x-{n}", stats))
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(30)
        except subprocess.TimeoutExpired:
            launcher.kill()
    one_way = parse_delay(args.wan_delay)
    inside = statistics.median(s for s, _, _ in rows["inside eu"])
    report: dict[str, Any] = {
        "wan_delay_ms": one_way * 1000,
        # The call script's path: the callee's join and its answer (1 round trip), the
        # offer sent once the join is answered and its answer back (1 more), on top of
        # what a call inside the region takes (docs/multi-region.md)
        "floor_across_ms": round((inside + 4 * one_way) * 1000, 1),
        "idle_bytes_per_s": round(idle_rate),
    }
    for name, calls in rows.items():
        report[name] = {
            "setup_ms": sorted(round(s * 1000, 1) for s, _, _ in calls),
            "setup_ms_median": round(statistics.median(s for s, _, _ in calls) * 1000, 1),
            "bytes_crossed": [b for _, b, _ in calls],
            "bytes_crossed_less_idle": [round(b - idle_rate * t) for _, b, t in calls],
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--wan-delay", default="40ms")
    args = parser.parse_args()
    report = asyncio.run(measure(args))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
