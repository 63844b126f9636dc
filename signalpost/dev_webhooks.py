"""``signalpost dev``'s own webhook receiver, for the demo app's live panel.

When dev mode has no ``webhook_urls`` of its own, it hands its webhooks to this receiver in
the same process: every event is signed as for a real URL (the same body and headers) and
its signature is checked with ``signalpost.webhooks.verify``, as a real receiver would; no
HTTP request is made (over HTTP to itself, the webhooks of a call cost dev mode twice the
call's own signalling, docs/performance.md). The last ``KEEP`` events are kept, numbered;
the edge serves them at ``/v1/dev-webhooks?after=N`` (only in dev mode), which the demo
app polls.
"""

from __future__ import annotations

import json
import secrets
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

from signalpost.errors import BadRequest
from signalpost.webhooks import verify

#: Events kept for the panel (the oldest go first).
KEEP: Final = 200

#: The name the webhook core queues the inbox's events under (never requested over HTTP).
URL: Final = "dev-inbox:"


class DevInbox:
    """A local webhook receiver whose events the demo app reads."""

    url = URL

    def __init__(self) -> None:
        self.secret = secrets.token_hex(16)
        self.events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=KEEP)
        self._ids: dict[object, int] = {}  # id -> number, of the events kept
        self.refused = 0
        self._number = 0

    def receive(self, body: bytes, headers: Mapping[str, str]) -> bool:
        """One delivery; False (a failure the sender retries) if its signature is wrong."""
        try:
            event = verify(self.secret, body, headers)
        except BadRequest:
            self.refused += 1
            return False
        key = event.get("id")
        if key in self._ids:  # a duplicate (same id) is shown once
            return True
        if len(self.events) == KEEP:
            del self._ids[self.events[0][1].get("id")]
        self._number += 1
        self.events.append((self._number, event))
        self._ids[key] = self._number
        return True

    def since(self, query: str) -> bytes:
        """The events numbered above ``after`` (from the query string), as JSON."""
        after = 0
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name == "after" and value.isdigit():
                after = int(value)
        events = [{"n": n, "event": e} for n, e in self.events if n > after]
        return json.dumps({"events": events, "refused": self.refused}).encode()
