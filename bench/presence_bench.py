"""Presence core: what a status change, an expiry tick and a lost edge cost in
``PresenceTable`` alone, as the sessions it holds grow (1k, 10k, 100k).

Each size starts from the same state: ``sessions`` sessions held (one user each, over 8
edges), 1% of them dropped and within their resume window, and 100 users that come and
go, each watched by 10 of the held sessions. Then, CPU time (``time.process_time``) over
repeated calls, each figure the best of ``rounds`` batches:

- ``change_us``: one ``SessionUp`` and one ``SessionDown(ended)`` of a watched user (two
  status changes, each a ``presence`` frame to its 10 watchers);
- ``tick_us``: one ``expire(now)`` with nothing lapsing: what the owner's 0.25 s timer
  costs at rest;
- ``edge_lost_us``: losing an edge that holds 100 sessions (re-announced between calls,
  not timed);
- ``bytes_per_session``: ``tracemalloc``'s count of what the table holds, divided by the
  sessions (made inside the trace, so their ids count).

A flat row across sizes means a cost that follows changes, not sessions held.
``--baseline REV`` measures ``presence/table.py`` as of git revision REV beside the
current one, in the same process and run.

    .venv/bin/python -m bench.presence_bench
    .venv/bin/python -m bench.presence_bench --baseline feac8d1 --sizes 1000,10000,100000
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from signalpost.wire import Envelope, SessionDown, SessionUp, WatchCmd

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 30.0
EDGES = 8
CHURN_USERS = 100
WATCHERS_PER_USER = 10
LOST_EDGE_SESSIONS = 100


class Table(Protocol):
    def handle(self, command: Envelope, now: float) -> list[Any]: ...

    def expire(self, now: float) -> list[Any]: ...

    def edge_lost(self, edge: str, now: float) -> list[Any]: ...


TableFactory = Callable[[], Table]


def table_at(revision: str) -> TableFactory:
    """``PresenceTable`` as ``presence/table.py`` was at ``revision`` (a module of its own)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:presence/table.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="presence-baseline-")) / "table.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"presence_table_{revision}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return lambda: module.PresenceTable(resume_window=WINDOW)


def current() -> TableFactory:
    from presence.table import PresenceTable

    return lambda: PresenceTable(resume_window=WINDOW)


def held(new_table: TableFactory, sessions: int) -> Table:
    """The starting state (module docstring)."""
    table = new_table()
    for i in range(sessions):
        table.handle(SessionUp(f"s{i}", f"u{i}", f"edge-{i % EDGES}", f"c{i}.1"), 0.0)
    for i in range(0, sessions, 100):
        table.handle(SessionDown(f"s{i}", f"edge-{i % EDGES}", f"c{i}.1", False), 0.0)
    churn = [f"churn-{k}" for k in range(CHURN_USERS)]
    for w in range(1, min(sessions, WATCHERS_PER_USER + 1)):
        table.handle(WatchCmd(f"s{w}", f"c{w}.1", f"edge-{w % EDGES}", 1, None, churn), 0.0)
    for k in range(LOST_EDGE_SESSIONS):
        table.handle(SessionUp(f"lost-{k}", f"lost-user-{k}", "edge-lost", f"l{k}.1"), 0.0)
    return table


def _best_us(batch: Callable[[int], None], calls: int, rounds: int) -> float:
    """Best of ``rounds`` batches of ``calls``: CPU microseconds per call."""
    best = float("inf")
    for r in range(rounds):
        gc.collect()
        start = time.process_time()
        batch(r)
        best = min(best, (time.process_time() - start) / calls * 1e6)
    return best


def _calls_for(call: Callable[[], object], seconds: float) -> int:
    """How many calls of ``call`` take ``seconds`` of CPU (doubling until they do)."""
    calls = 1
    while True:
        start = time.process_time()
        for _ in range(calls):
            call()
        if time.process_time() - start >= seconds:
            return calls
        calls *= 2


def measure(new_table: TableFactory, sessions: int, rounds: int = 5) -> dict[str, float]:
    """The four figures (module docstring) for one core at one size."""
    result = {"sessions": float(sessions), **_cpu(new_table, sessions, rounds)}
    gc.collect()  # the timed table is gone before memory is counted
    result["bytes_per_session"] = _bytes_per_session(new_table, sessions)
    return result


def _cpu(new_table: TableFactory, sessions: int, rounds: int) -> dict[str, float]:
    table = held(new_table, sessions)
    changes = 2000
    ups = [
        [
            SessionUp(f"x{r}-{n}", f"churn-{n % CHURN_USERS}", "edge-0", "cx.1")
            for n in range(changes)
        ]
        for r in range(rounds)
    ]
    downs = [[SessionDown(c.session, "edge-0", "cx.1", True) for c in batch] for batch in ups]

    def change_batch(r: int) -> None:
        handle = table.handle
        for up, down in zip(ups[r], downs[r], strict=True):
            handle(up, 1.0)
            handle(down, 1.0)

    # At rest nothing lapses. A tick costs from 0.1 us to ms: enough ticks for 20 ms of CPU
    # per batch, so the clock's own cost (about 1 us a reading) stays out of the figure.
    ticks = _calls_for(lambda: table.expire(1.0), 0.02)

    def tick_batch(_: int) -> None:
        expire = table.expire
        for _ in range(ticks):
            expire(1.0)

    losses = 20
    reannounce = [
        SessionUp(f"lost-{k}", f"lost-user-{k}", "edge-lost", f"l{k}.1")
        for k in range(LOST_EDGE_SESSIONS)
    ]

    def loss_us() -> float:
        """Only ``edge_lost`` is timed, not the re-announcement before it."""
        clock = time.process_time
        best = float("inf")
        for _ in range(rounds):
            gc.collect()
            spent = 0.0
            for _ in range(losses):
                for command in reannounce:
                    table.handle(command, 1.0)
                start = clock()
                table.edge_lost("edge-lost", 1.0)
                spent += clock() - start
            best = min(best, spent / losses * 1e6)
        return best

    return {
        "change_us": _best_us(change_batch, changes, rounds),
        "tick_us": _best_us(tick_batch, ticks, rounds),
        "edge_lost_us": loss_us(),
    }


def _bytes_per_session(new_table: TableFactory, sessions: int) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        table = held(new_table, sessions)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del table
    return (after - before) / sessions


def core(
    sizes: tuple[int, ...] = (1000, 10_000, 100_000),
    baseline: str | None = None,
    rounds: int = 5,
) -> dict[str, Any]:
    """Every size for the current core and, with ``baseline``, the core at that revision."""
    variants: dict[str, TableFactory] = {"current": current()}
    if baseline is not None:
        variants[f"baseline {baseline}"] = table_at(baseline)
    results: dict[str, Any] = {"rounds": rounds, "variants": {}}
    for size in sizes:
        for name, factory in variants.items():  # interleaved: noise hits both alike
            results["variants"].setdefault(name, []).append(measure(factory, size, rounds))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--baseline", help="git revision whose presence/table.py to compare")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    print(json.dumps(core(sizes, args.baseline, args.rounds), indent=2))


if __name__ == "__main__":
    main()
