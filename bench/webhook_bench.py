"""Webhooks: events per second a broker sustains, and its CPU per event.

A real ``signalpost broker`` (one, plaintext node links) with ``webhook_urls`` pointing at
a receiver in this process (aiohttp, in a thread: it counts requests and answers 204),
driven over ZeroMQ by a DEALER that poses as an edge: ``rooms`` rooms, each cycling
"two sessions join, both leave" as fast as the broker answers (``window`` requests in
flight). Every cycle of a room makes six webhook events (``room.started``, two
``peer.joined``, two ``peer.left``, ``room.ended``). The same workload is run once more
without webhooks: the difference in broker CPU per cycle is what webhooks cost.

    .venv/bin/python -m bench.webhook_bench --seconds 5

Reported: ``events_per_s`` (received by the receiver, in the measured window),
``broker_cpu_us_per_event`` (broker CPU over the window / events received) and, from the
run without webhooks, ``webhook_cpu_us_per_event`` (the extra broker CPU per event).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket as sockets
import threading
import time
from typing import Any

from bench.broker_bench import EDGE
from bench.systems import PYTHON, SIGNALPOST, System, Unavailable, _spawn, server_env
from signalpost.transport import frame, unframe
from signalpost.wire import (
    Heartbeat,
    JoinCmd,
    LeaveCmd,
    Reply,
    decode_batch,
    encode_envelope,
    peer_object,
)

SECRET = "webhook-bench-secret"


class _Receiver:
    """An aiohttp receiver in its own thread, counting deliveries."""

    def __init__(self) -> None:
        self.count = 0
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        from aiohttp import web

        async def hook(request: web.Request) -> web.Response:
            await request.read()
            self.count += 1
            return web.Response(status=204)

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/hooks", hook)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._ready.set()
            await asyncio.Event().wait()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())


def _start(webhook_url: str | None) -> tuple[System, str]:
    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    argv = [PYTHON, SIGNALPOST, "--log-level", "WARNING", "broker", "--id", "broker-hooks"]
    argv += ["--bind", endpoint, "--insecure-node-links"]
    extra = {}
    if webhook_url:
        extra = {"SIGNALPOST_WEBHOOK_URLS": webhook_url, "SIGNALPOST_WEBHOOK_SECRET": SECRET}
    proc, out = _spawn("broker-hooks", argv, server_env(extra=extra))
    try:
        out.wait_for("signalpost broker", 30)
    except (Unavailable, TimeoutError) as exc:
        proc.kill()
        raise Unavailable(f"signalpost broker: {exc}") from None
    return System("broker", "signalpost broker", [endpoint], proc), endpoint


def run(seconds: float, rooms: int, window: int, receiver: _Receiver | None) -> dict[str, Any]:
    import zmq

    url = f"http://127.0.0.1:{receiver.port}/hooks" if receiver is not None else None
    broker, endpoint = _start(url)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, EDGE.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    heartbeat = encode_envelope(Heartbeat(EDGE, "bench"))
    try:
        sock.send(frame([heartbeat]))
        deadline = time.monotonic() + 10
        while not sock.poll(200):
            sock.send(frame([heartbeat]))
            if time.monotonic() > deadline:
                raise RuntimeError("the broker never answered")
        sock.recv()
        req = iter(range(1, 1 << 62))
        # Per room: the next step of its cycle (0, 1: joins; 2, 3: leaves).
        step = [0] * rooms
        waiting: dict[tuple[str, int], int] = {}  # (session, seq) -> room

        def command(r: int) -> Any:
            n = step[r]
            session = f"s{r}-{n % 2}"
            seq = next(req)
            waiting[(session, seq)] = r
            if n < 2:
                peer = peer_object(session, f"u{r}-{n}", None, None)
                return JoinCmd(session, f"c{session}", EDGE, seq, seq, f"room{r}", peer)
            return LeaveCmd(session, f"c{session}", EDGE, seq, seq, f"room{r}")

        cycles = 0
        last_beat = time.monotonic()
        start_rooms = list(range(min(rooms, window)))
        sock.send(frame([encode_envelope(command(r)) for r in start_rooms]))
        begin = time.monotonic()
        before = broker.sample()
        received_before = receiver.count if receiver is not None else 0
        while time.monotonic() - begin < seconds:
            if time.monotonic() - last_beat > 0.25:
                sock.send(frame([heartbeat]))
                last_beat = time.monotonic()
            if not sock.poll(1000):
                raise RuntimeError("no answer from the broker")
            batch = unframe(sock.recv())
            assert batch is not None
            nxt = []
            for envelope in decode_batch(batch):
                if type(envelope) is not Reply:
                    continue
                r = waiting.pop((envelope.session, envelope.seq), None)
                if r is None:
                    continue
                step[r] = (step[r] + 1) % 4
                if step[r] == 0:
                    cycles += 1
                nxt.append(encode_envelope(command(r)))
            if nxt:
                sock.send(frame(nxt))
        elapsed = time.monotonic() - begin
        # What the receiver got in the window (late ones: queued, counted after).
        received = (receiver.count if receiver is not None else 0) - received_before
        after = broker.sample()
        cpu = after.cpu - before.cpu
        time.sleep(1.0)
        result: dict[str, Any] = {
            "webhooks": receiver is not None,
            "seconds": round(elapsed, 2),
            "cycles": cycles,
            "cycles_per_s": round(cycles / elapsed),
            "broker_cpu_s": round(cpu, 3),
            "broker_cpu_us_per_cycle": round(cpu / cycles * 1e6, 1) if cycles else None,
        }
        if receiver is not None:
            result["events_made"] = 6 * cycles
            result["events_per_s"] = round(received / elapsed)
            result["events_received_after_1s"] = receiver.count - received_before
            result["broker_cpu_us_per_event"] = round(cpu / received * 1e6, 1) if received else None
        return result
    finally:
        sock.close()
        context.term()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rooms", type=int, default=500)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()
    receiver = _Receiver()
    with_hooks = run(args.seconds, args.rooms, args.window, receiver)
    without = run(args.seconds, args.rooms, args.window, None)
    extra = None
    if with_hooks["broker_cpu_us_per_cycle"] and without["broker_cpu_us_per_cycle"]:
        extra = (with_hooks["broker_cpu_us_per_cycle"] - without["broker_cpu_us_per_cycle"]) / 6
    print(
        json.dumps(
            {
                "with_webhooks": with_hooks,
                "without_webhooks": without,
                "webhook_cpu_us_per_event": round(extra, 1) if extra is not None else None,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
