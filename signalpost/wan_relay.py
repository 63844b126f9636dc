"""An emulated WAN: a TCP relay that holds every byte for a fixed one-way delay.

This kernel has no netem, so ``signalpost cluster --regions`` puts one of these in front
of each region's node links: a node of another region dials the relay, and the relay
dials the node. Each direction of each connection is a ``DelayLine`` (the sans-I/O core:
bytes and time in, bytes due out); the shell moves bytes between sockets. Order is kept,
an end of stream is delayed like data, and a reset on one side resets the other.

Bounded: a line holds at most ``max_held`` bytes; past it the relay stops reading from that
side (TCP flow control then slows the sender), and resumes reading once half is gone.

    signalpost wan-relay --delay 40ms --pair 127.0.0.1:7001=127.0.0.1:5555 [--pair ...]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Final

from signalpost.errors import ConfigError
from signalpost.lifecycle import cancel_all, until_stopped

log = logging.getLogger("signalpost.wan_relay")

#: Bytes one direction of a connection may hold before the relay stops reading it.
MAX_HELD: Final = 4 * 1024 * 1024
READ_SIZE: Final = 65536

#: A delayed end of stream (the far side is then shut for writing).
EOF: Final = b""


@dataclass
class DelayLine:
    """One direction of a relayed connection: what was read, released ``delay`` later."""

    delay: float
    max_held: int = MAX_HELD
    _held: deque[tuple[float, bytes]] = field(default_factory=deque)
    held_bytes: int = 0
    closed: bool = False  # an end of stream was pushed: nothing may follow it

    def push(self, data: bytes, now: float) -> None:
        """``data`` read at ``now`` (``EOF`` for the end of the stream)."""
        if self.closed:
            raise ValueError("data after the end of the stream")
        if data == EOF:
            self.closed = True
        self._held.append((now + self.delay, data))
        self.held_bytes += len(data)

    @property
    def full(self) -> bool:
        """Stop reading: the line holds its bound."""
        return self.held_bytes >= self.max_held

    @property
    def drained(self) -> bool:
        """Read again: half the bound is gone."""
        return self.held_bytes <= self.max_held // 2

    def next_due(self) -> float | None:
        """When the next chunk is due, or None while the line is empty."""
        return self._held[0][0] if self._held else None

    def take_due(self, now: float) -> list[bytes]:
        """The chunks due by ``now``, in order (``EOF`` last if it is due)."""
        out: list[bytes] = []
        held = self._held
        while held and held[0][0] <= now:
            _, data = held.popleft()
            self.held_bytes -= len(data)
            out.append(data)
        return out


def parse_delay(text: str) -> float:
    """``40ms``, ``0.04s`` or ``0.04`` (seconds) as seconds."""
    raw = text.strip().lower()
    try:
        if raw.endswith("ms"):
            value = float(raw[:-2]) / 1000.0
        elif raw.endswith("s"):
            value = float(raw[:-1])
        else:
            value = float(raw)
    except ValueError:
        raise ConfigError(f"not a delay: {text!r} (e.g. 40ms)") from None
    if not 0.0 <= value <= 10.0:
        raise ConfigError(f"delay {text!r} out of range (0 to 10 s)")
    return value


def parse_pair(text: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """``listen_host:port=target_host:port``."""

    def address(part: str) -> tuple[str, int]:
        host, colon, port = part.strip().removeprefix("tcp://").rpartition(":")
        if not colon or not port.isdigit():
            raise ConfigError(f"not host:port: {part!r} in --pair {text!r}")
        return host or "127.0.0.1", int(port)

    listen, equals, target = text.partition("=")
    if not equals:
        raise ConfigError(f"--pair wants listen=target, got {text!r}")
    return address(listen), address(target)


# --------------------------------------------------------------------------- the shell


class _Direction:
    """Moves one direction: reads ``reader`` into a line, writes what is due to ``writer``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delay: float,
        counted: list[int],
        slot: int,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.line = DelayLine(delay)
        self._changed = asyncio.Event()
        self._counted, self._slot = counted, slot  # bytes relayed, for the stats

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.line.full:
                self._changed.clear()
                await self._changed.wait()  # the writer took some out
            data = await self.reader.read(READ_SIZE)
            self.line.push(data, loop.time())
            self._changed.set()
            if data == EOF:
                return

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = self.line.next_due()
            if due is None:
                self._changed.clear()
                await self._changed.wait()
                continue
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            for data in self.line.take_due(loop.time()):
                if data == EOF:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                self.writer.write(data)
                self._counted[self._slot] += len(data)
            self._changed.set()  # room again for the reader
            await self.writer.drain()


async def _relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
    delay: float,
    counted: list[int],
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(*target)
    except OSError as exc:
        log.warning("wan relay: cannot reach %s:%d: %s", *target, exc)
        client_writer.transport.abort()
        return
    directions = (
        _Direction(client_reader, server_writer, delay, counted, 0),
        _Direction(server_reader, client_writer, delay, counted, 1),
    )
    tasks = [asyncio.create_task(coro) for d in directions for coro in (d.read(), d.write())]
    try:
        # Done when both writers delivered their end of stream; any error (a reset on
        # one side) resets the other side too.
        writers = {tasks[1], tasks[3]}
        pending = set(tasks)
        while writers & pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
    except (OSError, asyncio.IncompleteReadError):
        client_writer.transport.abort()
        server_writer.transport.abort()
    except asyncio.CancelledError:  # the relay closes: both sides see the link die
        client_writer.transport.abort()
        server_writer.transport.abort()
        raise
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for writer in (client_writer, server_writer):
            writer.close()


class WanRelay:
    """Listens on every pair's first address and relays to its second with ``delay``."""

    def __init__(self, pairs: list[tuple[tuple[str, int], tuple[str, int]]], delay: float) -> None:
        self.pairs = pairs
        self.delay = delay
        self._servers: list[asyncio.Server] = []
        self._relays: set[asyncio.Task[None]] = set()
        #: Bytes relayed per pair: [towards the target, back from it].
        self.relayed: list[list[int]] = [[0, 0] for _ in pairs]

    async def start(self) -> None:
        for (listen, target), counted in zip(self.pairs, self.relayed, strict=True):

            async def handle(
                reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter,
                target: tuple[str, int] = target,
                counted: list[int] = counted,
            ) -> None:
                task = asyncio.current_task()
                assert task is not None
                self._relays.add(task)
                try:
                    await _relay(reader, writer, target, self.delay, counted)
                except asyncio.CancelledError:
                    # The relay closes. Ending quietly: asyncio's server calls
                    # ``exception()`` on a handler task that ends, which raises (and logs
                    # an error per connection) for a cancelled one.
                    pass
                finally:
                    self._relays.discard(task)

            self._servers.append(await asyncio.start_server(handle, *listen))

    async def close(self) -> None:
        """Stop listening and drop every relayed connection (both sides see them end)."""
        for server in self._servers:
            server.close()
        await cancel_all(list(self._relays))
        for server in self._servers:
            await server.wait_closed()

    async def __aenter__(self) -> WanRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def run(
    pairs: list[tuple[tuple[str, int], tuple[str, int]]],
    delay: float,
    stats: str | None = None,
) -> None:
    """Relay until SIGTERM/SIGINT; with ``stats``, keep the bytes relayed per pair in that
    JSON file (rewritten every 0.5 s)."""
    async with WanRelay(pairs, delay) as relay:
        if stats is not None:
            task = asyncio.get_running_loop().create_task(_write_stats(relay, stats))
        for (host, port), (to_host, to_port) in pairs:
            log.info(
                "wan relay %s:%d -> %s:%d, %.0f ms each way",
                host,
                port,
                to_host,
                to_port,
                delay * 1000,
            )
        print("signalpost wan-relay ready", flush=True)
        try:
            await until_stopped()
        finally:
            if stats is not None:
                await cancel_all([task])
                _dump_stats(relay, stats)


def _dump_stats(relay: WanRelay, path: str) -> None:
    document = [
        {
            "listen": f"{listen[0]}:{listen[1]}",
            "target": f"{target[0]}:{target[1]}",
            "to_target": counted[0],
            "from_target": counted[1],
        }
        for (listen, target), counted in zip(relay.pairs, relay.relayed, strict=True)
    ]
    partial = f"{path}.partial"
    with open(partial, "w") as out:
        json.dump(document, out)
    os.replace(partial, path)  # readers never see half a file


async def _write_stats(relay: WanRelay, path: str) -> None:
    while True:
        _dump_stats(relay, path)
        await asyncio.sleep(0.5)
