"""A room's home region when no rule pins it: the first member's region, agreed in Consul,
and re-homed when that region is lost.

Every region is listed in the ``regions`` setting (the same list on every node). For a
room that no ``room_homes`` rule names, the regions ranked for it by rendezvous hashing
are its *arbiters* (``signalpost.rehoming``): the first one's Consul datacenter holds the
room's home record (``signalpost/homes/<room>``), created with check-and-set on index 0:
the first edge to ask proposes its own region and wins, every later edge (of any region)
reads the record. Consul's consistent KV in one datacenter decides; no region is a global
point of failure (each arbitrates its share of the rooms).

**Region loss.** Each edge asks its Consul agent about every other region's brokers once
a second (``LOOK_INTERVAL``); a region none of whose brokers Consul can name for
``region_loss_after`` seconds (while this edge's own datacenter answers) is *lost* for
this edge. A room homed there is then re-homed
in this edge's region, with the next term, by check-and-set at the first of its arbiters
that is not lost (``signalpost.rehoming.decide``); the edge re-announces its sessions'
rooms (``changed``), and the new owner, which never had the room, answers them in a new
epoch (``recovered: false``). When the region is seen again, or this edge's own Consul
answers again after it did not (the other regions may have found this one lost
meanwhile), every home this edge knew is read again before its next use (the newest
record wins: nothing moves back).

The trade-off (CP, then availability after a loss): while a room's arbiter region cannot
be reached and is not yet lost, a room whose home is not known yet cannot be used (its
requests wait, the client's request times out and is retried); rooms whose home an edge
knows go on. Two regions cannot tell a loss from a WAN partition: both sides of a
partition longer than ``region_loss_after`` re-home the rooms homed across it, and when
it heals the newer record wins (its members on the other side get ``recovered: false``).

Edges remember homes in a bounded cache (``MAX_KNOWN_HOMES``; past it the cache starts
over and homes are read again). Records are small; one is kept per room name ever used
across regions (Consul's KV, not this process's memory).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Final
from urllib.parse import quote

from signalpost.discovery import consul_client, service_name
from signalpost.lifecycle import cancel_all, in_thread, spawn
from signalpost.rehoming import (
    HomeRecord,
    RegionLiveness,
    Wait,
    Write,
    arbiters,
    decide,
    encode_record,
    parse_record,
)

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
#: Seconds between two looks at another region's brokers (one Consul query each).
LOOK_INTERVAL: Final = 1.0


def arbiter_of(room: str, regions: list[str]) -> str:
    """The region whose Consul holds ``room``'s home record (while it is not lost)."""
    return arbiters(room, regions)[0]


def home_key(room: str) -> str:
    return PREFIX + quote(room, safe="")


class HomeDirectory:
    """An edge's view of room homes: known ones, and the reads and writes in flight.

    ``resolve(room, deliver)`` calls ``deliver(home)`` once the home is known (at once when
    it is). The Consul calls run in threads (py-consul is blocking), retried with backoff
    until they answer. ``changed(region, "lost" | "back")`` is called when another region
    is lost or seen again (``start()`` begins looking).
    """

    def __init__(
        self,
        consul_addr: str,
        regions: list[str],
        local: str,
        token: str | None = None,
        lost_after: float = 5.0,
        changed: Callable[[str, str], None] = lambda _region, _change: None,
        moved: Callable[[str], None] = lambda _room: None,
    ) -> None:
        self._address = consul_addr
        self._token = token
        self._regions = sorted(regions)
        self._local = local
        self._changed = changed
        self._moved = moved
        self.liveness = RegionLiveness(lost_after)
        self.known: dict[str, HomeRecord] = {}
        #: Homes known before a region came back: read again before use (kept as what
        #: this edge knew, written back to an arbiter that lost it).
        self._unsure: dict[str, HomeRecord] = {}
        self._waiting: dict[str, list[Callable[[str], None]]] = {}
        #: Regions proposed for rooms whose home is not known yet (``propose``).
        self._proposed: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: This edge's own Consul did not answer a look (it may have missed a re-homing).
        self._blind = False

    def start(self) -> None:
        """Look at every other region's brokers (``LOOK_INTERVAL``) to tell a lost one."""
        for region in self._regions:
            if region != self._local:
                task = spawn(self._look(region), f"region-look-{region}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def home(self, room: str) -> str | None:
        """``room``'s home, or None while it is not known (or is a lost region's)."""
        record = self.known.get(room)
        if record is None:
            return None
        if record.region != self._local and record.region in self.liveness.lost:
            return None  # to be re-homed (``resolve``)
        return record.region

    def believed(self, room: str) -> str | None:
        """The region ``room`` was last known homed in (even if lost or being read again)."""
        record = self.known.get(room) or self._unsure.get(room)
        return None if record is None else record.region

    def propose(self, room: str, region: str) -> None:
        """Home ``room`` in ``region`` if this edge is the one that writes its first
        record (a token's ``home`` claim; else the first member's edge's region). Kept
        until the room's home is read (at most ``MAX_RESOLVING`` proposals: past it the
        oldest goes, and that room's first record names this edge's region)."""
        if room in self.known:
            return
        self._proposed.pop(room, None)
        if len(self._proposed) >= MAX_RESOLVING:
            del self._proposed[next(iter(self._proposed))]
        self._proposed[room] = region

    def resolve(self, room: str, deliver: Callable[[str], None]) -> None:
        home = self.home(room)
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
        client = consul_client(self._address, self._token)
        delay = RETRY_FIRST
        while True:
            before = self.known.get(room) or self._unsure.get(room)
            lost = set(self.liveness.lost)
            try:
                record = await in_thread(partial(self._decide, client, room, before, lost))
                break
            except Exception as exc:
                log.warning("home of room %r: %s; retrying", room, exc)
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
        if before is not None and before != record:
            log.warning(
                "room %r: home %s (term %d), was %s (term %d)",
                room,
                record.region,
                record.term,
                before.region,
                before.term,
            )
        if len(self.known) >= MAX_KNOWN_HOMES:
            self.known.clear()
        self._unsure.pop(room, None)
        self._proposed.pop(room, None)
        self.known[room] = record
        if before is not None and before.region != record.region:
            self._moved(room)
        if self.home(room) is None:  # its region was lost meanwhile: decided again
            task = asyncio.get_running_loop().create_task(self._read(room), name="room-home")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        for deliver in self._waiting.pop(room, []):
            deliver(record.region)

    def _decide(
        self, client: object, room: str, before: HomeRecord | None, lost: set[str]
    ) -> HomeRecord:
        """Read the room's records, write one if the rules say so, until one stands (in a
        thread)."""
        kv = client.kv  # type: ignore[attr-defined]
        key = home_key(room)
        order = arbiters(room, self._regions)
        read: dict[str, HomeRecord | None] = {}
        indexes: dict[str, int] = {}
        failures: list[str] = []
        fresh = False  # what ``read`` holds is what the arbiters answered just now
        for _ in range(6):
            if not fresh:
                read, indexes, failures = self._read_all(kv, key, order, lost)
                fresh = True
            first = self._proposed.get(room)
            decision = decide(order, read, before, lost, self._local, first)
            if isinstance(decision, HomeRecord):
                return decision
            if isinstance(decision, Wait):
                raise RuntimeError(f"{decision.reason} ({'; '.join(failures)})")
            assert isinstance(decision, Write)
            written = kv.put(
                key,
                encode_record(decision.record).decode(),
                cas=indexes[decision.arbiter],
                dc=decision.arbiter,
            )
            if written:
                log.info(
                    "room home %s: %s, term %d (written in %s)",
                    key,
                    decision.record.region,
                    decision.record.term,
                    decision.arbiter,
                )
                read[decision.arbiter] = decision.record  # (not written there again)
            else:
                fresh = False  # another edge wrote first: read again
        raise RuntimeError(f"{key}: no record stands after six tries")

    def _read_all(
        self, kv: Any, key: str, order: list[str], lost: set[str]
    ) -> tuple[dict[str, HomeRecord | None], dict[str, int], list[str]]:
        """What each arbiter that is not lost holds (None: nothing), the index to
        check-and-set on, and what the others said (in a thread)."""
        read: dict[str, HomeRecord | None] = {}
        indexes: dict[str, int] = {}
        failures: list[str] = []
        for region in order:
            if region in lost:
                continue  # not asked: it would only time out
            try:
                _index, item = kv.get(key, dc=region, consistency="consistent")
            except Exception as exc:
                failures.append(f"{region}: {exc}")
                continue
            if item is not None and item.get("Value"):
                read[region] = parse_record(item["Value"], self._regions)
                indexes[region] = int(item["ModifyIndex"])
            else:
                read[region] = None
                indexes[region] = 0
        return read, indexes, failures

    async def _look(self, region: str) -> None:
        """Ask this edge's Consul agent about ``region``'s brokers, forever."""
        client = consul_client(self._address, self._token)
        service = service_name("broker")
        while True:
            serving: bool | None
            try:
                _index, entries = await in_thread(
                    lambda: client.health.service(service, passing=True, dc=region)
                )
                serving = bool(entries)
            except Exception:
                # No path to that datacenter, its servers gone, ... or this edge's own
                # Consul is down: then nothing is known of the other region either.
                try:
                    await in_thread(lambda: client.health.service(service, passing=True))
                    serving = False
                except Exception:
                    serving = None
            change = None
            if serving is None:
                self._blind = True
            else:
                change = self.liveness.observed(region, serving, time.monotonic())
                if self._blind:
                    # This edge's own Consul was down: another region may have found this
                    # one lost meanwhile and re-homed its rooms. Homes are read again.
                    self._blind = False
                    log.warning("Consul answers again: every known room home is read again")
                    self._read_again()
                    self._changed(self._local, "back")
            if change == "lost":
                log.warning(
                    "region %s is lost: no broker of it named by Consul for %.1f s; rooms "
                    "homed there are re-homed here",
                    region,
                    self.liveness.lost_after,
                )
            elif change == "back":
                log.warning("region %s is back: every known room home is read again", region)
                self._read_again()
            if change is not None:
                self._changed(region, change)
            await asyncio.sleep(LOOK_INTERVAL)

    def _read_again(self) -> None:
        """Every known home is read again before its next use (what was known stays the
        fallback: written back to an arbiter that lost it). Bounded with the known ones
        (``MAX_KNOWN_HOMES``): past it the older ones are forgotten, and read as new."""
        if len(self._unsure) + len(self.known) > MAX_KNOWN_HOMES:
            self._unsure.clear()
        self._unsure.update(self.known)
        self.known.clear()

    async def close(self) -> None:
        await cancel_all(list(self._tasks))
