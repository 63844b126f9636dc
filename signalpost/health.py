"""A tiny HTTP server for nodes without one (broker, presence): ``/healthz`` and ``/metrics``.

Consul's HTTP check polls ``/healthz``: an answer means the process is up and its event
loop turns. Anything else gets 404. One request per connection, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from signalpost import metrics

log = logging.getLogger("signalpost.health")

#: Bytes of request head read at most; a check sends far less.
MAX_REQUEST = 8192
READ_TIMEOUT = 5.0


class HealthServer:
    """Serves ``/healthz`` (200 while ``healthy()``) and ``/metrics`` on ``host:port``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port  # 0: picked at start
        self.healthy = True
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/healthz"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        parts = head[:MAX_REQUEST].split(b" ", 2)
        path = parts[1].split(b"?", 1)[0] if len(parts) > 2 else b""
        if path == b"/healthz":
            status, body, kind = (
                ("200 OK", b"ok\n", "text/plain")
                if self.healthy
                else ("503 Service Unavailable", b"stopping\n", "text/plain")
            )
        elif path == b"/metrics":
            data, kind = metrics.exposition()
            status, body = "200 OK", data
        else:
            status, body, kind = "404 Not Found", b"not found\n", "text/plain"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
