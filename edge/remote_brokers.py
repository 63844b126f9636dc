"""Another region's brokers, as an edge sees them: for rooms whose home is that region.

An edge sends a request for a room homed in another region straight to the room's owner
there (one WAN crossing; the owner's deliveries and answers come back on the same link,
one crossing again). ``signalpost.remote_tier.RemoteTier`` follows that region's brokers
and their view (through Consul, ``?dc=<region>``), dials each at its ``wan_endpoint`` and
places rooms on the view's members exactly as that region's own edges do.

Until the region's brokers are known (the first answers, or while that region is
unreachable) envelopes wait in a bounded queue (``MAX_PENDING``; past it the oldest is
dropped and counted: every request is resent until answered, so a dropped one is sent
again once an owner is known).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

from signalpost import metrics
from signalpost.ownership import BROKERS
from signalpost.remote_tier import RemoteTier
from signalpost.transport import DealerLink
from signalpost.wire import Envelope

#: Envelopes held for a region whose brokers are not known yet.
MAX_PENDING: Final = 10_000


class RemoteBrokers(RemoteTier):
    """The brokers of region ``region``, their view, the links to them, and what waits."""

    def __init__(
        self,
        region: str,
        link: Callable[[str, str], DealerLink],
        changed: Callable[[], None],
    ) -> None:
        super().__init__(region, "broker", BROKERS, link, changed)
        self._pending: deque[tuple[str, Envelope]] = deque()
        #: What this edge sends that region (looked up once, not per envelope).
        self.sent = metrics.CROSS_REGION_ENVELOPES.labels(region, "out")

    def placement_changed(self) -> None:
        """Links came up or went down, or the view changed: place rooms again."""
        super().placement_changed()
        if self._pending:
            pending, self._pending = self._pending, deque()
            for room, envelope in pending:
                self.send(room, envelope)  # held again if its owner is not linked yet

    def drop_pending(self) -> None:
        """The region is lost: what waits for it is dropped (counted); the edge resends
        every request, to the room's home as it is then."""
        if self._pending:
            metrics.CROSS_REGION_DROPPED.labels(self.region).inc(len(self._pending))
            self._pending.clear()

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
