"""Broker routing: envelopes/s through ``RoomTable`` alone, and through a real broker.

``core``: the pure core, in this process. ``rooms`` rooms of two members each; then
``SignalCmd`` envelopes round-robin over the rooms, each ``to`` the other member and
with a request id (so each yields a ``Reply`` and a ``Deliver``). Measured twice: bare
``RoomTable.handle`` calls, and the whole per-envelope work of a broker process minus
the socket (msgpack decode, handle, msgpack encode of every outbound envelope). The time
of each call gives the p50/p99 the core adds per hop.

``zmq``: a real ``signalpost broker`` process, driven over ZeroMQ by a DEALER that poses
as an edge (heartbeat, joins, then pipelined signals). Throughput with ``window``
commands in flight; round-trip time (edge -> broker -> edge, two hops) with one in
flight. The broker's CPU time per envelope comes from psutil. Frames are the wire's
(``signalpost.transport.frame``): the bench edge puts up to ``--batch`` commands in one
frame (default 1, one per frame; a real edge batches what it sends a broker in one event
loop iteration), and counts every envelope of the broker's batched answers.
``commands_per_s`` is envelopes in per second; ``frames_in``/``frames_out`` show the
batching (frames the broker received/sent in the throughput phase).

    .venv/bin/python -m bench.broker_bench core
    .venv/bin/python -m bench.broker_bench zmq
    .venv/bin/python -m bench.broker_bench zmq --batch 64
    .venv/bin/python -m bench.broker_bench zmq --curve
    .venv/bin/python -m bench.broker_bench compare --rounds 3 --batch 4

``--curve``: the broker and the bench edge use CurveZMQ keys (written to a temporary
directory, as ``signalpost cluster`` does); without it the broker runs with
``--insecure-node-links``. ``compare``: plaintext and CurveZMQ brokers in alternating runs
(``--rounds`` of each), reporting envelopes (in + out) per broker CPU-second.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from broker.rooms import RoomTable
from signalpost.transport import frame, unframe
from signalpost.wire import (
    Confirm,
    Deliver,
    Envelope,
    Heartbeat,
    JoinCmd,
    Reply,
    SignalCmd,
    decode_batch,
    decode_envelope,
    encode_envelope,
    peer_object,
    sender_object,
)

DATA = (
    b'{"candidate":"candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr '
    b'10.0.0.2 rport 46154 generation 0 ufrag EsAw network-id 1 network-cost 10",'
    b'"sdpMid":"0","sdpMLineIndex":0}'
)
EDGE = "edge-bench"
#: Envelopes per frame a real edge sent its broker in the cluster relay at max load
#: (4.3-5.1 on average, counted at the broker's router on 2026-12-02): the realistic case
#: beside one envelope per frame.
EDGE_BATCH = 4


def _percentiles_ns(samples: list[int]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0

    return {"p50_us": at(0.5), "p99_us": at(0.99), "max_us": ordered[-1] / 1000.0}


def _table() -> RoomTable:
    counter = iter(range(1 << 62))
    return RoomTable(
        capacity=2,
        resume_window=30.0,
        history_max_events=1024,
        history_max_age=120.0,
        new_epoch=lambda: f"e{next(counter)}",
    )


def _joins(rooms: int) -> list[JoinCmd]:
    commands = []
    for r in range(rooms):
        for m in range(2):
            session = f"s{r}-{m}"
            commands.append(
                JoinCmd(
                    session,
                    f"c{session}",
                    EDGE,
                    1,
                    1,
                    f"room{r}",
                    peer_object(session, f"u{r}-{m}", None, None),
                )
            )
    return commands


def _signals(rooms: int, count: int, first_seq: int = 2) -> Iterator[SignalCmd]:
    """``count`` signals round-robin over the rooms, each with a fresh request ``seq``.

    Made on the fly: a prebuilt list of 300k envelopes would itself be 300k objects for
    the cyclic GC to scan, and the GC's share is part of what this measures.
    """
    senders = [sender_object(f"s{r}-0", f"u{r}-0") for r in range(rooms)]
    for i in range(count):
        r = i % rooms
        yield SignalCmd(
            f"s{r}-0",
            f"cs{r}-0",
            EDGE,
            first_seq + i // rooms,
            i,
            f"room{r}",
            f"s{r}-1",
            senders[r],
            DATA,
        )


def _timed(table: RoomTable, commands: Iterable[Any], step: bool = False) -> dict[str, float]:
    """Apply ``commands`` one by one, timing each; throughput, p50/p99/max per call."""
    clock = time.perf_counter_ns
    per_call: list[int] = []
    append = per_call.append
    handle = table.handle
    out = 0
    start = clock()
    if step:  # bytes in, bytes out: what a broker process does minus the socket
        for body in commands:
            t0 = clock()
            outbound = handle(decode_envelope(body), 1.0)
            for _edge, envelope in outbound:
                encode_envelope(envelope)
            append(clock() - t0)
            out += len(outbound)
    else:
        for command in commands:
            t0 = clock()
            out += len(handle(command, 1.0))
            append(clock() - t0)
    elapsed = (clock() - start) / 1e9
    busy = sum(per_call) / 1e9  # excludes making the commands
    return {
        "commands_per_s": len(per_call) / busy,
        "envelopes_out_per_s": out / busy,
        "wall_commands_per_s": len(per_call) / elapsed,
        **_percentiles_ns(per_call),
    }


def _ready_table(rooms: int) -> RoomTable:
    """A table with ``rooms`` rooms of two members each."""
    table = _table()
    for command in _joins(rooms):
        table.handle(command, 0.0)
    gc.collect()
    return table


def core(rooms: int = 1000, count: int = 200_000) -> dict[str, Any]:
    """Envelopes/s and per-call p50/p99/max through ``RoomTable``, four ways.

    ``handle``: ``RoomTable.handle`` as it is. ``step``: msgpack decode + handle + encode
    of every outbound envelope. ``handle_no_gc``: ``handle`` with the cyclic GC off (the
    difference is what the GC still costs once histories are full).
    """
    results: dict[str, Any] = {"rooms": rooms, "commands": count}
    results["handle"] = _timed(_ready_table(rooms), _signals(rooms, count))
    bodies = (encode_envelope(c) for c in _signals(rooms, count))
    results["step"] = _timed(_ready_table(rooms), bodies, step=True)
    table = _ready_table(rooms)
    gc.disable()
    try:
        results["handle_no_gc"] = _timed(table, _signals(rooms, count))
    finally:
        gc.enable()
    del table
    gc.collect()
    return results


def zmq_broker(
    endpoint: str,
    rooms: int = 200,
    seconds: float = 5.0,
    window: int = 256,
    latency_samples: int = 3000,
    broker: Any = None,
    batch: int = 1,
    keys_dir: Path | None = None,
) -> dict[str, Any]:
    """Drive a running broker at ``endpoint``; ``broker`` (a ``System``) gives its CPU.

    The bench edge sends up to ``batch`` commands per frame; with ``keys_dir`` (see
    ``start_broker``) it speaks CurveZMQ with the key pair written there for it.
    """
    import zmq

    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    if keys_dir is not None:
        from signalpost.config import load_settings
        from signalpost.node_keys import SECRET_SUFFIX, NodeKeys, dial_curve, node_keys

        keys: NodeKeys | None = node_keys(
            load_settings(
                environ={},
                node_key_file=str(keys_dir / (EDGE + SECRET_SUFFIX)),
                cluster_keys_dir=str(keys_dir),
            )
        )
        assert keys is not None and dial_curve(socket, keys, endpoint)
    socket.setsockopt(zmq.IDENTITY, EDGE.encode())
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.connect(endpoint)
    heartbeat = encode_envelope(Heartbeat(EDGE, "bench-incarnation"))
    frames_in = frames_out = 0  # frames the broker received / sent

    def send_all(envelopes: list[Envelope]) -> None:
        """Send ``envelopes`` in frames of up to ``batch``."""
        nonlocal frames_in
        bodies = [encode_envelope(envelope) for envelope in envelopes]
        for i in range(0, len(bodies), batch):
            socket.send(frame(bodies[i : i + batch]))
            frames_in += 1

    def decoded(payload: bytes) -> list[Envelope]:
        nonlocal frames_out
        batch_bytes = unframe(payload)
        assert batch_bytes is not None, payload[:16]
        frames_out += 1
        return decode_batch(batch_bytes)

    def receive(timeout_ms: int) -> list[Envelope] | None:
        """The envelopes of the next frame; None after ``timeout_ms`` without one."""
        if not socket.poll(timeout_ms):
            return None
        return decoded(socket.recv())

    try:
        socket.send(frame([heartbeat]))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            envelopes = receive(200)
            if envelopes is not None and any(isinstance(e, Heartbeat) for e in envelopes):
                break
            socket.send(frame([heartbeat]))
        else:
            raise RuntimeError("the broker never answered the heartbeat")
        last_beat = time.monotonic()

        # Like a real edge, confirm what was delivered every 0.1 s (cumulative per room and
        # session): an edge that never confirms has the broker resend its whole history.
        written: dict[tuple[str, str], tuple[str, int]] = {}
        last_confirm = time.monotonic()

        def beat() -> None:
            nonlocal last_beat, last_confirm
            now = time.monotonic()
            if now - last_beat > 0.25:
                socket.send(frame([heartbeat]))
                last_beat = now
            if written and now - last_confirm > 0.1:
                positions = [(r, s, e, o, False) for (r, s), (e, o) in written.items()]
                socket.send(frame([encode_envelope(Confirm(EDGE, positions))]))
                written.clear()
                last_confirm = now

        send_all(list(_joins(rooms)))
        replies = 0
        while replies < 2 * rooms:
            envelopes = receive(5000)
            if envelopes is None:
                raise RuntimeError("joins were not answered")
            replies += sum(isinstance(e, Reply) for e in envelopes)

        seq = iter(range(2, 1 << 62))
        senders = [sender_object(f"s{r}-0", f"u{r}-0") for r in range(rooms)]

        def signal(i: int) -> SignalCmd:
            # (Ids above the joins': the same id for another request is refused.)
            r = i % rooms
            return SignalCmd(
                f"s{r}-0",
                f"cs{r}-0",
                EDGE,
                next(seq),
                1_000_000 + i,
                f"room{r}",
                f"s{r}-1",
                senders[r],
                DATA,
            )

        # Throughput: ``window`` commands in flight.
        answered = delivered = 0
        seen: set[tuple[str, int]] = set()

        def count(envelopes: list[Envelope]) -> None:
            nonlocal answered, delivered
            for envelope in envelopes:
                if isinstance(envelope, Reply):
                    answered += 1
                elif isinstance(envelope, Deliver):
                    if (envelope.room, envelope.offset) in seen or envelope.payload.startswith(
                        b'{"type":"peer-'
                    ):
                        continue  # a resend, or the joins' peer-joined (resent unconfirmed)
                    seen.add((envelope.room, envelope.offset))
                    delivered += 1
                    if envelope.room:
                        for session in envelope.sessions:
                            written[(envelope.room, session)] = (envelope.epoch, envelope.offset)

        before = broker.sample() if broker is not None else None
        frames_in = frames_out = 0
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < seconds:
            if sent - answered < window:
                more = window - (sent - answered)
                send_all([signal(sent + k) for k in range(more)])
                sent += more
            envelopes = receive(5000)
            if envelopes is None:
                raise RuntimeError("the broker stopped answering")
            count(envelopes)
            while socket.poll(0):
                count(decoded(socket.recv()))
            beat()
        elapsed = time.monotonic() - start
        after = broker.sample() if broker is not None else None
        throughput_frames = (frames_in, frames_out)
        while answered < sent or delivered < sent:
            envelopes = receive(5000)
            if envelopes is None:
                break
            count(envelopes)
        complete = answered == sent and delivered == sent

        # Round trip with one command in flight.
        rtts: list[int] = []
        for i in range(latency_samples):
            t0 = time.perf_counter_ns()
            send_all([signal(sent + i)])  # new ids: a reused one is answered, not delivered
            got = 0
            while got < 2:
                envelopes = receive(5000)
                if envelopes is None:
                    raise RuntimeError("no answer in the latency phase")
                got += sum(isinstance(e, Reply | Deliver) for e in envelopes)
                for envelope in envelopes:
                    if isinstance(envelope, Deliver) and envelope.room:
                        for session in envelope.sessions:
                            written[(envelope.room, session)] = (envelope.epoch, envelope.offset)
            rtts.append(time.perf_counter_ns() - t0)
            beat()
        result: dict[str, Any] = {
            "rooms": rooms,
            "window": window,
            "batch": batch,
            "commands": sent,
            "complete": complete,
            "commands_per_s": sent / elapsed,
            "envelopes_in_out_per_s": 3 * sent / elapsed,
            "frames_in": throughput_frames[0],
            "frames_out": throughput_frames[1],
            "rtt": _percentiles_ns(rtts),
        }
        if before is not None and after is not None:
            cpu = after.cpu - before.cpu
            result["broker_cpu_s"] = cpu
            result["broker_cpu_us_per_command"] = cpu / sent * 1e6
            result["broker_cores"] = cpu / elapsed
            result["envelopes_per_broker_cpu_s"] = 3 * sent / cpu if cpu > 0 else None
            result["envelopes_in_per_broker_cpu_s"] = sent / cpu if cpu > 0 else None
        result["curve"] = keys_dir is not None
        return result
    finally:
        socket.close(0)
        context.term()


def start_broker(keys_dir: Path | None = None) -> Any:
    """A standalone ``signalpost broker`` on a free port, as a ``bench.systems.System``.

    With ``keys_dir``, key pairs for the broker and the bench edge are written there and
    the broker uses CurveZMQ; without, it runs with ``--insecure-node-links``.
    """
    import socket as sockets

    from bench.systems import PYTHON, SIGNALPOST, System, Unavailable, _spawn, server_env

    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    argv = [
        PYTHON,
        SIGNALPOST,
        "--log-level",
        "WARNING",
        "broker",
        "--id",
        "broker-bench",
        "--bind",
        endpoint,
    ]
    extra: dict[str, str] = {}
    if keys_dir is None:
        argv.append("--insecure-node-links")
    else:
        from signalpost.node_keys import SECRET_SUFFIX, create_node_keys

        create_node_keys(keys_dir, "broker-bench", endpoint, kind="broker")
        if not (keys_dir / (EDGE + SECRET_SUFFIX)).exists():
            create_node_keys(keys_dir, EDGE, kind="edge")
        extra = {
            "SIGNALPOST_NODE_KEY_FILE": str(keys_dir / ("broker-bench" + SECRET_SUFFIX)),
            "SIGNALPOST_CLUSTER_KEYS_DIR": str(keys_dir),
            "SIGNALPOST_TICKET_SECRET": "bench-ticket-secret-0123456789abcdef",
        }
    proc, out = _spawn("broker", argv, server_env(extra=extra))
    try:
        out.wait_for("signalpost broker", 30)
    except (Unavailable, TimeoutError) as exc:
        proc.kill()
        raise Unavailable(f"signalpost broker: {exc}") from None
    return System("broker", "signalpost broker", [endpoint], proc)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("core", "zmq", "compare"))
    parser.add_argument("--rooms", type=int, default=1000)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--batch", type=int, default=1, help="zmq: most commands per frame the bench edge sends"
    )
    parser.add_argument("--curve", action="store_true", help="zmq: CurveZMQ node links")
    parser.add_argument("--rounds", type=int, default=3, help="compare: runs of each mode")
    args = parser.parse_args()
    if args.what == "core":
        print(json.dumps(core(args.rooms, args.count), indent=2))
        return

    def run_once(curve: bool) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="signalpost-bench-keys-") as directory:
            keys_dir = Path(directory) if curve else None
            broker = start_broker(keys_dir)
            try:
                return zmq_broker(
                    broker.urls[0],
                    rooms=min(args.rooms, 1000),
                    seconds=args.seconds,
                    broker=broker,
                    batch=args.batch,
                    keys_dir=keys_dir,
                )
            finally:
                broker.stop()

    if args.what == "zmq":
        print(json.dumps(run_once(args.curve), indent=2))
        return
    runs: dict[str, list[dict[str, Any]]] = {"plaintext": [], "curve": []}
    for _ in range(args.rounds):  # alternating, so drift in the machine hits both alike
        runs["plaintext"].append(run_once(False))
        runs["curve"].append(run_once(True))
    summary = {
        mode: {
            "envelopes_per_broker_cpu_s": [round(r["envelopes_per_broker_cpu_s"]) for r in rs],
            "median_envelopes_per_broker_cpu_s": round(
                statistics.median(r["envelopes_per_broker_cpu_s"] for r in rs)
            ),
            "median_envelopes_in_per_broker_cpu_s": round(
                statistics.median(r["envelopes_in_per_broker_cpu_s"] for r in rs)
            ),
            "commands_per_s": [round(r["commands_per_s"]) for r in rs],
            "rtt_p50_us": [round(r["rtt"]["p50_us"], 1) for r in rs if "p50_us" in r["rtt"]],
            "complete": all(r["complete"] for r in rs),
        }
        for mode, rs in runs.items()
    }
    print(json.dumps({"batch": args.batch, "seconds": args.seconds, **summary}, indent=2))


if __name__ == "__main__":
    main()
