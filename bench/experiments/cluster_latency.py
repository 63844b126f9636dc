"""Where the cluster's relay latency tail comes from: p50/p99 at fixed rates, and when the
slow samples were sent (bursts, or spread out).

Starts ``signalpost cluster --edges 2 --brokers 1`` from each source tree (or the same
tree with other settings, ``--env``), drives it with ``bench.loadgen relay`` at each
``--rate`` (open loop, 50 pairs, each signal crossing edges through the broker), and
prints per rate: latency percentiles, the share over 5 ms, server CPU per relayed message
by process kind, and how the samples over 5 ms cluster in time (bursts: runs of slow
samples sent within 20 ms of each other; how many, how long, how far apart). With
``--gc-log`` every server process logs its cyclic GC collections of 0.5 ms or more to
``/tmp/gclog.<pid>`` (``bench/experiments/gc_log``)::

    .venv/bin/python -m bench.experiments.cluster_latency --tree new=. --rate 4000 \\
        --rate 16000 --rounds 2
    .venv/bin/python -m bench.experiments.cluster_latency --tree a=. --tree b=. \\
        --env b:SIGNALPOST_SOMETHING=1
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.experiments.cluster_cost import _cpu, _start, _stop
from bench.systems import JWT_SECRET

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SLOW_MS = 5.0


def _bursts(samples: list[tuple[float, float]]) -> list[tuple[float, float, int, float]]:
    """(start, end, count, worst ms) of the runs of slow samples sent within 20 ms."""
    slow = sorted((t, lat * 1000) for t, lat in samples if lat * 1000 > SLOW_MS)
    out: list[tuple[float, float, int, float]] = []
    for t, ms in slow:
        if out and t - out[-1][1] <= 0.02:
            start, _end, n, worst = out[-1]
            out[-1] = (start, t, n + 1, max(worst, ms))
        else:
            out.append((t, t, 1, ms))
    return out


def _tick_phases(samples: list[tuple[float, float]], kinds: dict[int, str]) -> None:
    """Per edge: how the samples over 5 ms fall in the 0.1 s after that edge's confirm
    ticks (10 ms bins), against all samples: a bin far above 1.0 holds what a tick delays."""
    for pid, kind in sorted(kinds.items()):
        if kind != "edge":
            continue
        try:
            with open(f"/tmp/ticks.{pid}") as lines:
                ticks = sorted(float(x.split()[0]) for x in lines if "delivery_tick" in x)
        except OSError:
            continue
        if not ticks:
            continue
        counts_all, counts_slow = [0] * 10, [0] * 10
        for t, lat in samples:
            i = bisect.bisect_right(ticks, t) - 1
            if i < 0 or t - ticks[i] >= 0.1:
                continue
            b = int((t - ticks[i]) * 100)
            counts_all[b] += 1
            if lat * 1000 > SLOW_MS:
                counts_slow[b] += 1
        slow = sum(counts_slow)
        total = sum(counts_all)
        if not slow:
            continue
        ratios = " ".join(
            f"{(counts_slow[b] / slow) / max(counts_all[b] / total, 1e-9):.2f}" for b in range(10)
        )
        print(f"         edge {pid}: slow share / all share, 10 ms bins after its tick: {ratios}")


def run(name: str, tree: str, rate: float, args: argparse.Namespace) -> None:
    state = Path(f"/tmp/cluster-latency-{os.getpid()}.json")
    state.unlink(missing_ok=True)
    env_before = dict(os.environ)
    for item in args.env:
        who, setting = item.split(":", 1)
        if who == name:
            key, value = setting.split("=", 1)
            os.environ[key] = value  # server_env copies os.environ
    if args.gc_log:
        tree += ":" + str(ROOT / "bench" / "experiments" / "gc_log")
    if args.hops:
        tree += ":" + str(ROOT / "bench" / "experiments" / "hops")
    try:
        proc, document = _start(tree, state, name in args.dev, [])
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    dump = f"/tmp/cluster-latency-{os.getpid()}.samples"
    try:
        urls = [
            p["url"].rstrip("/") + ("" if p["url"].endswith("/v1/signal") else "/v1/signal")
            for p in document["processes"]
            if p.get("kind") == "edge"
        ]
        if name in args.dev:
            urls = [p["url"] for p in document["processes"]]
        kinds = {int(p["pid"]): p["kind"] for p in document["processes"] if p.get("pid")}
        gen = [PYTHON, "-m", "bench.loadgen", "relay", "--secret", JWT_SECRET]
        for url in urls:
            gen += ["--url", url]
        gen += ["--duration", str(args.seconds), "--warmup", "1.5", "--rate", str(rate)]
        gen += ["--pairs", str(args.pairs), "--dump", dump]
        loadgen = subprocess.Popen(
            gen, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert loadgen.stdin is not None and loadgen.stdout is not None
        before: dict[int, float] = {}
        after: dict[int, float] = {}
        result: dict[str, Any] = {}
        for line in loadgen.stdout:
            if line.startswith("READY"):
                before = {pid: _cpu(pid) for pid in kinds}
                loadgen.stdin.write("GO\n")
                loadgen.stdin.flush()
            elif line.startswith("DONE"):
                after = {pid: _cpu(pid) for pid in kinds}
            elif line.startswith("RESULT "):
                result = json.loads(line[len("RESULT ") :])
        loadgen.wait()
    finally:
        _stop(proc)
    count = float(result.get("relayed") or 0)
    cpu: dict[str, float] = {}
    for pid, kind in kinds.items():
        cpu[kind] = cpu.get(kind, 0.0) + (after[pid] - before[pid]) * 1e6 / max(count, 1)
    samples = []
    with open(dump) as lines:
        for line in lines:
            t, lat = line.split()
            samples.append((float(t), float(lat)))
    os.unlink(dump)
    if args.hops:
        _tick_phases(samples, kinds)
    lat = result.get("latency_ms", {})
    slow = sum(1 for _t, x in samples if x * 1000 > SLOW_MS)
    bursts = _bursts(samples)
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(bursts)]
    print(
        f"{name:8} rate {rate:>7.0f}  relayed/s {result.get('relayed_per_s', 0):>7.0f}  "
        f"p50 {lat.get('p50', 0):.2f} p90 {lat.get('p90', 0):.2f} p99 {lat.get('p99', 0):.2f} "
        f"max {lat.get('max', 0):.1f} ms  >5ms {100.0 * slow / max(len(samples), 1):.2f}%  "
        f"CPU us/msg "
        + " ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items()))
        + f"  gen {result.get('gen_cpu_s', 0) / max(args.seconds, 1e-9):.2f} cores",
        flush=True,
    )
    if bursts:
        longest = sorted(bursts, key=lambda b: b[1] - b[0], reverse=True)[:3]
        worst = ", ".join(
            f"{(b[1] - b[0]) * 1000:.0f} ms/{b[2]} (worst {b[3]:.0f})" for b in longest
        )
        print(
            f"         slow bursts {len(bursts)} in {args.seconds:.0f} s; samples per burst "
            f"median {statistics.median(b[2] for b in bursts):.0f}; burst length ms median "
            f"{statistics.median((b[1] - b[0]) * 1000 for b in bursts):.1f}; gap between "
            f"bursts ms median {statistics.median(gaps) * 1000 if gaps else 0:.0f}; longest "
            + worst,
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tree", action="append", required=True, help="name=path")
    parser.add_argument("--rate", action="append", type=float, help="signals/s (open loop)")
    parser.add_argument("--env", action="append", default=[], help="name:KEY=VALUE")
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dev", action="append", default=[], help="run this one as dev")
    parser.add_argument("--gc-log", action="store_true")
    parser.add_argument("--hops", action="store_true", help="per-hop latency, /tmp/hops.<pid>")
    args = parser.parse_args()
    trees = [(t.split("=", 1)[0], t.split("=", 1)[1]) for t in args.tree]
    for _ in range(args.rounds):
        for rate in args.rate or [16000.0]:
            for name, tree in trees:
                run(name, tree, rate, args)


if __name__ == "__main__":
    main()
