"""The app backend in a chaos run: publishes into every room through the server API.

A publish is a signal of the room from the API (docs/server-api.md): the checker judges it
like a member's signal to the whole room (sender ``api``): every acknowledged publish
reaches every member exactly once, in order. The publisher does what the docs ask of a
backend: a publish not answered (a killed edge, a 503 while the room's owner fails over,
a timeout) is sent again with the same idempotency key, through the next edge, until it
is answered or the run stops; the next publish into a room waits for the one before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Callable, Sequence

from signalpost.admin import AdminClient
from signalpost.api_keys import mint_api_key
from signalpost.errors import ProtocolError, TransportError
from tests.chaos.checker import Journal, SentSignal
from tests.chaos.workload import ChaosClient, Endpoint
from tests.helpers import SECRET

#: The sender name publishes carry (``data.chaos``), as a client's name would be.
SENDER = "api"
#: Seconds one HTTP attempt may take before it is sent again through the next edge.
ATTEMPT_TIMEOUT = 5.0
#: Pause between attempts (the owner may be failing over).
RETRY_PAUSE = 0.3


def http_base(edge: Endpoint) -> str:
    """``http://host:port`` of an edge from its ``ws://host:port/v1/signal``."""
    return edge.url.replace("ws", "http", 1).rsplit("/v1/", 1)[0]


class ApiPublisher:
    """Publishes numbered messages into rooms through the edges' server API."""

    def __init__(
        self,
        edges: Sequence[Endpoint],
        journal: Journal,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        key = mint_api_key(SECRET, "chaos", ("publish",), now=time.time())
        self.clients = [
            AdminClient(http_base(e), key, timeout=ATTEMPT_TIMEOUT, retries=0) for e in edges
        ]
        self.journal = journal
        self.clock = clock
        self.rng = rng
        self.attempts = 0
        self.retried = 0  # publishes answered only after a second attempt or more
        self.errors: list[str] = []  # codes of refusals (none is expected)
        self._ids = itertools.count(-1, -1)  # request ids apart from the clients' (> 0)

    async def run_room(
        self,
        room: str,
        members: Sequence[ChaosClient],
        stop: asyncio.Event,
        *,
        interval: tuple[float, float],
    ) -> None:
        """Publish into ``room`` until ``stop``: one at a time, each until answered."""
        rng = random.Random(self.rng.getrandbits(64))
        for seq in itertools.count(1):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.uniform(*interval))
            if stop.is_set():
                return
            targets = tuple(m.name for m in members)
            record = SentSignal(SENDER, room, seq, None, targets, next(self._ids), self.clock())
            self.journal.signals.append(record)
            await self._publish(record, rng, stop)

    async def _publish(self, record: SentSignal, rng: random.Random, stop: asyncio.Event) -> None:
        data = {"chaos": [SENDER, record.room, record.seq], "marker": False}
        key = f"chaos-{record.room}-{record.seq}"
        start = rng.randrange(len(self.clients))
        for attempt in itertools.count():
            client = self.clients[(start + attempt) % len(self.clients)]
            self.attempts += 1
            try:
                await asyncio.to_thread(client.publish, record.room, data, idempotency_key=key)
            except TransportError:
                pass  # the edge is down or slow: the next one
            except ProtocolError as exc:
                if exc.code != "unavailable":
                    record.refused = str(exc.code)
                    self.errors.append(f"{record.room}#{record.seq}: {exc.code}: {exc}")
                    return
            else:
                record.acked_at = self.clock()
                if attempt:
                    self.retried += 1
                return
            if stop.is_set():
                # Stopping: the last attempt's outcome is unknown (it may still be applied;
                # nothing is published into the room after it).
                record.gave_up_at = self.clock()
                return
            await asyncio.sleep(RETRY_PAUSE)
