"""A room's home region when no rule pins it: the first member's region, agreed in Consul.

Every region is listed in the ``regions`` setting (the same list on every node). For a
room that no ``room_homes`` rule names, one region is its *arbiter*, by rendezvous
hashing of the room name over that list; the arbiter's Consul datacenter holds the
room's home record (``signalpost/homes/<room>``), created with check-and-set on index 0:
the first edge to ask proposes its own region and wins, every later edge (of any region)
reads the record. Consul's consistent KV in one datacenter decides; no region is a global
point of failure (each arbitrates its share of the rooms).

The trade-off (CP): while a room's arbiter region cannot be reached, a room whose home is
not known yet cannot be used (its requests wait, the client's request times out and is
retried); rooms whose home an edge knows go on. Rooms that must be usable through a WAN
partition from their first request are pinned by a rule. A home never changes once
written (re-homing after a region loss is not built yet).

Edges remember homes in a bounded cache (``MAX_KNOWN_HOMES``; past it the cache starts
over and homes are read again). Records are small (the region name); one is written per
room name ever used across regions and kept (Consul's KV, not this process's memory).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final
from urllib.parse import quote

from signalpost.discovery import consul_client
from signalpost.lifecycle import cancel_all, in_thread
from signalpost.placement import owner

log = logging.getLogger("signalpost.homes")

PREFIX: Final = "signalpost/homes/"
#: Homes an edge remembers; past it the memo starts over (room names come from clients).
MAX_KNOWN_HOMES: Final = 100_000
#: Rooms whose home is being read at once; requests for more wait for a slot's answer.
MAX_RESOLVING: Final = 1_000
#: Envelopes held per room while its home is read; past it the oldest is dropped (the
#: edge resends every request until answered).
MAX_HELD_PER_ROOM: Final = 256
RETRY_FIRST: Final = 0.2
RETRY_MAX: Final = 5.0


def arbiter_of(room: str, regions: list[str]) -> str:
    """The region whose Consul holds ``room``'s home record."""
    return owner(room, sorted(regions))


def home_key(room: str) -> str:
    return PREFIX + quote(room, safe="")


class HomeDirectory:
    """An edge's view of room homes: known ones, and the reads and writes in flight.

    ``resolve(room, deliver)`` calls ``deliver(home)`` once the home is known (at once when
    it is). The Consul calls run in threads (py-consul is blocking), retried with backoff
    until they answer.
    """

    def __init__(
        self, consul_addr: str, regions: list[str], local: str, token: str | None = None
    ) -> None:
        self._address = consul_addr
        self._token = token
        self._regions = sorted(regions)
        self._local = local
        self.known: dict[str, str] = {}
        self._waiting: dict[str, list[Callable[[str], None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def home(self, room: str) -> str | None:
        return self.known.get(room)

    def resolve(self, room: str, deliver: Callable[[str], None]) -> None:
        home = self.known.get(room)
        if home is not None:
            deliver(home)
            return
        waiting = self._waiting.get(room)
        if waiting is not None:
            if len(waiting) >= MAX_HELD_PER_ROOM:
                del waiting[0]
            waiting.append(deliver)
            return
        if len(self._waiting) >= MAX_RESOLVING:
            log.warning(
                "%d room homes are being read: %r waits for its resend", MAX_RESOLVING, room
            )
            return
        self._waiting[room] = [deliver]
        task = asyncio.get_running_loop().create_task(self._read(room), name="room-home")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, room: str) -> None:
        arbiter = arbiter_of(room, self._regions)
        client = consul_client(self._address, self._token)
        key = home_key(room)
        delay = RETRY_FIRST
        while True:
            try:
                home = await in_thread(lambda: self._read_or_claim(client, key, arbiter))
                break
            except Exception as exc:
                log.warning(
                    "home of room %r: arbiter region %s did not answer (%s); retrying",
                    room,
                    arbiter,
                    exc,
                )
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
        if len(self.known) >= MAX_KNOWN_HOMES:
            self.known.clear()
        self.known[room] = home
        for deliver in self._waiting.pop(room, []):
            deliver(home)

    def _read_or_claim(self, client: object, key: str, arbiter: str) -> str:
        """The record's region, writing ours first if there is none (in a thread)."""
        kv = client.kv  # type: ignore[attr-defined]
        for _ in range(3):
            _index, item = kv.get(key, dc=arbiter, consistency="consistent")
            if item is not None and item.get("Value"):
                region: str = item["Value"].decode(errors="replace")
                if region not in self._regions:
                    raise ValueError(f"{key} names {region!r}, not one of regions {self._regions}")
                return region
            if kv.put(key, self._local, cas=0, dc=arbiter):
                log.info("room home %s: %s (first member here)", key, self._local)
                return self._local
        raise RuntimeError(f"{key}: no record, and writing one failed three times")

    async def close(self) -> None:
        await cancel_all(list(self._tasks))
