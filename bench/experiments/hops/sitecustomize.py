"""Experiment only (bench/experiments/cluster_latency.py --hops): per-hop latency of the
relay workload's signals inside the cluster.

The load generator puts its send time (``time.perf_counter``: CLOCK_MONOTONIC, the same
clock in every process of the machine) first in each signal's data (``{"t":...``). Put on
PYTHONPATH, this wraps, in whichever of these modules the process imports:

* ``EdgeServer.on_text``: the sending edge reads the client's frame (hop ``edge_in``);
* ``RoomTable._signal``: the broker applies the signal (hop ``broker``);
* ``EdgeServer.receive`` of a ``Deliver``: the receiving edge has it (hop ``edge_out``);

``EdgeServer._delivery_tick`` (the confirm tick), ``RoomTable.confirm`` and
``RoomTable.expire`` are timed (``took:`` lines: calls, total and longest ms; when each
began, on ``perf_counter``, in ``/tmp/ticks.<pid>``); a task
started with the edge's keepalive or the broker's expiry loop sleeps 5 ms again and again
and notes each wake-up more than 2 ms late, with how much CPU the loop's thread used in
that time (``lag:`` lines: a late loop that was on the CPU ran long callbacks; one that
was not waited for a core). Once a second it appends, per hop, the samples of that second
(time since the client sent the signal: count, p50, p99, max in ms) to
``/tmp/hops.<pid>``.
"""

import os
import re
import sys
import threading
import time

_T = re.compile(rb'"t":([0-9.]+)')
_samples: dict[str, list[float]] = {}
_lock = threading.Lock()
_clock = time.perf_counter


def _note(hop: str, data: bytes) -> None:
    m = _T.search(data, 0, 400)
    if m is not None:
        took = _clock() - float(m.group(1))
        if 0 <= took < 10:
            _samples.setdefault(hop, []).append(took)


_took: dict[str, list[float]] = {}
_lags: list[tuple[float, float]] = []


_ticks = open(f"/tmp/ticks.{os.getpid()}", "a")  # noqa: SIM115


def _timed(name: str, fn):  # type: ignore[no-untyped-def]
    def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
        t0 = _clock()
        _ticks.write(f"{t0:.6f} {name}\n")  # when each timed call began (perf_counter)
        try:
            return fn(*args, **kwargs)
        finally:
            _took.setdefault(name, []).append(_clock() - t0)

    return timed


async def _monitor() -> None:
    import asyncio

    while True:
        w0, c0 = _clock(), time.thread_time()
        await asyncio.sleep(0.005)
        late = _clock() - w0 - 0.005
        if late > 0.002:
            _lags.append((late, time.thread_time() - c0))


def _dump() -> None:
    out = open(f"/tmp/hops.{os.getpid()}", "a")  # noqa: SIM115
    out.write(" ".join(sys.argv[:4]) + "\n")
    while True:
        time.sleep(1.0)
        with _lock:
            taken = {hop: s for hop, s in _samples.items() if s}
            for hop in taken:
                _samples[hop] = []
            took = {k: v for k, v in _took.items() if v}
            for k in took:
                _took[k] = []
            lags = _lags[:]
            del _lags[:]
        for name, t in sorted(took.items()):
            out.write(
                f"{time.time():.1f} took: {name} n {len(t)} total {sum(t) * 1e3:.2f} "
                f"max {max(t) * 1e3:.2f} ms\n"
            )
        if lags:
            wall = sum(late + 0.005 for late, _ in lags)
            out.write(
                f"{time.time():.1f} lag: {len(lags)} late wake-ups, max "
                f"{max(x for x, _ in lags) * 1e3:.1f} ms, loop thread on CPU "
                f"{100 * sum(c for _, c in lags) / wall:.0f}% of that time\n"
            )
        for hop, s in sorted(taken.items()):
            s.sort()
            n = len(s)
            out.write(
                f"{time.time():.1f} {hop:9} n {n:6} p50 {s[n // 2] * 1e3:7.2f} "
                f"p99 {s[min(n - 1, int(n * 0.99))] * 1e3:7.2f} max {s[-1] * 1e3:7.2f}\n"
            )
        out.flush()
        _ticks.flush()


def _install() -> None:
    argv = " ".join(sys.argv)
    if "-m edge" in argv or "edge" in sys.argv:
        import edge.server as server
        from signalpost.wire import Deliver

        on_text, receive = server.EdgeServer.on_text, server.EdgeServer.receive
        keepalive = server.EdgeServer._keepalive

        async def keepalive_monitored(self):  # type: ignore[no-untyped-def]
            import asyncio

            asyncio.get_running_loop().create_task(_monitor())
            await keepalive(self)

        server.EdgeServer._keepalive = keepalive_monitored  # type: ignore[method-assign]
        server.EdgeServer._delivery_tick = _timed(  # type: ignore[method-assign]
            "delivery_tick", server.EdgeServer._delivery_tick
        )

        def on_text_timed(self, link, message):  # type: ignore[no-untyped-def]
            _note("1 edge_in", message)
            return on_text(self, link, message)

        def receive_timed(self, envelope):  # type: ignore[no-untyped-def]
            if type(envelope) is Deliver:
                _note("3 edge_out", envelope.payload)
            return receive(self, envelope)

        server.EdgeServer.on_text = on_text_timed  # type: ignore[method-assign]
        server.EdgeServer.receive = receive_timed  # type: ignore[method-assign]
    elif "-m broker" in argv or "broker" in sys.argv:
        import broker.rooms as rooms

        signal = rooms.RoomTable._signal

        def signal_timed(self, command, out, now):  # type: ignore[no-untyped-def]
            _note("2 broker", command.data)
            return signal(self, command, out, now)

        rooms.RoomTable._signal = signal_timed  # type: ignore[method-assign]
        rooms.RoomTable.confirm = _timed("confirm", rooms.RoomTable.confirm)  # type: ignore[method-assign]
        rooms.RoomTable.expire = _timed("expire", rooms.RoomTable.expire)  # type: ignore[method-assign]
        import signalpost.node as node

        expiry_loop = node.OwnerNode._expiry_loop

        async def expiry_monitored(self):  # type: ignore[no-untyped-def]
            import asyncio

            asyncio.get_running_loop().create_task(_monitor())
            await expiry_loop(self)

        node.OwnerNode._expiry_loop = expiry_monitored  # type: ignore[method-assign]
    else:
        return
    threading.Thread(target=_dump, daemon=True).start()


try:
    _install()
except Exception as exc:  # an experiment must not stop the process
    print(f"hops: not installed: {exc!r}", file=sys.stderr)
