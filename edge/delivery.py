"""The edge's side of delivery, sans I/O: which copy to write, what to confirm, what to resend.

Room owners number every event of a room (``offset``) and send each session a stream of
the events meant for it; each ``Deliver`` names the offset the owner sent that session
before it (``prev``). Per (session, room) the edge keeps the position it has written
(``Position``: the room's epoch and the last offset written) and decides with ``admit``:

* ``offset`` not above the position: a copy (a resend, a replay, a retried request's
  event): dropped, and the position confirmed again so the owner stops resending;
* ``prev`` above the position: something before it is missing (lost on a reset link):
  dropped, and a resend asked for at once (``gap``); the owner sends again, in order,
  from the position the edge confirms;
* otherwise it is written and the position moves to ``offset``.

So a copy is recognised by its exact identity (room, offset), never by "the highest seen
from that sender", and nothing is written out of order. Positions are confirmed to the
owners in batches (``Confirmations``), at most once per confirm tick per (room, session).

``Retries`` schedules resends of requests the owners have not answered (a request or its
reply lost on a reset link, an owner that died): the owner applies a request at most once
per (session, request key) and answers a resend from its reply record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Generic, TypeVar

ACCEPT: Final = 0
DUPLICATE: Final = 1
GAP: Final = 2
OTHER_EPOCH: Final = 3

#: First resend of an unanswered request after this many seconds, then twice as long each
#: time, up to ``RETRY_MAX``.
RETRY_FIRST: Final = 1.0
RETRY_MAX: Final = 8.0


@dataclass(slots=True)
class Position:
    """What the edge has written to a session in one room."""

    epoch: str
    offset: int


def admit(position: Position, offset: int, prev: int, epoch: str = "") -> int:
    """Whether a delivery of ``offset`` (sent after ``prev``) is written (see module doc).

    One of another ``epoch`` than the position's is not comparable: dropped (the owner
    re-syncs the session, ``Synced``, which gives the position the room's epoch).

    ``EdgeCore.admit`` does the same inline (once per delivered event); a unit test holds
    the two to the same verdicts.
    """
    if epoch and epoch != position.epoch:
        return OTHER_EPOCH
    if offset <= position.offset:
        return DUPLICATE
    if prev > position.offset:
        return GAP
    position.offset = offset
    return ACCEPT


class Confirmations:
    """Positions to confirm to room owners, coalesced until the next ``take``."""

    def __init__(self) -> None:
        self._due: dict[tuple[str, str], tuple[Position, bool]] = {}

    def __len__(self) -> int:
        return len(self._due)

    def note(self, room: str, session: str, position: Position, gap: bool = False) -> None:
        """Confirm ``position`` of ``session`` in ``room`` at the next take (gap: resend)."""
        key = (room, session)
        due = self._due.get(key)
        if due is None or due[0] is not position:  # a new stream replaces an old one's
            self._due[key] = (position, gap)
        elif gap and not due[1]:
            self._due[key] = (position, True)

    def forget(self, room: str, session: str) -> None:
        """Confirm nothing for ``session`` in ``room`` (it left, or its stream restarted)."""
        self._due.pop((room, session), None)

    def forget_stream(self, room: str, session: str, position: Position) -> None:
        """Confirm nothing of the stream at ``position`` (its connection closed); a newer
        stream of the session in ``room`` is kept."""
        due = self._due.get((room, session))
        if due is not None and due[0] is position:
            del self._due[room, session]

    def take(self) -> list[tuple[str, str, str, int, bool]]:
        """``(room, session, epoch, offset, gap)`` for everything noted since the last take."""
        due, self._due = self._due, {}
        return [
            (room, session, position.epoch, position.offset, gap)
            for (room, session), (position, gap) in due.items()
        ]


Item = TypeVar("Item")


@dataclass(slots=True)
class _Scheduled(Generic[Item]):
    item: Item
    due: float
    interval: float


class Retries(Generic[Item]):
    """Items resent until answered, with doubling intervals (``RETRY_FIRST`` .. ``RETRY_MAX``).

    Bounded by what the edge itself bounds: a connection's unanswered requests (the rate
    limit and ``max_unanswered``) and the rooms of its sessions.
    """

    def __init__(self, first: float = RETRY_FIRST, most: float = RETRY_MAX) -> None:
        self._first = first
        self._most = most
        self._items: dict[object, _Scheduled[Item]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, key: object, item: Item, now: float) -> None:
        """Resend ``item`` from ``now + first`` on, until ``done(key)``."""
        self._items[key] = _Scheduled(item, now + self._first, self._first)

    def done(self, key: object) -> Item | None:
        """``key`` was answered: stop resending it; its item, if it was scheduled."""
        scheduled = self._items.pop(key, None)
        return None if scheduled is None else scheduled.item

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def reschedule(self, now: float, after: float) -> None:
        """Resend everything ``after`` seconds from ``now``, with the first interval again
        (the owners changed: what was resent just now may have met a broker that did not
        know yet that it owns the room)."""
        for scheduled in self._items.values():
            scheduled.due = now + after
            scheduled.interval = self._first

    def due(self, now: float) -> list[Item]:
        """Items to resend now, oldest first; each is rescheduled twice as far out."""
        out: list[Item] = []
        for scheduled in self._items.values():
            if scheduled.due <= now:
                out.append(scheduled.item)
                scheduled.interval = min(scheduled.interval * 2, self._most)
                scheduled.due = now + scheduled.interval
        return out
