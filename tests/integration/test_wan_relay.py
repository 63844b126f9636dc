"""The emulated WAN relay over real sockets: delay, order, end of stream, resets, ZeroMQ."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time

import pytest
import zmq
import zmq.asyncio

from signalpost.cluster import free_port
from signalpost.wan_relay import WanRelay

DELAY = 0.05


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_a_round_trip_takes_twice_the_delay_and_keeps_order() -> None:
    echo, port = await _echo_server()
    listen = free_port()
    relay = WanRelay([(("127.0.0.1", listen), ("127.0.0.1", port))], DELAY)
    await relay.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listen)
        started = time.monotonic()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert time.monotonic() - started >= 2 * DELAY
        payload = b"".join(struct.pack("!I", n) for n in range(50_000))  # 200 KB
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        writer.write_eof()  # the end of stream crosses too: the echo server closes
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert relay.relayed == [[4 + len(payload), 4 + len(payload)]]  # counted both ways
        writer.close()
    finally:
        await relay.close()
        echo.close()


async def test_a_reset_on_one_side_resets_the_other() -> None:
    accepted = asyncio.Event()
    ended: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        try:
            ended.set_result(await reader.read())  # until the relay gives up on us
        except ConnectionError as exc:
            ended.set_exception(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    listen = free_port()
    relay = WanRelay(
        [(("127.0.0.1", listen), ("127.0.0.1", server.sockets[0].getsockname()[1]))], DELAY
    )
    await relay.start()
    try:
        client = socket.create_connection(("127.0.0.1", listen))
        await asyncio.wait_for(accepted.wait(), 5)
        # SO_LINGER 0: close sends a RST, as `ss -K` or a dead host would
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        # reset as well, or an end of stream: either way the far side saw the link end
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(ended, 5) == b""
    finally:
        await relay.close()
        server.close()


async def test_zeromq_dealer_and_router_talk_through_it() -> None:
    context = zmq.asyncio.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    listen = free_port()
    relay = WanRelay([(("127.0.0.1", listen), ("127.0.0.1", port))], DELAY)
    await relay.start()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{listen}")
    try:
        started = time.monotonic()
        await dealer.send(b"hello")
        identity, body = await asyncio.wait_for(router.recv_multipart(), 5)
        assert body == b"hello"
        await router.send_multipart([identity, b"back"])
        assert await asyncio.wait_for(dealer.recv(), 5) == b"back"
        assert time.monotonic() - started >= 2 * DELAY
    finally:
        dealer.close(0)
        router.close(0)
        context.term()
        await relay.close()


async def test_closing_with_live_connections_ends_them_without_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A relay stopped while it relays (the launcher stops a region) drops each line and
    logs nothing at ERROR (asyncio logged a CancelledError per connection before)."""
    echo, port = await _echo_server()
    listen = free_port()
    relay = WanRelay([(("127.0.0.1", listen), ("127.0.0.1", port))], DELAY)
    await relay.start()
    lines = [await asyncio.open_connection("127.0.0.1", listen) for _ in range(3)]
    try:
        for reader, writer in lines:
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        await relay.close()
        for reader, _writer in lines:  # each line ends (closed or reset)
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
        await asyncio.sleep(0.05)  # asyncio's done callbacks have run
    finally:
        for _reader, writer in lines:
            writer.close()
        echo.close()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
