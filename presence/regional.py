"""The statuses of users in other regions, merged into one global status (sans-I/O).

A user's owner in each region (its presence owner there, by that region's view) knows the
user's *regional* status: online while a session in that region holds a lease. The owner
of a user watched in this region subscribes to the user's owner in every other region
(``StatusSubscribe.region``) and is noted each regional status with a regional version
(``StatusNote.region``: odd online, even offline, higher at every change in that region).
``RegionalStatuses`` keeps, per user and other region, the newest status noted; a user is
online elsewhere while any other region says so (``online``).

Notes may come twice (resends, re-subscriptions) or out of order (held changes let out in
another order, a subscription answered by an old and a new owner): a note with a version
below the one kept for (user, region) is ignored; one with the same version changes
nothing unless the kept status was marked stale. When the link to the node that noted a
status has been down for ``STALE_AFTER`` (that region is cut off or down), its statuses
are *stale*: they count as offline (``node_stale``) until that node, or the region's next
owner, notes them again.

Bounded: statuses are kept only for users watched here and owned here (the table forgets
a user when it is no longer either: ``forget``), at most ``MAX_USERS``; past that the
least recently noted user is forgotten (its watchers may see it offline-elsewhere until
its next note, which the table's resubscription brings within a second).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, Literal

Status = Literal["online", "offline"]

#: Users whose statuses in other regions are kept at once.
MAX_USERS: Final = 200_000
#: Seconds the link to another region's presence node may be down before the statuses it
#: noted count as offline (the last known status is shown until then).
STALE_AFTER: Final = 10.0


@dataclass(slots=True)
class Heard:
    """What ``node``, the user's owner in a region, last noted of its status there."""

    status: Status
    version: int
    node: str
    stale: bool = False

    @property
    def online(self) -> bool:
        return self.status == "online" and not self.stale


class RegionalStatuses:
    """Per user and other region, the newest status noted; cost per note O(regions)."""

    def __init__(self, max_users: int = MAX_USERS) -> None:
        self.max_users = max_users
        self._of: OrderedDict[str, dict[str, Heard]] = OrderedDict()
        self.ignored = 0  # notes older than one kept

    def __len__(self) -> int:
        return len(self._of)

    def online(self, user: str) -> bool:
        """Whether any other region says ``user`` is online (and is not stale)."""
        regions = self._of.get(user)
        return regions is not None and any(h.online for h in regions.values())

    def heard(self, user: str, region: str) -> Heard | None:
        regions = self._of.get(user)
        return None if regions is None else regions.get(region)

    def note(self, user: str, region: str, node: str, status: Status, version: int) -> bool:
        """``node`` notes ``user``'s status in ``region``; whether it was taken (not older
        than what is kept)."""
        regions = self._of.get(user)
        if regions is None:
            if len(self._of) >= self.max_users:
                self._of.popitem(last=False)
            regions = self._of[user] = {}
        else:
            self._of.move_to_end(user)
        known = regions.get(region)
        if known is not None and version < known.version:
            self.ignored += 1
            return False
        regions[region] = Heard(status, version, node)
        return True

    def node_stale(self, node: str) -> list[str]:
        """The link to ``node`` is down for good: what it noted counts as offline. The
        users whose status elsewhere this changed."""
        changed = []
        for user, regions in self._of.items():
            was = any(h.online for h in regions.values())
            for heard in regions.values():
                if heard.node == node:
                    heard.stale = True
            if was and not any(h.online for h in regions.values()):
                changed.append(user)
        return changed

    def forget(self, user: str) -> None:
        self._of.pop(user, None)

    def users(self) -> list[str]:
        return list(self._of)
