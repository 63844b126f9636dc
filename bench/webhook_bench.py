"""Webhooks: events per second a broker sustains, and its CPU per event.

A real ``signalpost broker`` (one, plaintext node links) with ``webhook_urls`` pointing at
a receiver in this process (aiohttp, in a thread: it counts requests and answers 204),
driven over ZeroMQ by a DEALER that poses as an edge: ``rooms`` rooms, each cycling
"two sessions join, both leave" as fast as the broker answers (``window`` requests in
flight). Every cycle of a room makes six webhook events (``room.started``, two
``peer.joined``, two ``peer.left``, ``room.ended``). The same workload is run once more
without webhooks: the difference in broker CPU per cycle is what webhooks cost.

    .venv/bin/python -m bench.webhook_bench --seconds 4 --rates 1000,2000,4000,6000

Runs: ``saturated`` (requests as fast as the broker answers: webhooks get what the
event loop leaves them), ``paced`` (``--rates`` webhook events per second), and the
saturated workload without webhooks. Reported per run: ``events_per_s`` (received in the
measured window), ``sustained`` (every event made was received within 1 s after the
run), ``broker_cpu_us_per_event`` (broker CPU over the window / events received) and,
for paced runs, ``webhook_cpu_us_per_event`` (the run's broker CPU less what its cycles
cost without webhooks, per event made).
"""

from __future__ import annotations

import argparse
import json
import socket as sockets
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


_RECEIVER = """
import sys
from aiohttp import web

count = 0

async def hook(request):
    global count
    await request.read()
    count += 1
    return web.Response(status=204)

async def counted(request):
    return web.Response(text=str(count))

app = web.Application()
app.router.add_post("/hooks", hook)
app.router.add_get("/count", counted)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


class _Receiver:
    """An aiohttp receiver in its own process (not competing with the bench's driver for
    its interpreter), counting deliveries (``GET /count``)."""

    def __init__(self) -> None:
        import subprocess
        import urllib.request

        with sockets.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc = subprocess.Popen([PYTHON, "-c", _RECEIVER, str(self.port)])
        self._open = urllib.request.urlopen
        deadline = time.monotonic() + 10
        while True:
            try:
                self.count  # noqa: B018 (up yet?)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def count(self) -> int:
        with self._open(f"http://127.0.0.1:{self.port}/count", timeout=5) as response:
            return int(response.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


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


def run(
    seconds: float,
    rooms: int,
    window: int,
    receiver: _Receiver | None,
    rate: float = 0.0,
) -> dict[str, Any]:
    """One run; ``rate``: requests per second to send at most (0: as fast as answered)."""
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
        sent = 0
        last_beat = time.monotonic()
        ready: list[int] = []  # rooms whose next request waits for the rate
        start_rooms = list(range(min(rooms, window)))
        sock.send(frame([encode_envelope(command(r)) for r in start_rooms]))
        sent += len(start_rooms)
        begin = time.monotonic()
        before = broker.sample()
        received_before = receiver.count if receiver is not None else 0
        while time.monotonic() - begin < seconds:
            if time.monotonic() - last_beat > 0.25:
                sock.send(frame([heartbeat]))
                last_beat = time.monotonic()
            if rate:
                allowed = int(rate * (time.monotonic() - begin)) - sent
                if ready and allowed > 0:
                    go, ready = ready[:allowed], ready[allowed:]
                    sock.send(frame([encode_envelope(command(r)) for r in go]))
                    sent += len(go)
            if not sock.poll(5 if rate else 1000):
                if rate:
                    continue
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
                if rate:
                    ready.append(r)
                else:
                    nxt.append(encode_envelope(command(r)))
            if nxt:
                sock.send(frame(nxt))
                sent += len(nxt)
        elapsed = time.monotonic() - begin
        # What the receiver got in the window (late ones: queued, counted after).
        received = (receiver.count if receiver is not None else 0) - received_before
        after = broker.sample()
        cpu = after.cpu - before.cpu
        time.sleep(1.0)
        result: dict[str, Any] = {
            "webhooks": receiver is not None,
            "rate_limit": rate or None,
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
    parser.add_argument(
        "--rates",
        default="1000,2000,4000",
        help="webhook events per second to drive at, each a paced run (comma separated)",
    )
    args = parser.parse_args()
    receiver = _Receiver()
    paced = []
    try:
        with_hooks = run(args.seconds, args.rooms, args.window, receiver)
        for events in [float(r) for r in args.rates.split(",") if r]:
            # Four requests per cycle, six events: requests/s = events/s x 4 / 6.
            paced.append(run(args.seconds, args.rooms, args.window, receiver, events * 4 / 6))
    finally:
        receiver.stop()
    without = run(args.seconds, args.rooms, args.window, None)
    base = without["broker_cpu_us_per_cycle"]
    for result in paced:
        # What webhooks add: the run's broker CPU less what its cycles cost without them.
        made = result["events_made"]
        if base and made:
            extra = result["broker_cpu_s"] * 1e6 - base * result["cycles"]
            result["webhook_cpu_us_per_event"] = round(extra / made, 1)
        result["sustained"] = result["events_received_after_1s"] >= made
    print(
        json.dumps({"saturated": with_hooks, "paced": paced, "without_webhooks": without}, indent=2)
    )


if __name__ == "__main__":
    main()
