"""A real webhook receiver for tests: an aiohttp server on 127.0.0.1 (a free port).

It checks every request's signature with the package's ``verify`` (a bad one is answered
401 and recorded in ``bad``), records the events in arrival order, and can go down
(``stop``: the port refuses connections) and come back on the same port (``start``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from signalpost.errors import BadRequest
from signalpost.webhooks import EVENT_ID_HEADER, verify


class Receiver:
    def __init__(self, secret: str, status: int = 200) -> None:
        self.secret = secret
        self.status = status  # what to answer (a 5xx: the sender retries)
        self.events: list[dict[str, Any]] = []  # every request's event, in arrival order
        self.bad: list[str] = []
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.changed = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event = verify(self.secret, body, dict(request.headers))
        except BadRequest as exc:
            self.bad.append(str(exc))
            return web.Response(status=401)
        if event.get("id") != request.headers.get(EVENT_ID_HEADER):
            self.bad.append("event id header differs from the body's id")
        if self.status >= 300:
            return web.Response(status=self.status)
        self.events.append(event)
        self.changed.set()
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if not self.port:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def unique(self) -> dict[str, dict[str, Any]]:
        """Events by key (the first arrival of each)."""
        seen: dict[str, dict[str, Any]] = {}
        for event in self.events:
            seen.setdefault(str(event["id"]), event)
        return seen

    def duplicates_differ(self) -> list[str]:
        """Keys that arrived twice with different bodies (must be none)."""
        first: dict[str, str] = {}
        differ = []
        for event in self.events:
            body = json.dumps({k: v for k, v in event.items() if k != "created_at"}, sort_keys=True)
            key = str(event["id"])
            if first.setdefault(key, body) != body:
                differ.append(key)
        return differ

    def of_stream(self, prefix: str) -> list[dict[str, Any]]:
        """First arrivals whose key starts with ``prefix``, in arrival order."""
        return [e for e in self.unique().values() if str(e["id"]).startswith(prefix)]

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
