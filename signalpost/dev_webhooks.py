"""``signalpost dev``'s own webhook receiver, for the demo app's live panel.

When dev mode has no ``webhook_urls`` of its own, it sends its webhooks to this receiver
(aiohttp, on 127.0.0.1, a free port, with a random secret): each request's signature is
checked with ``signalpost.webhooks.verify``, as a real receiver would, and the last
``KEEP`` events are kept, numbered. The edge serves them at ``/v1/dev-webhooks?after=N``
(only in dev mode), which the demo app polls.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections import deque
from typing import Any, Final

from aiohttp import web

from signalpost.errors import BadRequest
from signalpost.webhooks import verify

#: Events kept for the panel (the oldest go first).
KEEP: Final = 200


class DevInbox:
    """A local webhook receiver whose events the demo app reads."""

    def __init__(self) -> None:
        self.secret = secrets.token_hex(16)
        self.events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=KEEP)
        self.refused = 0
        self._number = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event = verify(self.secret, body, dict(request.headers))
        except BadRequest:
            self.refused += 1
            return web.Response(status=401)
        if not any(event.get("id") == seen.get("id") for _, seen in self.events):
            self._number += 1  # a duplicate (same id) is shown once
            self.events.append((self._number, event))
        return web.Response(status=204)

    def since(self, query: str) -> bytes:
        """The events numbered above ``after`` (from the query string), as JSON."""
        after = 0
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name == "after" and value.isdigit():
                after = int(value)
        events = [{"n": n, "event": e} for n, e in self.events if n > after]
        return json.dumps({"events": events, "refused": self.refused}).encode()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
