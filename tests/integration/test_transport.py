"""Node links over real ZeroMQ sockets.

FastSocket: no lost wake-ups, order kept past the high-water mark. Batches: a burst to one
peer travels in few frames, in order; a bad envelope costs only itself; a frame of another
version is dropped and the endpoint goes on; close sends what is queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import TypeVar

import msgspec
import pytest
import zmq

from signalpost.cluster import free_port
from signalpost.transport import (
    BATCH_MAX_BYTES,
    BATCH_MAX_ENVELOPES,
    DealerLink,
    FastSocket,
    Outbox,
    RouterEndpoint,
    frame,
    frames_of,
    unframe,
)
from signalpost.wire import (
    Deliver,
    Envelope,
    Heartbeat,
    decode_batch,
    encode_batch,
    encode_envelope,
)

T = TypeVar("T")


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)  # closes what a failed test left open (term() would wait on it)


def pair(
    context: zmq.Context[zmq.Socket[bytes]], hwm: int
) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    server = context.socket(zmq.DEALER)
    client = context.socket(zmq.DEALER)
    for sock in (server, client):
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client.connect(f"tcp://127.0.0.1:{port}")
    return server, client


async def idle() -> None:
    await asyncio.Event().wait()


async def test_ping_pong_never_stalls(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    # Every reply is sent from inside the receive callback, 3000 times in a row: each
    # wake-up of the descriptor must still be seen (ZeroMQ's descriptor is edge-triggered).
    server_socket, client_socket = pair(context, 1000)
    server, client = FastSocket(server_socket), FastSocket(client_socket)
    done = asyncio.get_running_loop().create_future()
    rounds = 3000

    def on_server(frames: list[bytes]) -> None:
        server.send((b"pong", frames[1]))

    def on_client(frames: list[bytes]) -> None:
        n = int(frames[1])
        if n == rounds:
            done.set_result(n)
        else:
            client.send((b"ping", str(n + 1).encode()))

    server.start("server", on_server, idle)
    client.start("client", on_client, idle)
    client.send((b"ping", b"1"))
    assert await asyncio.wait_for(done, 30) == rounds
    await client.close()
    await server.close()


async def test_sends_past_the_high_water_mark_arrive_in_order(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    server_socket, client_socket = pair(context, 5)
    sender, receiver = FastSocket(client_socket), FastSocket(server_socket)
    got: list[int] = []
    count = 5000
    finished = asyncio.Event()

    def on_receive(frames: list[bytes]) -> None:
        got.append(int(frames[0]))
        if len(got) == count:
            finished.set()

    sender.start("sender", lambda frames: None, idle)
    for n in range(count):  # far past both HWMs: most wait in the sender's backlog
        sender.send((str(n).encode(),))
    assert sender._backlog, "the test must exercise the backlog"
    receiver.start("receiver", on_receive, idle)
    await asyncio.wait_for(finished.wait(), 30)
    assert got == list(range(count))
    await sender.close()
    await receiver.close()


# --------------------------------------------------------------------------- envelope batches
# The other end of each link is a raw ZeroMQ socket here, so the frames themselves are seen.


def router_endpoint(
    context: zmq.Context[zmq.Socket[bytes]],
    got: Collected[tuple[str, Envelope]],
    addressed: frozenset[type] = frozenset(),
) -> RouterEndpoint:
    return RouterEndpoint(
        context,
        "tcp://127.0.0.1:*",
        "owner-1",
        on_envelope=lambda peer, envelope: got.append((peer, envelope)),
        on_peer_lost=lambda peer: None,
        on_peer_restarted=lambda peer: None,
        heartbeat_interval=60.0,  # no periodic heartbeat during a test
        peer_expiry=120.0,
        keys=None,
        max_message=1 << 30,
        addressed=addressed,
    )


def raw_dealer(context: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"edge-1")
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    return dealer


async def receive_raw(socket: zmq.Socket[bytes]) -> list[bytes]:
    """The next message on a plain ZeroMQ socket, without blocking the event loop."""
    while True:
        try:
            return socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            await asyncio.sleep(0.001)


def batch_of(payload: bytes) -> list[Envelope]:
    batch = unframe(payload)
    assert batch is not None, payload[:8]
    return decode_batch(batch)


class Collected(list[T]):
    """A list that can be awaited until it holds ``count`` items."""

    def __init__(self) -> None:
        super().__init__()
        self._grew = asyncio.Event()

    def append(self, item: T) -> None:
        super().append(item)
        self._grew.set()

    async def reach(self, count: int) -> None:
        while len(self) < count:
            self._grew.clear()
            await self._grew.wait()


def deliver(n: int) -> Deliver:
    return Deliver([f"s{n}"], b'{"n":%d}' % n, "conn", n)


async def test_a_burst_to_one_peer_travels_in_few_frames_in_order(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    got: Collected[tuple[str, Envelope]] = Collected()
    async with router_endpoint(context, got) as router:
        dealer = raw_dealer(context, router.endpoint)
        dealer.send(frame([encode_envelope(Heartbeat("edge-1", "inc-1"))]))
        reply = await asyncio.wait_for(receive_raw(dealer), 30)  # the router answers at once
        assert batch_of(reply[0]) == [Heartbeat("owner-1", router.incarnation)]

        count = 3000
        for n in range(count):  # one event loop iteration: one flush
            router.send("edge-1", deliver(n))
        received: list[Envelope] = []
        sizes: list[int] = []
        while len(received) < count:
            parts = await asyncio.wait_for(receive_raw(dealer), 30)
            assert len(parts) == 1
            batch = batch_of(parts[0])
            sizes.append(len(batch))
            received.extend(batch)
        assert received == [deliver(n) for n in range(count)]
        assert sizes == [BATCH_MAX_ENVELOPES, BATCH_MAX_ENVELOPES, count - 2 * BATCH_MAX_ENVELOPES]
        dealer.close()


async def test_a_dealer_link_batches_its_heartbeat_and_sends_in_order(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    link = DealerLink(
        context,
        f"tcp://127.0.0.1:{port}",
        "edge-1",
        "inc-1",
        on_envelope=lambda envelope: None,
        on_up=lambda link, fresh: None,
        on_down=lambda link: None,
        heartbeat_interval=60.0,
        peer_expiry=120.0,
        keys=None,
        max_message=1 << 30,
    )
    link.start()
    count = 500
    for n in range(count):
        link.send(deliver(n))
    received: list[Envelope] = []
    messages = 0
    while len(received) < count + 1:
        identity, payload = await asyncio.wait_for(receive_raw(router), 30)
        assert identity == b"edge-1"
        received.extend(batch_of(payload))
        messages += 1
    # The heartbeat start() queued first, then every envelope: one frame, in order.
    assert received == [Heartbeat("edge-1", "inc-1"), *(deliver(n) for n in range(count))]
    assert messages == 1
    await link.close()
    router.close()


async def test_batches_flow_both_ways_between_a_link_and_an_endpoint(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    at_owner: Collected[tuple[str, Envelope]] = Collected()
    at_edge: Collected[Envelope] = Collected()
    up = asyncio.Event()
    count = 2500
    async with router_endpoint(context, at_owner) as router:
        link = DealerLink(
            context,
            router.endpoint,
            "edge-1",
            "inc-1",
            on_envelope=at_edge.append,
            on_up=lambda link, fresh: up.set(),
            on_down=lambda link: None,
            heartbeat_interval=60.0,
            peer_expiry=120.0,
            keys=None,
            max_message=1 << 30,
        )
        link.start()
        await asyncio.wait_for(up.wait(), 30)
        for n in range(count):
            link.send(deliver(n))
            router.send("edge-1", deliver(-n))
        await asyncio.wait_for(at_owner.reach(count), 30)
        await asyncio.wait_for(at_edge.reach(count), 30)
        assert at_owner == [("edge-1", deliver(n)) for n in range(count)]
        assert at_edge == [deliver(-n) for n in range(count)]
        await link.close()


async def test_one_bad_envelope_in_a_frame_costs_only_itself(
    context: zmq.Context[zmq.Socket[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    got: Collected[tuple[str, Envelope]] = Collected()
    async with router_endpoint(context, got) as router:
        dealer = raw_dealer(context, router.endpoint)
        not_an_envelope = msgspec.msgpack.encode([99, "x"])
        bad_field = msgspec.msgpack.encode([10, "not a list", b"p"])  # Deliver, wrong types
        bodies = [
            encode_envelope(deliver(1)),
            not_an_envelope,
            encode_envelope(deliver(2)),
            bad_field,
            encode_envelope(deliver(3)),
        ]
        dealer.send(frame(bodies))
        dealer.send(frame([encode_envelope(deliver(4))]))
        await asyncio.wait_for(got.reach(4), 30)
        assert got == [("edge-1", deliver(n)) for n in (1, 2, 3, 4)]
        dropped = [r for r in caplog.records if "undecodable envelope" in r.getMessage()]
        assert len(dropped) == 2
        dealer.close()


async def test_frames_of_another_version_or_layout_are_dropped_and_the_endpoint_goes_on(
    context: zmq.Context[zmq.Socket[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    got: Collected[tuple[str, Envelope]] = Collected()
    async with router_endpoint(context, got) as router:
        dealer = raw_dealer(context, router.endpoint)
        body = encode_envelope(deliver(1))
        dealer.send(b"SP2" + body)  # the previous wire: one bare envelope
        dealer.send(b"XX9" + encode_batch([body]))  # a batch, but another version
        dealer.send_multipart([frame([body]), frame([body])])  # two parts: bad layout
        dealer.send(frame([body])[:-1])  # truncated: not even a msgpack array
        dealer.send(frame([encode_envelope(deliver(2))]))
        await asyncio.wait_for(got.reach(1), 30)
        dealer.send(frame([encode_envelope(deliver(3))]))
        await asyncio.wait_for(got.reach(2), 30)
        assert got == [("edge-1", deliver(2)), ("edge-1", deliver(3))]
        messages = [r.getMessage() for r in caplog.records]
        assert sum("bad frame layout" in m for m in messages) == 3
        assert sum("undecodable frame" in m for m in messages) == 1
        dealer.close()


async def test_close_sends_what_is_queued_and_drops_later_sends(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    server_socket, client_socket = pair(context, 1000)
    sender = FastSocket(client_socket)
    outbox = Outbox(sender, routed=False)
    sender.start("sender", lambda frames: None, idle)
    for n in range(3):
        outbox.put("", encode_envelope(deliver(n)))
    outbox.close()  # at once, before the scheduled flush had its turn
    outbox.put("", encode_envelope(deliver(3)))  # dropped: the link is closing
    assert not outbox._pending
    await asyncio.sleep(0)  # the flush scheduled by the first put runs: nothing left
    (payload,) = await asyncio.wait_for(receive_raw(server_socket), 30)
    assert batch_of(payload) == [deliver(0), deliver(1), deliver(2)]
    await sender.close()
    server_socket.close()


async def test_batches_past_the_high_water_mark_keep_their_order(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    server_socket, client_socket = pair(context, 2)
    sender, receiver = FastSocket(client_socket), FastSocket(server_socket)
    outbox = Outbox(sender, routed=False)
    got: list[int] = []
    frame_count = 0
    count = 640
    finished = asyncio.Event()
    filler = b"x" * 65536  # 16 to a frame of BATCH_MAX_BYTES

    def on_receive(frames: list[bytes]) -> int:
        nonlocal frame_count
        frame_count += 1
        batch = unframe(frames[0])
        assert batch is not None
        items = msgspec.msgpack.decode(batch)
        got.extend(n for n, _ in items)
        if len(got) == count:
            finished.set()
        return len(items)

    sender.start("sender", lambda frames: None, idle)
    for n in range(count // 2):
        outbox.put("", msgspec.msgpack.encode([n, filler]))
    outbox.flush()  # 20 frames of about 1 MiB: far past both HWMs
    assert sender._backlog, "the test must exercise the backlog"
    for n in range(count // 2, count):  # queued behind the backlog, not before it
        outbox.put("", msgspec.msgpack.encode([n, filler]))
    receiver.start("receiver", on_receive, idle)
    await asyncio.wait_for(finished.wait(), 60)
    assert got == list(range(count))
    assert frame_count < count
    outbox.close()
    await sender.close()
    await receiver.close()


def test_frames_of_splits_at_the_envelope_and_byte_caps() -> None:
    def lengths(payloads: list[bytes]) -> list[int]:
        return [len(msgspec.msgpack.decode(unframe(p) or b"")) for p in payloads]

    small = [b"\x01"] * (2 * BATCH_MAX_ENVELOPES + 1)
    assert lengths(frames_of(small)) == [BATCH_MAX_ENVELOPES] * 2 + [1]
    big = msgspec.msgpack.encode(b"y" * (BATCH_MAX_BYTES // 3))
    assert lengths(frames_of([big] * 7)) == [2, 2, 2, 1]
    huge = msgspec.msgpack.encode(b"z" * (BATCH_MAX_BYTES + 1))
    assert [len(f) for f in frames_of([huge])] == [len(frame([huge]))]  # alone, not refused


# Links to an owner that stops and starts again at the same address (a new run).


async def owner_at(
    context: zmq.Context[zmq.Socket[bytes]],
    port: int,
    got: Collected[tuple[str, Envelope]],
    *,
    expiry: float,
    addressed: frozenset[type] = frozenset(),
) -> RouterEndpoint:
    """A run of the owner at ``port`` (bound again: ZeroMQ releases a port a moment after
    a close), collecting what it takes into ``got``."""
    for attempt in range(100):
        try:
            return RouterEndpoint(
                context,
                f"tcp://127.0.0.1:{port}",
                "owner-1",
                on_envelope=lambda peer, envelope: got.append((peer, envelope)),
                on_peer_lost=lambda peer: None,
                on_peer_restarted=lambda peer: None,
                heartbeat_interval=0.05,
                peer_expiry=expiry,
                keys=None,
                max_message=1 << 30,
                addressed=addressed,
            )
        except zmq.ZMQError:
            if attempt == 99:
                raise
            await asyncio.sleep(0.02)
    raise AssertionError("unreachable")


def link_to(
    context: zmq.Context[zmq.Socket[bytes]],
    port: int,
    on_up: Callable[[DealerLink, bool], None],
    on_down: Callable[[DealerLink], None],
    *,
    expiry: float,
) -> DealerLink:
    return DealerLink(
        context,
        f"tcp://127.0.0.1:{port}",
        "edge-1",
        "inc-1",
        on_envelope=lambda envelope: None,
        on_up=on_up,
        on_down=on_down,
        heartbeat_interval=0.05,
        peer_expiry=expiry,
        keys=None,
        max_message=1 << 30,
    )


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(200):  # 10 s at most
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_a_link_whose_callbacks_fail_keeps_heartbeating_and_comes_back(
    context: zmq.Context[zmq.Socket[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    """An error escaping ``on_up`` or ``on_down`` is logged and the link goes on: its
    heartbeat loop used to end with it, silently, so the link sent no more heartbeats and
    was never seen down (or up) again."""
    port = free_port()  # bound twice, one owner after the other
    ups: list[bool] = []
    downs: list[str] = []

    def failing_up(link: DealerLink, fresh: bool) -> None:
        ups.append(fresh)
        raise RuntimeError("on_up failed")

    def failing_down(link: DealerLink) -> None:
        downs.append(link.endpoint)
        raise RuntimeError("on_down failed")

    link = link_to(context, port, failing_up, failing_down, expiry=0.5)
    try:
        async with await owner_at(context, port, Collected(), expiry=0.5):
            link.start()
            await until(lambda: len(ups) == 1 and link.alive)
        await until(lambda: len(downs) == 1 and not link.alive)  # the owner is gone
        async with await owner_at(context, port, Collected(), expiry=0.5):  # a new run
            await until(lambda: len(ups) == 2 and link.alive)
            assert ups == [True, True]
        await until(lambda: len(downs) == 2)
    finally:
        await link.close()
    failures = [r.getMessage() for r in caplog.records if r.exc_info]
    assert any("coming up failed" in m for m in failures)
    assert any("going down failed" in m for m in failures)


async def test_a_link_names_the_run_of_the_node_it_hears_before_on_up_sends(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """A link names the run of the node it dials in its heartbeats as soon as it hears a
    new one, ahead of what its ``on_up`` sends (an edge's re-announcements to a restarted
    broker): the node takes that (``addressed``), and nothing sent before naming it."""
    port = free_port()  # bound twice, one run after the other
    ups: list[bool] = []

    def up(link: DealerLink, fresh: bool) -> None:
        ups.append(fresh)
        link.send(deliver(100 + len(ups)))  # as an edge re-announces on a fresh owner

    # The restart is quicker than the expiry: the link never goes down.
    link = link_to(context, port, up, lambda link: None, expiry=5.0)
    first: Collected[tuple[str, Envelope]] = Collected()
    second: Collected[tuple[str, Envelope]] = Collected()
    addressed = frozenset({Deliver})
    try:
        async with await owner_at(context, port, first, expiry=5.0, addressed=addressed) as run:
            link.start()
            await asyncio.wait_for(first.reach(1), 10)
            link.send(deliver(1))
            await asyncio.wait_for(first.reach(2), 10)
            assert run.peers["edge-1"].named == run.incarnation
        async with await owner_at(context, port, second, expiry=5.0, addressed=addressed) as run:
            await asyncio.wait_for(second.reach(1), 10)
            assert run.peers["edge-1"].named == run.incarnation
        assert ups == [True, True]
        assert first == [("edge-1", deliver(101)), ("edge-1", deliver(1))]
        assert second == [("edge-1", deliver(102))]
    finally:
        await link.close()


async def test_an_addressed_envelope_from_a_peer_not_heard_yet_is_dropped(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    got: Collected[tuple[str, Envelope]] = Collected()
    async with router_endpoint(context, got, addressed=frozenset({Deliver})) as router:
        dealer = raw_dealer(context, router.endpoint)
        try:
            dealer.send(frame([encode_envelope(deliver(1))]))  # no heartbeat yet
            old = Heartbeat("edge-1", "inc-1", "an-earlier-run")
            dealer.send(frame([encode_envelope(old), encode_envelope(deliver(2))]))
            named = Heartbeat("edge-1", "inc-1", router.incarnation)
            dealer.send(frame([encode_envelope(named), encode_envelope(deliver(3))]))
            fresh = Heartbeat("edge-1", "inc-1", "")  # a new link: it heard of no run yet
            dealer.send(frame([encode_envelope(fresh), encode_envelope(deliver(4))]))
            await asyncio.wait_for(got.reach(2), 10)
            await asyncio.sleep(0.1)
            assert got == [("edge-1", deliver(3)), ("edge-1", deliver(4))]
        finally:
            dealer.close(linger=0)
