"""Run every benchmark side by side and write docs/performance.md with its plots.

    .venv/bin/python -m bench.run            # full run (~18 min), writes docs/
    .venv/bin/python -m bench.run --quick    # CI smoke (< 3 min), writes bench/results/quick/
    .venv/bin/python -m bench.run --only relay,calls --out /tmp/perf

Scenarios: ``relay`` (floor F vs dev vs cluster), ``calls`` (call setup vs Socket.IO: one
process for dev, two processes behind the Redis adapter for the cluster),
``idle`` (memory per idle connection), ``broker`` (RoomTable and a real broker over
ZeroMQ), ``presence`` (PresenceTable as the sessions it holds grow), ``growth`` (cost as
rooms and members grow), ``profile`` (py-spy on dev under load; full run only unless named
in ``--only``).

A system that cannot start (``signalpost cluster`` before it exists, Node without
``npm ci``) is skipped with the reason written into the report; any other failure is an
error and the exit status is 1, and so is a missing ``redis-server`` (scripts/setup.sh
installs it). Raw results: bench/results/<time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import broker_bench, presence_bench, report
from bench.experiments import zmq_shell
from bench.systems import (
    LOG_DIR,
    PYTHON,
    ROOT,
    GeneratorRun,
    Unavailable,
    run_generator,
    running,
)

RESULTS_DIR = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Profile:
    """How long and how big each scenario runs."""

    quick: bool
    duration: float  # measured seconds per run
    warmup: float
    relay_pairs: int
    relay_window: int
    call_slots: int
    idle_conns: int
    rooms_sweep: tuple[int, ...]
    members_sweep: tuple[int, ...]
    broker_count: int
    broker_seconds: float
    presence_sizes: tuple[int, ...]
    rounds: int

    @staticmethod
    def make(quick: bool) -> Profile:
        if quick:
            return Profile(
                quick=True,
                duration=2.5,
                warmup=1.0,
                relay_pairs=50,
                relay_window=4,
                call_slots=16,
                idle_conns=1000,
                rooms_sweep=(10, 1000),
                members_sweep=(2, 10),
                broker_count=50_000,
                broker_seconds=2.0,
                presence_sizes=(1000, 10_000),
                rounds=1,
            )
        return Profile(
            quick=False,
            duration=6.0,
            warmup=1.5,
            relay_pairs=50,
            relay_window=4,
            call_slots=32,
            idle_conns=10_000,
            rooms_sweep=(10, 100, 1000, 10_000),
            members_sweep=(2, 5, 10, 25, 50),
            broker_count=300_000,
            broker_seconds=8.0,
            presence_sizes=(1000, 10_000, 100_000),
            rounds=3,
        )


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def per_window(run: GeneratorRun, count: float) -> dict[str, float]:
    """Server CPU over the measured window: total, cores busy, microseconds per unit.

    ``other_cores`` is what the rest of the machine (neither the servers nor the
    generator) kept busy during the window, and ``steal_cores`` what the hypervisor took:
    both say how noisy the window was.
    """
    cpu, wall, _rss = run.window()
    gen_cpu = float(run.result.get("gen_cpu_s", 0.0))
    a, b = run.samples["measure"], run.samples["done"]
    host = b.host_busy - a.host_busy
    return {
        "server_cpu_s": cpu,
        "server_cores": cpu / wall if wall else 0.0,
        "gen_cores": gen_cpu / wall if wall else 0.0,
        "other_cores": max(0.0, (host - cpu - gen_cpu) / wall) if wall else 0.0,
        "steal_cores": (b.host_steal - a.host_steal) / wall if wall else 0.0,
        "cpu_us_per_unit": cpu / count * 1e6 if count else float("nan"),
        "processes": a.processes,
    }


def median_merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise median of several runs' results (nested dicts too); others from the first."""
    merged: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(first, bool) or not isinstance(first, int | float | dict):
            merged[key] = first
        elif isinstance(first, dict):
            dicts = [v for v in values if isinstance(v, dict) and v]
            merged[key] = median_merge(dicts) if dicts else first
        else:
            numbers = [v for v in values if isinstance(v, int | float)]
            merged[key] = statistics.median(numbers) if numbers else first
    return merged


def two_loads(
    p: Profile,
    scenario: str,
    systems: list[str],
    workload: str,
    options: list[str],
    unit: str,
    rate_key: str,
    rate_option: Callable[[float], list[str]],
) -> dict[str, Any]:
    """Each system at max load (closed loop) and at 50% of that (open loop), in rounds.

    Rounds interleave the systems (A B C, A B C, ...) so a burst of noise on the shared
    machine hits one round of each rather than all of one system; the report gives the
    field-wise median over rounds and keeps every round in ``rounds``.
    """
    out: dict[str, Any] = {"systems": {}, "skipped": {}, "rounds": p.rounds}
    rounds: dict[str, list[dict[str, Any]]] = {}
    labels: dict[str, str] = {}
    for round_number in range(p.rounds):
        for name in systems:
            if name in out["skipped"]:
                continue
            try:
                with running(name) as system:
                    labels[name] = system.label
                    top = run_generator(system, workload, options, timeout=180)
                    count = top.result[unit]
                    rate = top.result[rate_key]
                    half = run_generator(
                        system, workload, [*options, *rate_option(rate / 2)], timeout=180
                    )
                    top_window = per_window(top, count)
                    log(
                        f"{scenario}: {system.label} (round {round_number + 1}/{p.rounds}): "
                        f"{rate:,.1f} {unit}/s, {top_window['cpu_us_per_unit']:,.1f} us "
                        f"server CPU per {unit.rstrip('s')}"
                    )
                    rounds.setdefault(name, []).append(
                        {
                            "max": {**top.result, **top_window},
                            "half": {**half.result, **per_window(half, half.result[unit])},
                        }
                    )
            except Unavailable as exc:
                log(f"{scenario}: skipping {name}: {exc}")
                out["skipped"][name] = str(exc)
    for name, runs in rounds.items():
        out["systems"][name] = {
            "label": labels[name],
            "max": median_merge([r["max"] for r in runs]),
            "half": median_merge([r["half"] for r in runs]),
            "rounds": runs,
        }
    return out


# --------------------------------------------------------------------------- scenarios


def scenario_relay(p: Profile, systems: list[str]) -> dict[str, Any]:
    """Relay floor F vs signalpost dev vs cluster: throughput, CPU/message, latency at 50%."""
    options = [
        "--duration",
        str(p.duration),
        "--warmup",
        str(p.warmup),
        "--pairs",
        str(p.relay_pairs),
        "--window",
        str(p.relay_window),
    ]
    return two_loads(
        p,
        "relay",
        systems,
        "relay",
        options,
        "relayed",
        "relayed_per_s",
        lambda rate: ["--rate", f"{rate:.0f}"],
    )


def scenario_calls(p: Profile, systems: list[str]) -> dict[str, Any]:
    """Call setup (join, offer, answer, 2x12 candidates, leave): setups/s, CPU/call, p50/p99."""
    options = [
        "--duration",
        str(p.duration),
        "--warmup",
        str(p.warmup),
        "--slots",
        str(p.call_slots),
    ]
    return two_loads(
        p,
        "calls",
        systems,
        "calls",
        options,
        "calls",
        "calls_per_s",
        lambda rate: ["--rate", f"{rate:.1f}"],
    )


def scenario_idle(p: Profile, systems: list[str]) -> dict[str, Any]:
    """Server RSS per idle authenticated connection (compression off)."""
    out: dict[str, Any] = {"systems": {}, "skipped": {}, "conns": p.idle_conns}
    for name in systems:
        try:
            with running(name) as system:
                log(f"idle: {system.label}: {p.idle_conns} connections")
                run = run_generator(
                    system,
                    "idle",
                    ["--conns", str(p.idle_conns), "--concurrency", "200"],
                    timeout=600,
                )
                base, loaded = run.samples["baseline"], run.samples["loaded"]
                added = run.result["conns"] - run.result["baseline_conns"]
                per_conn = (loaded.rss - base.rss) / added if added else float("nan")
                log(f"idle: {system.label}: {per_conn / 1024:.1f} KiB/connection")
                out["systems"][name] = {
                    "label": system.label,
                    **run.result,
                    "rss_baseline": base.rss,
                    "rss_loaded": loaded.rss,
                    "processes": loaded.processes,
                    "bytes_per_conn": per_conn,
                    "bytes_per_conn_total": loaded.rss / run.result["conns"],
                }
        except Unavailable as exc:
            log(f"idle: skipping {name}: {exc}")
            out["skipped"][name] = str(exc)
    return out


def scenario_broker(p: Profile) -> dict[str, Any]:
    """RoomTable in process (best of 3), a real broker over ZeroMQ, the ZeroMQ shell cost."""
    out: dict[str, Any] = {}
    log("broker: RoomTable core (3 runs)")
    runs = [broker_bench.core(rooms=1000, count=p.broker_count) for _ in range(3)]
    out["core"] = {"rooms": runs[0]["rooms"], "commands": runs[0]["commands"]}
    for variant in ("handle", "step", "handle_no_gc"):
        measured = [r[variant] for r in runs if "commands_per_s" in r.get(variant, {})]
        out["core"][variant] = (
            max(measured, key=lambda m: m["commands_per_s"])
            if measured
            else runs[0].get(variant, {})
        )
    log("broker: zmq.asyncio vs drained sync shadow sockets (experiment)")
    out["zmq_shell"] = zmq_shell.main(count=30_000 if p.quick else 100_000)
    # One envelope per frame (the worst case), then frames as full as the edges' were.
    for key, batch in (("zmq", 1), ("zmq_batched", broker_bench.EDGE_BATCH)):
        try:
            broker = broker_bench.start_broker()  # fresh: the bench edge's seqs start over
        except Unavailable as exc:
            out["zmq_skipped"] = str(exc)
            return out
        try:
            log(f"broker: real broker process over ZeroMQ, {batch} envelope(s) per frame")
            out[key] = broker_bench.zmq_broker(
                broker.urls[0], rooms=200, seconds=p.broker_seconds, broker=broker, batch=batch
            )
        finally:
            broker.stop()
    return out


def scenario_presence(p: Profile) -> dict[str, Any]:
    """PresenceTable alone: CPU per status change, expiry tick and lost edge; bytes/session."""
    log(f"presence: PresenceTable core at {', '.join(map(str, p.presence_sizes))} sessions")
    return presence_bench.core(p.presence_sizes, rounds=3 if p.quick else 5)


def scenario_growth(p: Profile, systems: list[str]) -> dict[str, Any]:
    """Server CPU per delivered message as rooms grow (2 members) and members grow (10 rooms)."""
    out: dict[str, Any] = {"systems": {}, "skipped": {}}
    common = ["--duration", str(p.duration), "--warmup", str(p.warmup)]
    for name in systems:
        points: list[dict[str, Any]] = []
        try:
            with running(name, capacity=50) as system:
                sweep = [("rooms", r, 2, min(2 * r, 200)) for r in p.rooms_sweep]
                sweep += [("members", 10, m, 10 * m) for m in p.members_sweep]
                for axis, rooms, members, clients in sweep:
                    log(f"growth: {system.label}: {rooms} rooms x {members} members")
                    run = run_generator(
                        system,
                        "fanout",
                        [
                            *common,
                            "--rooms",
                            str(rooms),
                            "--members",
                            str(members),
                            "--clients",
                            str(clients),
                            "--window",
                            "4",
                        ],
                        timeout=300,
                    )
                    points.append(
                        {"axis": axis, **run.result, **per_window(run, run.result["delivered"])}
                    )
                out["systems"][name] = {"label": system.label, "points": points}
        except Unavailable as exc:
            log(f"growth: skipping {name}: {exc}")
            out["skipped"][name] = str(exc)
    return out


def scenario_profile(p: Profile, with_cluster: bool = True) -> dict[str, Any]:
    """py-spy on ``signalpost dev`` (relay and call load) and on a broker (ZeroMQ load)."""
    spy = ROOT / ".venv" / "bin" / "py-spy"
    if not spy.exists():
        spy_path = shutil.which("py-spy")
        if spy_path is None:
            return {"skipped": "py-spy is not installed (.venv/bin/pip install py-spy)"}
        spy = Path(spy_path)
    prof_dir = RESULTS_DIR / "profile"
    prof_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    seconds = 4 if p.quick else 10

    def record(pid: int, name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                str(spy),
                "record",
                "-p",
                str(pid),
                "-d",
                str(seconds),
                "-r",
                "250",
                "-f",
                "raw",
                "-o",
                str(prof_dir / f"{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    for workload, options in (
        ("relay", ["--pairs", "50", "--window", "4"]),
        ("calls", ["--slots", str(p.call_slots)]),
    ):
        with running("dev") as system:
            log(f"profile: signalpost dev under {workload} load ({seconds}s of py-spy)")
            spy_proc: subprocess.Popen[bytes] | None = None
            gen = subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "bench.loadgen",
                    workload,
                    "--no-wait",
                    "--url",
                    system.urls[0],
                    "--secret",
                    "signalpost-bench-secret-0123456789abcdef",
                    "--warmup",
                    "1",
                    "--duration",
                    str(seconds + 3),
                    *options,
                ],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                time.sleep(2.5)
                spy_proc = record(system.proc.pid, f"dev-{workload}")
                spy_proc.wait(seconds + 30)
                gen.wait(seconds + 60)
            finally:
                for child in (spy_proc, gen):
                    if child is not None and child.poll() is None:
                        child.kill()
            out[f"dev-{workload}"] = report.summarize_profile(prof_dir / f"dev-{workload}.txt")
    if with_cluster:
        try:
            with running("cluster") as system:
                edge_pids = [
                    int(p["pid"])
                    for p in system.info.get("processes", [])
                    if p.get("kind") == "edge" and p.get("pid")
                ]
                log(f"profile: a cluster edge under relay load ({seconds}s of py-spy)")
                gen = subprocess.Popen(
                    [
                        PYTHON,
                        "-m",
                        "bench.loadgen",
                        "relay",
                        "--no-wait",
                        "--secret",
                        "signalpost-bench-secret-0123456789abcdef",
                        "--warmup",
                        "1",
                        "--duration",
                        str(seconds + 3),
                        "--pairs",
                        "50",
                        "--window",
                        "4",
                        *[arg for url in system.urls for arg in ("--url", url)],
                    ],
                    cwd=ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                spy_proc = None
                try:
                    time.sleep(2.5)
                    spy_proc = record(edge_pids[0], "cluster-edge-relay")
                    spy_proc.wait(seconds + 30)
                    gen.wait(seconds + 60)
                finally:
                    for leftover in (spy_proc, gen):
                        if leftover is not None and leftover.poll() is None:
                            leftover.kill()
                out["cluster-edge-relay"] = report.summarize_profile(
                    prof_dir / "cluster-edge-relay.txt"
                )
        except (Unavailable, IndexError) as exc:
            out["cluster-edge-relay"] = {"skipped": f"cluster unavailable: {exc}"}
    try:
        broker = broker_bench.start_broker()
    except Unavailable as exc:
        out["broker"] = {"skipped": str(exc)}
        return out
    try:
        log("profile: broker under ZeroMQ load")
        spy_proc = record(broker.proc.pid, "broker")
        time.sleep(0.5)
        broker_bench.zmq_broker(
            broker.urls[0], rooms=200, seconds=seconds + 1, latency_samples=10, broker=broker
        )
        spy_proc.wait(seconds + 30)
        out["broker"] = report.summarize_profile(prof_dir / "broker.txt")
    finally:
        broker.stop()
    return out


# --------------------------------------------------------------------------- main

#: Same workload on variants of F and dev: what the suggested fixes would be worth.
RELAY_EXPERIMENTS = ("floor-coalesce", "floor-sansio", "dev-history32", "dev-gc")

ALL = ("relay", "calls", "idle", "broker", "presence", "growth", "profile")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="CI smoke: seconds per scenario")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument(
        "--out",
        help="directory for performance.md and plots "
        "(default: docs/, or bench/results/quick/ with --quick)",
    )
    parser.add_argument(
        "--no-cluster", action="store_true", help="skip signalpost cluster and its baseline"
    )
    parser.add_argument("--no-socketio", action="store_true", help="skip the Node baselines")
    args = parser.parse_args(argv)
    p = Profile.make(args.quick)
    wanted = (
        args.only.split(",")
        if args.only
        else [s for s in ALL if not (s == "profile" and args.quick)]
    )
    unknown = set(wanted) - set(ALL)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    out_dir = (
        Path(args.out) if args.out else (RESULTS_DIR / "quick" if args.quick else ROOT / "docs")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)

    cluster = [] if args.no_cluster else ["cluster"]
    socketio = [] if args.no_socketio else ["socketio"]
    # The cluster's baseline: Socket.IO scaled out the way its docs scale it. Quick mode
    # starts it only for idle memory (a few seconds): CI still fails without redis-server.
    socketio_cluster = [] if args.no_socketio or args.no_cluster else ["socketio-redis"]
    plan: dict[str, Callable[[], dict[str, Any]]] = {
        "relay": lambda: scenario_relay(
            p,
            ["floor", "dev", *cluster] + ([] if p.quick else [*socketio, *RELAY_EXPERIMENTS]),
        ),
        "calls": lambda: scenario_calls(
            p,
            ["dev", *cluster, *socketio]
            + ([] if p.quick else [*socketio_cluster, "floor", "floor-sansio"]),
        ),
        "idle": lambda: scenario_idle(
            p,
            ["dev", *cluster, *socketio_cluster] + ([] if p.quick else ["floor", *socketio]),
        ),
        "broker": lambda: scenario_broker(p),
        "presence": lambda: scenario_presence(p),
        "growth": lambda: scenario_growth(p, ["dev"] + ([] if p.quick else ["floor", *cluster])),
        "profile": lambda: scenario_profile(p, with_cluster=bool(cluster)),
    }
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": report.environment(quick=p.quick, profile=p.__dict__),
        "scenarios": {},
        "errors": {},
    }
    for name in wanted:
        t0 = time.monotonic()
        try:
            results["scenarios"][name] = plan[name]()
        except Exception as exc:  # record, keep going, fail at the end
            log(f"{name} FAILED: {exc}")
            results["errors"][name] = "".join(traceback.format_exception_only(exc)).strip()
            traceback.print_exc()
        results["scenarios"].setdefault(name, {})["seconds"] = time.monotonic() - t0
    results["meta"]["seconds"] = time.monotonic() - started

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    raw = RESULTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if p.quick else ''}.json"
    raw.write_text(json.dumps(results, indent=1, default=str))
    with contextlib.suppress(OSError):
        (RESULTS_DIR / "latest.json").write_text(raw.read_text())
    document = report.write(results, out_dir)
    log(
        f"wrote {document} and plots; raw results {raw.relative_to(ROOT)}; "
        f"{results['meta']['seconds']:.0f}s in all"
    )
    if results["errors"]:
        log(f"errors in: {', '.join(results['errors'])}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
