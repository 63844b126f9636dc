"""Experiment: what zmq.asyncio costs per message, and what draining with a sync shadow saves.

A ROUTER and a DEALER in one uvloop process exchange ``count`` 300-byte messages, like an
edge and a broker. Style ``asyncio``: what signalpost.transport does today (an awaited
``recv_multipart`` and an async-socket ``send_multipart`` per message). Style ``drain``:
await readability once (``poll``), then receive with a sync shadow socket and NOBLOCK until
``zmq.Again``; send with the sync shadow too. Prints CPU microseconds per message (both
ends together) for each style.

    .venv/bin/python -m bench.experiments.zmq_shell
"""

from __future__ import annotations

import asyncio
import json
import resource
import time

import zmq
import zmq.asyncio

BODY = b"x" * 300


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _run(style: str, count: int, window: int = 256) -> dict[str, float]:
    context = zmq.asyncio.Context()
    router = context.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:0")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"edge")
    dealer.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
    sync_router = zmq.Socket.shadow(router.underlying)
    sync_dealer = zmq.Socket.shadow(dealer.underlying)
    # Handshake so the ROUTER knows the DEALER's identity.
    await dealer.send_multipart([b"SP1", b"hi"])
    await router.recv_multipart()

    async def echo() -> None:  # the "broker": answer every message
        handled = 0
        while handled < count:
            if style == "asyncio":
                peer, version, body = await router.recv_multipart()
                await router.send_multipart((peer, version, body))
                handled += 1
            else:
                await router.poll(zmq.POLLIN)
                while True:
                    try:
                        peer, version, body = sync_router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    sync_router.send_multipart((peer, version, body))
                    handled += 1

    async def drive() -> None:  # the "edge": keep ``window`` in flight
        sent = received = 0
        while received < count:
            while sent < count and sent - received < window:
                if style == "asyncio":
                    await dealer.send_multipart((b"SP1", BODY))
                else:
                    sync_dealer.send_multipart((b"SP1", BODY))
                sent += 1
            if style == "asyncio":
                await dealer.recv_multipart()
                received += 1
            else:
                await dealer.poll(zmq.POLLIN)
                while True:
                    try:
                        sync_dealer.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    received += 1

    cpu0, t0 = _cpu(), time.perf_counter()
    await asyncio.gather(echo(), drive())
    cpu, wall = _cpu() - cpu0, time.perf_counter() - t0
    for sock in (router, dealer):
        sock.close(0)
    context.term()
    return {"messages_per_s": count / wall, "cpu_us_per_message": cpu / count * 1e6}


def main(count: int = 100_000) -> dict[str, dict[str, float]]:
    import uvloop

    results = {}
    for style in ("asyncio", "drain", "asyncio", "drain"):
        result = uvloop.run(_run(style, count))
        best = results.get(style)
        if best is None or result["cpu_us_per_message"] < best["cpu_us_per_message"]:
            results[style] = result
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
