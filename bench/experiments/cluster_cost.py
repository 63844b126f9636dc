"""CPU per relayed message (or per call) of each cluster process, old tree against new.

Starts ``signalpost cluster --edges 2 --brokers 1`` from each source tree in turn
(alternating, ``--rounds`` times), drives it with ``bench.loadgen`` at a fixed rate, and
prints the CPU each process kind (broker, edges, presence) spent per relayed message in
the measured window. Side by side in one run, since this machine is shared and noisy::

    .venv/bin/python -m bench.experiments.cluster_cost --tree old=/work/wt-old \\
        --tree new=. --rate 8000 --rounds 3
    .venv/bin/python -m bench.experiments.cluster_cost --tree new=. --workload calls \\
        --rate 60

Each tree runs with ``PYTHONPATH`` set to it (the loadgen always runs from this tree).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.systems import JWT_SECRET, SIGNALPOST, server_env

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def _cpu(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def _start(
    tree: str, state: Path, dev: bool, extra: list[str]
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    # ``tree`` is a PYTHONPATH (its first entry the source tree, also the working dir)
    env = server_env(
        capacity=2,
        extra={
            "PYTHONPATH": str(Path(tree.split(":")[0]).resolve())
            + "".join(":" + p for p in tree.split(":")[1:])
        },
    )
    if dev:
        argv = [SIGNALPOST, "--log-level", "WARNING", "dev", "--host", "127.0.0.1", "--port", "0"]
        proc = subprocess.Popen(
            argv, cwd=tree.split(":")[0], env=env, text=True, stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("signalpost dev:"):
                url = line.split()[-1]
                return proc, {"processes": [{"kind": "edge", "pid": proc.pid, "url": url}]}
        raise SystemExit(f"dev from {tree} did not start")
    argv = [SIGNALPOST, "--log-level", "WARNING", "cluster"]
    argv += ["--edges", "2", "--brokers", "1", "--state", str(state), "--consul", "off"]
    argv += extra
    proc = subprocess.Popen(
        argv, cwd=tree.split(":")[0], env=env, text=True, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        try:
            document: dict[str, Any] = json.loads(state.read_text())
        except (OSError, ValueError):
            time.sleep(0.2)
            continue
        edges = [p for p in document.get("processes", []) if p.get("kind") == "edge"]
        if len(edges) >= 2 and all(p.get("url") for p in edges):
            time.sleep(2.0)
            return proc, document
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"cluster from {tree} did not start")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait(5)


def _spy(kinds: dict[int, str], args: argparse.Namespace) -> list[subprocess.Popen[bytes]]:
    """py-spy on each server process for the window (collapsed stacks, by kind and pid)."""
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    spy = str(Path(PYTHON).parent / "py-spy")
    return [
        subprocess.Popen(
            [
                spy,
                "record",
                "-r",
                "250",
                "-d",
                str(int(args.seconds)),
                "-f",
                "raw",
                "-o",
                str(out / f"{kind}-{pid}.txt"),
                "-p",
                str(pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid, kind in kinds.items()
        if kind in ("edge", "broker")
    ]


def _strace(kinds: dict[int, str], args: argparse.Namespace) -> list[subprocess.Popen[bytes]]:
    """strace -c on each server process (all threads) for the window: syscalls per kind."""
    out = Path(args.syscalls)
    out.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                *("timeout", "-s", "INT", str(args.seconds)),
                *("strace", "-c", "-f", "-p", str(pid), "-o", str(out / f"{kind}-{pid}.txt")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid, kind in kinds.items()
        if kind in ("edge", "broker")
    ]


def measure(name: str, tree: str, args: argparse.Namespace) -> dict[str, float]:
    state = Path(f"/tmp/cluster-cost-{os.getpid()}.json")
    state.unlink(missing_ok=True)
    extra = ["--insecure-node-links"] if name in args.insecure else []
    proc, document = _start(tree, state, args.dev, extra)
    try:
        urls = [
            p["url"].rstrip("/") + ("" if p["url"].endswith("/v1/signal") else "/v1/signal")
            for p in document["processes"]
            if p.get("kind") == "edge"
        ]
        kinds = {int(p["pid"]): p["kind"] for p in document["processes"] if p.get("pid")}
        gen = [PYTHON, "-m", "bench.loadgen", args.workload, "--secret", JWT_SECRET]
        for url in urls:
            gen += ["--url", url]
        gen += ["--duration", str(args.seconds), "--warmup", "1.5"]
        if args.rate:
            gen += ["--rate", str(args.rate)]
        if args.workload == "relay":
            gen += ["--pairs", str(args.pairs)]
        else:
            gen += ["--slots", str(args.slots)]
        loadgen = subprocess.Popen(
            gen, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert loadgen.stdin is not None and loadgen.stdout is not None
        before: dict[int, float] = {}
        result: dict[str, Any] = {}
        for line in loadgen.stdout:
            if line.startswith("READY"):
                if "measure" in line or "window" in line or not before:
                    before = {pid: _cpu(pid) for pid in kinds}
                    spies = _spy(kinds, args) if args.profile else []
                    spies += _strace(kinds, args) if args.syscalls else []
                loadgen.stdin.write("GO\n")
                loadgen.stdin.flush()
            elif line.startswith("DONE"):
                after = {pid: _cpu(pid) for pid in kinds}
                for spy in spies:
                    spy.wait(30)
            elif line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
        loadgen.wait()
    finally:
        _stop(proc)
    count = float(result.get("relayed") or result.get("calls") or 0)
    out: dict[str, float] = {"count": count}
    for pid, kind in kinds.items():
        out[kind] = out.get(kind, 0.0) + (after[pid] - before[pid]) * 1e6 / max(count, 1)
    out["total"] = sum(v for k, v in out.items() if k in ("edge", "broker", "presence"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tree", action="append", required=True, help="name=path")
    parser.add_argument("--workload", choices=("relay", "calls"), default="relay")
    parser.add_argument("--rate", type=float, default=8000)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dev", action="store_true", help="signalpost dev, not a cluster")
    parser.add_argument("--slots", type=int, default=32, help="calls: client pairs")
    parser.add_argument(
        "--insecure",
        action="append",
        default=[],
        help="run this tree's cluster with --insecure-node-links (plaintext links)",
    )
    parser.add_argument("--syscalls", help="directory for strace -c counts of the window")
    parser.add_argument("--profile", help="directory for py-spy stacks of the window")
    args = parser.parse_args()
    trees = [(t.split("=", 1)[0], t.split("=", 1)[1]) for t in args.tree]
    unit = "us/msg" if args.workload == "relay" else "us/call"
    for round_ in range(args.rounds):
        for name, tree in trees:
            m = measure(name, tree, args)
            parts = "  ".join(f"{k} {m.get(k, 0):.1f}" for k in ("broker", "edge", "presence"))
            print(
                f"round {round_} {name:6} n={m['count']:.0f}  total {m['total']:.1f} {unit}"
                f"  ({parts})",
                flush=True,
            )


if __name__ == "__main__":
    main()
