"""A fresh hello's latency and CPU, old tree against new (one cluster at a time).

Starts ``signalpost cluster --edges 2 --brokers 1 --presence 2 --consul off`` from each
source tree in turn (alternating, ``--rounds`` times), then opens fresh sessions one after
another (no ``resume``) on the first edge, each as another user (so both presence nodes
own some and each has a runner-up), measures hello sent -> welcome received, and closes
each with 1000 (the session ends). Prints per tree and round: the latency's median, p90
and p99, and the CPU the edges, the presence nodes and the broker spent per hello in the
measured window (the generator's own CPU is not counted)::

    .venv/bin/python -m bench.experiments.hello_cost --tree old=/tmp/old-tree \\
        --tree new=. --hellos 400 --rounds 3

With ``--concurrency N`` N clients do so at once (a burst of hellos), and the output adds
hellos per second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

from websockets.asyncio.client import connect

from bench.experiments.cluster_cost import _cpu, _start, _stop
from bench.systems import JWT_SECRET
from signalpost.auth import mint_token


async def _hellos(url: str, count: int, concurrency: int, prefix: str) -> list[float]:
    """Open and close ``count`` fresh sessions; each one's hello -> welcome in ms."""
    tokens = [
        mint_token(JWT_SECRET, f"{prefix}-{i}", now=time.time(), ttl=3600.0) for i in range(count)
    ]
    latencies: list[float] = []
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            async with connect(url) as ws:
                started = time.perf_counter()
                await ws.send(f'{{"type":"hello","token":"{tokens[i]}"}}')
                welcome = await ws.recv()
                latencies.append((time.perf_counter() - started) * 1000)
                assert '"welcome"' in str(welcome), welcome

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def measure(tree: str, args: argparse.Namespace, round_: int) -> dict[str, float]:
    state = Path(f"/tmp/hello-cost-{os.getpid()}.json")
    state.unlink(missing_ok=True)
    proc, document = _start(tree, state, False, ["--presence", "2"])
    try:
        edge = next(p for p in document["processes"] if p.get("kind") == "edge")
        url = edge["url"].rstrip("/")
        url += "" if url.endswith("/v1/signal") else "/v1/signal"
        kinds = {int(p["pid"]): p["kind"] for p in document["processes"] if p.get("pid")}
        asyncio.run(_hellos(url, 20, 1, f"warm{round_}"))  # links up, code warm
        time.sleep(0.5)
        before = {pid: _cpu(pid) for pid in kinds}
        started = time.perf_counter()
        latencies = asyncio.run(_hellos(url, args.hellos, args.concurrency, f"r{round_}"))
        elapsed = time.perf_counter() - started
        time.sleep(0.5)  # the last goodbyes handled
        after = {pid: _cpu(pid) for pid in kinds}
    finally:
        _stop(proc)
    ordered = sorted(latencies)
    out = {
        "median": statistics.median(ordered),
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
        "p99": ordered[int(0.99 * (len(ordered) - 1))],
        "rate": len(ordered) / elapsed,
    }
    for pid, kind in kinds.items():
        out[kind] = out.get(kind, 0.0) + (after[pid] - before[pid]) * 1e6 / len(ordered)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tree", action="append", required=True, help="name=path")
    parser.add_argument("--hellos", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = [(t.split("=", 1)[0], t.split("=", 1)[1]) for t in args.tree]
    for round_ in range(args.rounds):
        for name, tree in trees:
            m = measure(tree, args, round_)
            cpu = "  ".join(f"{k} {m.get(k, 0):.0f}" for k in ("edge", "presence", "broker"))
            print(
                f"round {round_} {name:4} hello->welcome ms median {m['median']:.2f} "
                f"p90 {m['p90']:.2f} p99 {m['p99']:.2f}  {m['rate']:.0f} hellos/s  "
                f"CPU us/hello: {cpu}",
                flush=True,
            )


if __name__ == "__main__":
    main()
