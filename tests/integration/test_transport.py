"""FastSocket over real ZeroMQ sockets: no lost wake-ups, order kept past the high-water mark."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import zmq

from signalpost.transport import FastSocket


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.term()


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
