"""Another region's brokers, as an edge sees them: for rooms whose home is that region.

An edge sends a request for a room homed in another region straight to the room's owner
there (one WAN crossing; the owner's deliveries and answers come back on the same link,
one crossing again). It follows that region's brokers and their ownership view through
its own Consul agent (``?dc=<region>``: Consul's WAN federation answers for the other
datacenter), dials each broker at the endpoint it advertises to other regions
(``wan_endpoint``), and places rooms on the view's members exactly as that region's own
edges do, so every edge of every region agrees on a room's owner.

Until the region's brokers are known (the first answers, or while that region is
unreachable) envelopes wait in a bounded queue (``MAX_PENDING``; past it the oldest is
dropped and counted: every request is resent until answered, so a dropped one is sent
again once an owner is known).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Final

from signalpost import metrics
from signalpost.discovery import Discovery, wan_members_of
from signalpost.lifecycle import cancel_all
from signalpost.ownership import BROKERS, View, follow_view
from signalpost.placement import owner, ranking
from signalpost.transport import DealerLink
from signalpost.wire import Envelope

log = logging.getLogger("signalpost.edge")

#: Envelopes held for a region whose brokers are not known yet.
MAX_PENDING: Final = 10_000


class RemoteBrokers:
    """The brokers of region ``region``, their view, and the links to them."""

    def __init__(
        self,
        region: str,
        link: Callable[[str, str], DealerLink],
        changed: Callable[[], None],
    ) -> None:
        self.region = region
        self._link = link  # (placement id, address to dial) -> a started link
        self._changed = changed  # placement changed: owners are to be looked up again
        self.links: dict[str, DealerLink] = {}
        self.view: View | None = None
        self._found: dict[str, str] = {}  # placement id -> address to dial
        self._dialled: dict[str, str] = {}  # placement id -> the address its link dials
        self.live_ids: list[str] = []
        self._pending: deque[tuple[str, Envelope]] = deque()
        self._tasks: list[asyncio.Task[None]] = []

    def follow(self, discovery: Discovery, address: str, token: str | None = None) -> None:
        """Follow the region's brokers and view in Consul (through this edge's agent)."""
        discovery.watch("broker", self.update_members, dc=self.region, members=wan_members_of)
        loop = asyncio.get_running_loop()
        view = follow_view(address, BROKERS, self.update_view, dc=self.region, token=token)
        self._tasks.append(loop.create_task(view))

    def update_members(self, found: dict[str, str]) -> None:
        """The region's brokers registered in its Consul: ``{placement id: dial address}``."""
        self._found = dict(found)
        self._relink()

    def update_view(self, view: View) -> None:
        self.view = view
        log.info("region %s: view %d: %s", self.region, view.number, ", ".join(view.members))
        self._relink()

    def _relink(self) -> None:
        # Only brokers found in Consul are dialled, at the address they advertise to other
        # regions: a member of the view not found yet is not dialled by its name (an
        # address inside its region); its rooms' envelopes wait until it is found.
        wanted = self._found
        for broker_id in list(self.links):
            if wanted.get(broker_id) != self._dialled.get(broker_id):
                link = self.links.pop(broker_id)
                del self._dialled[broker_id]
                asyncio.get_running_loop().create_task(link.close())
        for broker_id, address in wanted.items():
            if broker_id not in self.links:
                self.links[broker_id] = self._link(broker_id, address)
                self._dialled[broker_id] = address
        self.placement_changed()

    def placement_changed(self) -> None:
        """Links came up or went down, or the view changed: place rooms again."""
        if self.view is not None:
            self.live_ids = list(self.view.members)
        else:
            live = sorted(b for b, link in self.links.items() if link.alive)
            self.live_ids = live or sorted(self.links)
        self._changed()
        if self._pending:
            pending, self._pending = self._pending, deque()
            for room, envelope in pending:
                self.send(room, envelope)  # held again if its owner is not linked yet

    def owner_of(self, room: str) -> DealerLink | None:
        if not self.live_ids:
            return None
        return self.links.get(owner(room, self.live_ids))

    def replica_of(self, room: str) -> DealerLink | None:
        order = ranking(room, self.live_ids)
        return self.links.get(order[1]) if len(order) > 1 else None

    def send(self, room: str, envelope: Envelope) -> None:
        """To the room's owner in this region, or held until one is known."""
        link = self.owner_of(room)
        if link is not None:
            link.send(envelope)
            return
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            metrics.CROSS_REGION_DROPPED.labels(self.region).inc()
        self._pending.append((room, envelope))

    async def close(self) -> None:
        await cancel_all(self._tasks)
        for link in self.links.values():
            await link.close()
