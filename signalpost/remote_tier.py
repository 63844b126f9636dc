"""Another region's tier (brokers or presence nodes), followed from this region.

A node that must reach the owners of another region (an edge: the brokers of a room's home
region; a presence node: the owners of its users there) follows that region's nodes and
their ownership view through its own Consul agent (``?dc=<region>``: Consul's WAN
federation answers for the other datacenter), dials each node at the endpoint it
advertises to other regions (``wan_endpoint``), and places keys on the view's members
exactly as that region's own nodes do, so every region agrees on a key's owner there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from signalpost import metrics
from signalpost.discovery import Discovery, wan_members_of
from signalpost.lifecycle import cancel_all, spawn
from signalpost.ownership import Tier, View, follow_view
from signalpost.placement import owner, ranking
from signalpost.transport import DealerLink

log = logging.getLogger("signalpost.regions")


class RemoteTier:
    """The nodes of ``kind`` (``tier``) in region ``region``, their view, and links to them."""

    def __init__(
        self,
        region: str,
        kind: str,
        tier: Tier,
        link: Callable[[str, str], DealerLink],
        changed: Callable[[], None],
    ) -> None:
        self.region = region
        self.kind = kind
        self.tier = tier
        self._link = link  # (placement id, address to dial) -> a started link
        self._changed = changed  # placement changed: owners are to be looked up again
        self.links: dict[str, DealerLink] = {}
        self.view: View | None = None
        self._found: dict[str, str] = {}  # placement id -> address to dial
        self._dialled: dict[str, str] = {}  # placement id -> address its link dials
        self.live_ids: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Read when /metrics is scraped (the launcher waits for it; an alert on 0 is a WAN cut).
        metrics.REGION_LINKS.labels(region, kind).set_function(self.links_alive)

    def links_alive(self) -> int:
        return sum(1 for link in self.links.values() if link.alive)

    def follow(self, discovery: Discovery, address: str, token: str | None = None) -> None:
        """Follow the region's nodes and view in Consul (through this node's agent)."""
        discovery.watch(self.kind, self.update_members, dc=self.region, members=wan_members_of)
        view = follow_view(address, self.tier, self.update_view, dc=self.region, token=token)
        self._tasks.append(spawn(view, f"view-{self.kind}-{self.region}"))

    def update_members(self, found: dict[str, str]) -> None:
        """The region's nodes registered in its Consul: ``{placement id: dial address}``."""
        self._found = dict(found)
        self._relink()

    def update_view(self, view: View) -> None:
        self.view = view
        log.info(
            "region %s: %s view %d: %s",
            self.region,
            self.kind,
            view.number,
            ", ".join(view.members),
        )
        self._relink()

    def _relink(self) -> None:
        # Only nodes found in Consul are dialled, at the address they advertise to other
        # regions: a member of the view not found yet is not dialled by its name (an
        # address inside its region); what is for it waits until it is found.
        wanted = self._found
        for node_id in list(self.links):
            if wanted.get(node_id) != self._dialled.get(node_id):
                link = self.links.pop(node_id)
                del self._dialled[node_id]
                asyncio.get_running_loop().create_task(link.close())
        for node_id, address in wanted.items():
            if node_id not in self.links:
                self.links[node_id] = self._link(node_id, address)
                self._dialled[node_id] = address
        self.placement_changed()

    def renew_links(self) -> None:
        """Close every link to the region (what waits in them is dropped: a node that
        comes back must not get it) and dial again."""
        for link in self.links.values():
            asyncio.get_running_loop().create_task(link.close())
        self.links.clear()
        self._dialled.clear()
        self._relink()

    def placement_changed(self) -> None:
        """Links came up or went down, or the view changed: place keys again."""
        if self.view is not None:
            self.live_ids = list(self.view.members)
        else:
            live = sorted(n for n, link in self.links.items() if link.alive)
            self.live_ids = live or sorted(self.links)
        self._changed()

    def owner_id(self, key: str) -> str | None:
        """The placement id of ``key``'s owner in the region (None: none known)."""
        return owner(key, self.live_ids) if self.live_ids else None

    def owner_of(self, key: str) -> DealerLink | None:
        node = self.owner_id(key)
        return None if node is None else self.links.get(node)

    def replica_of(self, key: str) -> DealerLink | None:
        order = ranking(key, self.live_ids)
        return self.links.get(order[1]) if len(order) > 1 else None

    async def close(self) -> None:
        metrics.REGION_LINKS.labels(self.region, self.kind).set_function(lambda: 0)
        await cancel_all(self._tasks)
        for link in self.links.values():
            await link.close()
