"""The load generator: one asyncio process speaking the real client protocol.

Run by ``bench.run`` as a child process (so its CPU never counts as the server's), or by
hand::

    .venv/bin/python -m bench.loadgen relay --url ws://127.0.0.1:8080/v1/signal \\
        --secret S --pairs 50 --duration 10 --no-wait

Workloads (sub-commands):

``relay``   ``pairs`` pairs, each in its own room; both clients send ``signal`` frames
            (``to`` the other, with an ``id``, ~200 B ICE-candidate-like ``data``) and
            count the relayed signals and acks. Closed loop (``--window`` unacked
            signals per client) or open loop (``--rate`` signals/s in total).
``calls``   the call-setup workload: per call two clients join a fresh room, the caller
            sends a ~4 KB SDP offer and 12 candidates, the callee answers (~3 KB) and
            sends 12 candidates, both wait for every signal and ack, then both leave.
            Closed loop (``--slots`` calls at a time) or open loop (``--rate`` calls/s,
            Poisson arrivals, setup time counted from the scheduled start).
``fanout``  ``rooms`` rooms of ``members`` members each (a session may sit in many
            rooms); senders broadcast (no ``to``) round-robin over their rooms.
``idle``    opens ``conns`` authenticated connections and holds them.

Two framings share every workload: ``--proto sp`` (signalpost protocol v1, also spoken
by ``bench.floor_relay``) and ``--proto sio`` (Socket.IO v5 / Engine.IO v4 over the same
``websockets`` client, so the generator's cost per frame is the same on both sides).

Control (when stdin is not a terminal and ``--no-wait`` is not given): after set-up and
warm-up the generator prints ``READY <phase>`` and waits for a ``GO`` line, so the
orchestrator can sample the servers' CPU exactly around the measured window; it prints
``DONE`` when the window closes and finally one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import resource
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from signalpost.auth import mint_token

_decode = msgspec.json.decode
_encode = msgspec.json.encode
clock = time.perf_counter

# --------------------------------------------------------------------------- payloads

CANDIDATE = (
    "candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr 10.0.0.2 "
    "rport 46154 generation 0 ufrag EsAw network-id 1 network-cost 10"
)


def _sdp(kind: str, size: int) -> str:
    """A plausible SDP of about ``size`` bytes (the text is never parsed by anyone)."""
    lines = [
        "v=0",
        f"o=- {random.getrandbits(62)} 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "a=extmap-allow-mixed",
        "a=msid-semantic: WMS",
    ]
    n = 0
    while sum(len(x) + 2 for x in lines) < size:
        n += 1
        lines.append(f"a=rtpmap:{96 + n % 30} VP8/90000")
        lines.append(f"a=rtcp-fb:{96 + n % 30} nack pli")
        lines.append(f"a=fmtp:{96 + n % 30} level-asymmetry-allowed=1;packetization-mode=1")
    return "\r\n".join(lines)[:size]


def offer_json() -> str:
    return _encode({"type": "offer", "sdp": _sdp("offer", 4096)}).decode()


def answer_json() -> str:
    return _encode({"type": "answer", "sdp": _sdp("answer", 3000)}).decode()


def candidate_json(i: int) -> str:
    return _encode(
        {"candidate": CANDIDATE.replace("46154", str(46154 + i)), "sdpMid": "0", "sdpMLineIndex": 0}
    ).decode()


CANDIDATES_EACH_WAY = 12


def timed_json(pad: str) -> str:
    """``data`` of a relay signal: a send timestamp for latency, and ~200 B of candidate."""
    return '{"t":%.6f,' + pad[1:]


# --------------------------------------------------------------------------- protocol peers


class CallFailed(Exception):
    pass


class Peer:
    """One client connection; subclasses frame the protocol, this counts and waits."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.session = ""
        self.ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.outstanding = 0  # signals sent whose ack has not come
        self.acked = 0
        self.received = 0  # signals relayed to this peer
        self.events_seen = 0  # peer-joined / peer-left
        self.errors = 0
        self.error_codes: dict[str, int] = {}
        self.on_signal: Callable[[str, Any], None] | None = None
        self.inbox: asyncio.Queue[tuple[str, str, Any]] | None = None
        self._window_open: asyncio.Event = asyncio.Event()
        self._drained: asyncio.Future[None] | None = None
        self.window = 1 << 30
        self._reader: asyncio.Task[None] | None = None
        self.closed = False
        self.stopping = False

    # -- shared bookkeeping
    def _error(self, code: str) -> None:
        self.errors += 1
        self.error_codes[code] = self.error_codes.get(code, 0) + 1

    def _ack(self) -> None:
        self.acked += 1
        self.outstanding -= 1
        if self.outstanding < self.window:
            self._window_open.set()
        if self.outstanding == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _signal_in(self, sender: str, data: Any) -> None:
        self.received += 1
        if self.on_signal is not None:
            self.on_signal(sender, data)
        if self.inbox is not None:
            self.inbox.put_nowait(("signal", sender, data))

    def _peer_joined(self, session: str) -> None:
        self.events_seen += 1
        if self.inbox is not None:
            self.inbox.put_nowait(("peer-joined", session, None))

    def stop(self) -> None:
        """Release a sender blocked on its window (the workload is ending)."""
        self.stopping = True
        self._window_open.set()

    async def wait_window(self) -> None:
        while self.outstanding >= self.window and not self.stopping:
            self._window_open.clear()
            await self._window_open.wait()

    async def drained(self) -> None:
        if self.outstanding <= 0:
            return
        self._drained = asyncio.get_running_loop().create_future()
        await self._drained

    async def _request(self, frame: str, request_id: int) -> Any:
        assert self.ws is not None
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        await self.ws.send(frame)
        return await future

    async def close(self) -> None:
        self.closed = True
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 5)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader

    def _start_reader(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for frame in self.ws:
                self._frame(frame)
        except ConnectionClosed:
            pass
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(CallFailed("connection closed"))
            if self._drained is not None and not self._drained.done():
                self._drained.set_exception(CallFailed("connection closed"))
            self._window_open.set()

    # -- protocol specific
    async def connect(self, url: str, token: str) -> None:
        raise NotImplementedError

    def _frame(self, frame: str | bytes) -> None:
        raise NotImplementedError

    async def join(self, room: str) -> list[str]:
        raise NotImplementedError

    async def leave(self, room: str) -> None:
        raise NotImplementedError

    async def signal(self, room: str, to: str | None, data_json: str) -> None:
        raise NotImplementedError


_CONNECT_OPTIONS: dict[str, Any] = {
    "compression": None,
    "ping_interval": None,  # the server pings; the client only answers
    "max_size": 1 << 20,
    "open_timeout": 60,
    "close_timeout": 5,
}


class SignalpostPeer(Peer):
    """signalpost client protocol v1 (PROTOCOL.md); also what the floor relay speaks."""

    async def connect(self, url: str, token: str) -> None:
        self.ws = await connect(url, **_CONNECT_OPTIONS)
        await self.ws.send(f'{{"type":"hello","token":"{token}"}}')
        welcome = _decode(await asyncio.wait_for(self.ws.recv(), 30))
        if welcome.get("type") != "welcome":
            raise CallFailed(f"hello refused: {welcome}")
        self.session = welcome["session"]
        self._start_reader()

    def _frame(self, frame: str | bytes) -> None:
        message = _decode(frame)
        kind = message["type"]
        if kind == "signal":
            self._signal_in(message["from"]["session"], message["data"])
        elif kind == "ack":
            self._ack()
        elif kind == "peer-joined":
            self._peer_joined(message["peer"]["session"])
        elif kind == "peer-left":
            self.events_seen += 1
        elif kind == "error":
            self._error(message.get("code", "?"))
            future = self.pending.pop(message.get("id"), None)
            if future is not None:
                future.set_exception(CallFailed(message.get("code", "error")))
            elif "id" in message:
                self._ack()  # a refused signal: no longer outstanding
        else:
            future = self.pending.pop(message.get("id"), None)
            if future is not None and not future.done():
                future.set_result(message)

    async def join(self, room: str) -> list[str]:
        request_id = next(self._ids)
        joined = await self._request(
            f'{{"type":"join","id":{request_id},"room":"{room}"}}', request_id
        )
        return [m["session"] for m in joined["members"]]

    async def leave(self, room: str) -> None:
        request_id = next(self._ids)
        await self._request(f'{{"type":"leave","id":{request_id},"room":"{room}"}}', request_id)

    async def signal(self, room: str, to: str | None, data_json: str) -> None:
        assert self.ws is not None
        self.outstanding += 1
        if to is None:
            frame = f'{{"type":"signal","id":{next(self._ids)},"room":"{room}","data":{data_json}}}'
        else:
            frame = (
                f'{{"type":"signal","id":{next(self._ids)},"room":"{room}","to":"{to}",'
                f'"data":{data_json}}}'
            )
        await self.ws.send(frame)


class SocketIOPeer(Peer):
    """Socket.IO v5 over Engine.IO v4, WebSocket transport only, on the same client.

    Frames: ``0{open}`` from the server, ``40{auth}`` connect to ``/``, ``42<ack>[event,
    data]`` an event with an ack id, ``43<ack>[args]`` the ack, ``2``/``3`` ping/pong.
    """

    async def connect(self, url: str, token: str) -> None:
        self.ws = await connect(url, **_CONNECT_OPTIONS)
        opened = await asyncio.wait_for(self.ws.recv(), 30)
        if not isinstance(opened, str) or not opened.startswith("0"):
            raise CallFailed(f"engine.io open expected, got {opened!r}")
        await self.ws.send(f'40{{"token":"{token}"}}')
        while True:
            reply = await asyncio.wait_for(self.ws.recv(), 30)
            assert isinstance(reply, str)
            if reply == "2":
                await self.ws.send("3")
                continue
            break
        if not reply.startswith("40"):
            raise CallFailed(f"socket.io connect refused: {reply}")
        self.session = _decode(reply[2:])["sid"]
        self._start_reader()

    def _frame(self, frame: str | bytes) -> None:
        assert isinstance(frame, str)
        if frame == "2":
            assert self.ws is not None
            asyncio.get_running_loop().create_task(self.ws.send("3"))
            return
        if frame.startswith("42"):
            event, data = _decode(frame[2:])
            if event == "signal":
                self._signal_in(data["from"]["session"], data["data"])
            elif event == "peer-joined":
                self._peer_joined(data["peer"]["session"])
            else:
                self.events_seen += 1
        elif frame.startswith("43"):
            start = body = 2
            while frame[body].isdigit():
                body += 1
            request_id = int(frame[start:body])
            (reply,) = _decode(frame[body:])
            future = self.pending.pop(request_id, None)
            if future is not None:
                if "error" in reply:
                    self._error(reply["error"])
                    future.set_exception(CallFailed(reply["error"]))
                else:
                    future.set_result(reply)
            else:
                if "error" in reply:
                    self._error(reply["error"])
                self._ack()

    async def join(self, room: str) -> list[str]:
        request_id = next(self._ids)
        joined = await self._request(f'42{request_id}["join",{{"room":"{room}"}}]', request_id)
        return [m["session"] for m in joined["members"]]

    async def leave(self, room: str) -> None:
        request_id = next(self._ids)
        await self._request(f'42{request_id}["leave",{{"room":"{room}"}}]', request_id)

    async def signal(self, room: str, to: str | None, data_json: str) -> None:
        assert self.ws is not None
        self.outstanding += 1
        if to is None:
            frame = f'42{next(self._ids)}["signal",{{"room":"{room}","data":{data_json}}}]'
        else:
            frame = (
                f'42{next(self._ids)}["signal",{{"room":"{room}","to":"{to}","data":{data_json}}}]'
            )
        await self.ws.send(frame)


PROTOCOLS: dict[str, type[Peer]] = {"sp": SignalpostPeer, "sio": SocketIOPeer}


# --------------------------------------------------------------------------- control


class Control:
    """READY/GO handshake with the orchestrator on stdin/stdout."""

    def __init__(self, wait: bool) -> None:
        self.wait = wait

    async def checkpoint(self, phase: str) -> None:
        print(f"READY {phase}", flush=True)
        if self.wait:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line.startswith("GO"):
                raise SystemExit(f"loadgen: expected GO, got {line!r}")

    @staticmethod
    def done() -> None:
        print("DONE", flush=True)


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p90/p99/max of ``samples`` (seconds) in milliseconds."""
    if not samples:
        return {}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0

    return {
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "max": ordered[-1] * 1000.0,
        "n": float(len(ordered)),
    }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Generator:
    """State shared by the workloads: peers, tokens, URLs, the control channel."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.urls: list[str] = args.url
        self.peer_class = PROTOCOLS[args.proto]
        self.control = Control(wait=not args.no_wait and not sys.stdin.isatty())
        self.prefix = secrets.token_hex(3)
        self.peers: list[Peer] = []
        self._token_cache: dict[str, str] = {}

    def token(self, user: str) -> str:
        token = self._token_cache.get(user)
        if token is None:
            token = mint_token(self.args.secret, user, now=time.time(), ttl=24 * 3600.0)
            self._token_cache[user] = token
        return token

    async def open(self, count: int, url_of: Callable[[int], str], first: int = 0) -> list[Peer]:
        """Open ``count`` authenticated peers, ``concurrency`` handshakes at a time."""
        limit = asyncio.Semaphore(self.args.concurrency)
        peers: list[Peer] = [self.peer_class(f"u{first + i}") for i in range(count)]

        async def one(i: int) -> None:
            async with limit:
                for attempt in range(3):
                    try:
                        # All users share one token: minting 10k JWTs costs the generator
                        # seconds and tells nothing about the server.
                        await peers[i].connect(url_of(first + i), self.token("bench"))
                        return
                    except (OSError, InvalidStatus, TimeoutError):
                        if attempt == 2:
                            raise
                        await asyncio.sleep(0.2 * (attempt + 1))

        await asyncio.gather(*(one(i) for i in range(count)))
        self.peers.extend(peers)
        return peers

    async def close_all(self) -> None:
        limit = asyncio.Semaphore(200)

        async def one(peer: Peer) -> None:
            async with limit:
                await peer.close()

        await asyncio.gather(*(one(p) for p in self.peers))

    def errors(self) -> dict[str, Any]:
        codes: dict[str, int] = {}
        for peer in self.peers:
            for code, n in peer.error_codes.items():
                codes[code] = codes.get(code, 0) + n
        return {"errors": sum(p.errors for p in self.peers), "error_codes": codes}


# --------------------------------------------------------------------------- workloads


def _dump_samples(path: str, sent: list[float], latencies: list[float]) -> None:
    """Write ``send time latency`` per sample (seconds; the send time on ``perf_counter``,
    CLOCK_MONOTONIC, which every process of the machine shares), one a line."""
    with open(path, "w") as out:
        out.writelines(f"{t:.6f} {lat:.6f}\n" for t, lat in zip(sent, latencies, strict=True))


async def relay(gen: Generator) -> dict[str, Any]:
    args = gen.args
    urls = gen.urls
    # Pair i: client 2i on urls[0], 2i+1 on urls[1] (if given): every signal crosses edges.
    peers = await gen.open(2 * args.pairs, lambda i: urls[(i % 2) % len(urls)])
    pairs = [(peers[2 * i], peers[2 * i + 1], f"{gen.prefix}-r{i}") for i in range(args.pairs)]
    for a, b, room in pairs:
        await a.join(room)
        await b.join(room)

    measuring = False
    latencies: list[float] = []
    sent_at: list[float] = []  # with --dump: when each measured sample was sent

    def record(_sender: str, data: Any) -> None:
        if measuring:
            latencies.append(clock() - data["t"])
            if args.dump:
                sent_at.append(data["t"])

    pad = candidate_json(0)
    template = timed_json(pad)
    senders: list[tuple[Peer, str, str]] = []
    for a, b, room in pairs:
        a.on_signal = b.on_signal = record
        a.window = b.window = args.window
        senders += [(a, room, b.session), (b, room, a.session)]

    stop = asyncio.Event()
    per_sender_rate = args.rate / len(senders) if args.rate > 0 else 0.0

    async def closed_loop(peer: Peer, room: str, to: str) -> None:
        while not stop.is_set():
            await peer.wait_window()
            if stop.is_set() or peer.closed:
                return
            await peer.signal(room, to, template % clock())

    async def open_loop(peer: Peer, room: str, to: str) -> None:
        interval = 1.0 / per_sender_rate
        next_at = clock() + random.random() * interval
        while not stop.is_set():
            delay = next_at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at += interval
            if peer.outstanding < 10_000:  # bounded even if the server stalls
                await peer.signal(room, to, template % clock())

    loop_of = open_loop if per_sender_rate else closed_loop
    tasks = [asyncio.create_task(loop_of(*s)) for s in senders]
    await asyncio.sleep(args.warmup)
    await gen.control.checkpoint("measure")

    def totals() -> tuple[int, int, float]:
        return (sum(p.received for p in peers), sum(p.acked for p in peers), cpu_seconds())

    measuring = True
    start, (received0, acked0, cpu0) = clock(), totals()
    await asyncio.sleep(args.duration)
    elapsed, (received1, acked1, cpu1) = clock() - start, totals()
    measuring = False
    gen.control.done()
    stop.set()
    for peer in peers:
        peer.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    relayed = received1 - received0
    if args.dump:  # (send time, latency) per sample, for bench/experiments/cluster_latency.py
        _dump_samples(args.dump, sent_at, latencies)
    return {
        "relayed": relayed,
        "acked": acked1 - acked0,
        "elapsed": elapsed,
        "relayed_per_s": relayed / elapsed,
        "latency_ms": percentiles(latencies),
        "gen_cpu_s": cpu1 - cpu0,
        **gen.errors(),
    }


async def calls(gen: Generator) -> dict[str, Any]:
    args = gen.args
    urls = gen.urls
    slots = args.slots
    peers = await gen.open(2 * slots, lambda i: urls[(i % 2) % len(urls)])
    free: asyncio.Queue[tuple[Peer, Peer]] = asyncio.Queue()
    for i in range(slots):
        free.put_nowait((peers[2 * i], peers[2 * i + 1]))
    offer, answer = offer_json(), answer_json()
    candidates = [candidate_json(i) for i in range(CANDIDATES_EACH_WAY)]
    counter = itertools.count()
    measuring = False
    window_start = 0.0
    setups: list[float] = []
    outcome = {"ok": 0, "failed": 0, "ok_in_window": 0}
    failures: dict[str, int] = {}

    async def expect_signals(peer: Peer, count: int) -> None:
        assert peer.inbox is not None
        while count:
            kind, _sender, _data = await peer.inbox.get()
            if kind == "signal":
                count -= 1

    async def one_call(caller: Peer, callee: Peer, scheduled: float) -> None:
        room = f"{gen.prefix}-c{next(counter)}"
        caller.inbox, callee.inbox = asyncio.Queue(), asyncio.Queue()
        try:
            async with asyncio.timeout(args.call_timeout):
                await caller.join(room)
                await callee.join(room)
                kind, callee_session, _ = await caller.inbox.get()
                while kind != "peer-joined":
                    kind, callee_session, _ = await caller.inbox.get()
                await caller.signal(room, callee_session, offer)
                for candidate in candidates:
                    await caller.signal(room, callee_session, candidate)
                await expect_signals(callee, 1)  # the offer
                await callee.signal(room, caller.session, answer)
                for candidate in candidates:
                    await callee.signal(room, caller.session, candidate)
                await asyncio.gather(
                    expect_signals(caller, 1 + CANDIDATES_EACH_WAY),
                    expect_signals(callee, CANDIDATES_EACH_WAY),
                    caller.drained(),
                    callee.drained(),
                )
                done = clock()
                await caller.leave(room)
                await callee.leave(room)
        except (CallFailed, TimeoutError, ConnectionClosed) as exc:
            outcome["failed"] += 1
            name = type(exc).__name__ + (f": {exc}" if str(exc) else "")
            failures[name] = failures.get(name, 0) + 1
            caller.outstanding = callee.outstanding = 0
            return
        finally:
            caller.inbox = callee.inbox = None
        outcome["ok"] += 1
        if measuring and scheduled >= window_start:
            setups.append(done - scheduled)
            outcome["ok_in_window"] += 1

    stop = asyncio.Event()
    running: set[asyncio.Task[None]] = set()

    async def closed_slot(caller: Peer, callee: Peer) -> None:
        while not stop.is_set():
            await one_call(caller, callee, clock())

    async def launcher() -> None:
        rng = random.Random(7)
        next_at = clock()
        while not stop.is_set():
            next_at += rng.expovariate(args.rate)
            delay = next_at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            scheduled = next_at
            pair = await free.get()  # waits when every pair is busy: counted in setup time

            async def run(pair: tuple[Peer, Peer] = pair, scheduled: float = scheduled) -> None:
                try:
                    await one_call(pair[0], pair[1], scheduled)
                finally:
                    free.put_nowait(pair)

            task = asyncio.create_task(run())
            running.add(task)
            task.add_done_callback(running.discard)

    if args.rate > 0:
        tasks = [asyncio.create_task(launcher())]
    else:
        tasks = [asyncio.create_task(closed_slot(*free.get_nowait())) for _ in range(slots)]
    await asyncio.sleep(args.warmup)
    await gen.control.checkpoint("measure")
    measuring = True
    window_start = clock()
    ok0, cpu0 = outcome["ok"], cpu_seconds()
    await asyncio.sleep(args.duration)
    elapsed = clock() - window_start
    completed, cpu1 = outcome["ok"] - ok0, cpu_seconds()
    gen.control.done()
    stop.set()
    # Let calls in flight finish so every started call counts (bounded by call_timeout).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.call_timeout + 2):
            await asyncio.gather(*tasks, *list(running), return_exceptions=True)
    return {
        "calls": completed,
        "elapsed": elapsed,
        "calls_per_s": completed / elapsed,
        "setup_ms": percentiles(setups),
        "failed": outcome["failed"],
        "failures": failures,
        "gen_cpu_s": cpu1 - cpu0,
        **gen.errors(),
    }


async def fanout(gen: Generator) -> dict[str, Any]:
    args = gen.args
    urls = gen.urls
    members = args.members
    groups = max(1, args.clients // members)
    peers = await gen.open(groups * members, lambda i: urls[i % len(urls)])
    rooms_of_group: list[list[str]] = [[] for _ in range(groups)]
    for r in range(args.rooms):
        rooms_of_group[r % groups].append(f"{gen.prefix}-f{r}")

    async def join_all(peer: Peer, rooms: list[str]) -> None:
        for room in rooms:
            await peer.join(room)

    join_start = clock()
    await asyncio.gather(
        *(
            join_all(peers[g * members + m], rooms_of_group[g])
            for g in range(groups)
            for m in range(members)
        )
    )
    join_elapsed = clock() - join_start

    measuring = False
    latencies: list[float] = []

    def record(_sender: str, data: Any) -> None:
        if measuring:
            latencies.append(clock() - data["t"])

    template = timed_json(candidate_json(0))
    senders: list[tuple[Peer, list[str]]] = []
    for g in range(groups):
        for m in range(members):
            peer = peers[g * members + m]
            peer.on_signal = record
            peer.window = args.window
            if m < args.senders_per_group and rooms_of_group[g]:
                senders.append((peer, rooms_of_group[g]))
    stop = asyncio.Event()

    async def send_loop(peer: Peer, rooms: list[str]) -> None:
        for room in itertools.cycle(rooms):
            await peer.wait_window()
            if stop.is_set() or peer.closed:
                return
            await peer.signal(room, None, template % clock())

    tasks = [asyncio.create_task(send_loop(*s)) for s in senders]
    await asyncio.sleep(args.warmup)
    await gen.control.checkpoint("measure")

    def totals() -> tuple[int, int, float]:
        return (sum(p.received for p in peers), sum(p.acked for p in peers), cpu_seconds())

    measuring = True
    start, (received0, acked0, cpu0) = clock(), totals()
    await asyncio.sleep(args.duration)
    elapsed, (received1, acked1, cpu1) = clock() - start, totals()
    measuring = False
    gen.control.done()
    stop.set()
    for peer in peers:
        peer.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    delivered = received1 - received0
    return {
        "rooms": args.rooms,
        "members": members,
        "clients": len(peers),
        "join_s": join_elapsed,
        "broadcasts": acked1 - acked0,
        "delivered": delivered,
        "elapsed": elapsed,
        "delivered_per_s": delivered / elapsed,
        "latency_ms": percentiles(latencies),
        "gen_cpu_s": cpu1 - cpu0,
        **gen.errors(),
    }


async def idle(gen: Generator) -> dict[str, Any]:
    args = gen.args
    urls = gen.urls
    first = max(1, args.conns // 10)
    start = clock()
    await gen.open(first, lambda i: urls[i % len(urls)])
    await gen.control.checkpoint("baseline")
    await gen.open(args.conns - first, lambda i: urls[i % len(urls)], first=first)
    connect_s = clock() - start
    await asyncio.sleep(args.settle)
    await gen.control.checkpoint("loaded")
    alive = sum(1 for p in gen.peers if p.ws is not None and p.ws.close_code is None)
    return {
        "conns": len(gen.peers),
        "baseline_conns": first,
        "alive": alive,
        "connect_s": connect_s,
        **gen.errors(),
    }


WORKLOADS = {"relay": relay, "calls": calls, "fanout": fanout, "idle": idle}


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    gen = Generator(args)
    try:
        async with asyncio.timeout(args.timeout):
            result = await WORKLOADS[args.workload](gen)
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(30):
                await gen.close_all()
    result["workload"] = args.workload
    result["proto"] = args.proto
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.loadgen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="workload", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        action="append",
        required=True,
        help="server WebSocket URL; repeat for several edges",
    )
    common.add_argument("--proto", choices=sorted(PROTOCOLS), default="sp")
    common.add_argument("--secret", default=os.environ.get("SIGNALPOST_JWT_SECRET", ""))
    common.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    common.add_argument("--warmup", type=float, default=2.0)
    common.add_argument("--concurrency", type=int, default=100, help="handshakes at a time")
    common.add_argument("--timeout", type=float, default=600.0, help="hard limit, seconds")
    common.add_argument("--no-wait", action="store_true", help="do not wait for GO on stdin")

    relay_p = sub.add_parser("relay", parents=[common])
    relay_p.add_argument("--pairs", type=int, default=50)
    relay_p.add_argument("--window", type=int, default=4, help="unacked signals per client")
    relay_p.add_argument("--rate", type=float, default=0.0, help="signals/s in total (open loop)")
    relay_p.add_argument("--dump", help="write each sample's send time and latency here")

    calls_p = sub.add_parser("calls", parents=[common])
    calls_p.add_argument("--slots", type=int, default=32, help="client pairs")
    calls_p.add_argument("--rate", type=float, default=0.0, help="calls/s (open loop)")
    calls_p.add_argument("--call-timeout", type=float, default=10.0)

    fan_p = sub.add_parser("fanout", parents=[common])
    fan_p.add_argument("--rooms", type=int, default=10)
    fan_p.add_argument("--members", type=int, default=2)
    fan_p.add_argument("--clients", type=int, default=200)
    fan_p.add_argument("--senders-per-group", type=int, default=1)
    fan_p.add_argument("--window", type=int, default=4)

    idle_p = sub.add_parser("idle", parents=[common])
    idle_p.add_argument("--conns", type=int, default=1000)
    idle_p.add_argument("--settle", type=float, default=2.0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(_main(args))
    else:
        result = uvloop.run(_main(args))
    print("RESULT " + _encode(result).decode(), flush=True)


if __name__ == "__main__":
    main()
