"""A presence owner's webhook events (sans-I/O): ``user.online`` / ``user.offline``.

``PresenceTable._notify`` (every possible change of a user's status) calls ``status`` with
the user's status version on the node that owns the user: odd is online, even offline,
higher at each change, and copied with the user's leases to the runner-up, which keeps it
when it takes the user over (``presence.table``). The key is ``user:<id>:<version>``, so
the successor, which adopts the version, tells a change the old owner may not have
delivered under the key the old owner used (a duplicate, never a second event).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from signalpost.webhooks import Webhooks, make_event, user_stream

#: Users whose last version told is remembered (past that, the least recently changed are
#: forgotten: a repeated call for one of them may tell its version again, same key).
MAX_TOLD: Final = 200_000


class PresenceHooks:
    """Turns a presence table's status versions into webhook events."""

    def __init__(self, hooks: Webhooks, wall_clock: float = 0.0) -> None:
        self.hooks = hooks
        self.offset = wall_clock
        self._told: OrderedDict[str, int] = OrderedDict()

    def status(self, user: str, version: int, now: float) -> None:
        """``user`` (owned here) has status ``version``: tell it if it is new."""
        told = self._told.get(user)
        if told is None:
            stream = user_stream(user)
            known = self.hooks.high_water(stream)
            if known is not None:
                tail = known.rpartition(":")[2]
                told = int(tail) if tail.isdigit() else None
                if not self.hooks.streams.get(stream):  # taken over: what it holds first
                    self.hooks.promote(stream, now)
        if told is not None and told >= version:
            return
        self._told[user] = version
        self._told.move_to_end(user)
        if len(self._told) > MAX_TOLD:
            self._told.popitem(last=False)
        kind = "user.online" if version % 2 == 1 else "user.offline"
        fields = {"user": user, "version": version}
        key = f"user:{user}:{version}"
        self.hooks.add(make_event(user_stream(user), key, kind, now + self.offset, fields), now)
