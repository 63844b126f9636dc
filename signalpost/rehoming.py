"""Re-homing rooms whose home region is lost: the rules every edge applies alike (sans-I/O).

A room no rule pins has a *home record*, ``{"home": <region>, "term": <n>}``, kept in the
Consul KV of its arbiter regions (``arbiters``: every region, ranked for the room by
rendezvous hashing; the first is its arbiter, the others stand in, in that order, while
the ones before are lost). Records are written only with check-and-set (on the index of
what was read), so each datacenter's consistent KV lets one proposal win; what an edge
believes is the **newest** record it can read (the highest term; on a tie, the record of
the better-ranked arbiter), never a guess from heartbeats.

Each record is copied to the next arbiter that is not lost, so that a region whose Consul
comes back without its data loses no home.

A region is **lost** for an edge when its own Consul agent has not been able to name a
single passing broker of that region's datacenter for ``region_loss_after`` seconds (every
answer an error, "no path to datacenter" or an empty list: the region's Consul servers and
its brokers are gone, or the WAN is cut). A room whose newest record names a
lost region is re-homed: a record naming the edge's own region with the next term is
written, with check-and-set, at the first arbiter that is not lost. The term fences the
old claim: when the lost region comes back (or the WAN heals), its record is older and
every edge that reads both follows the newer one; nothing moves back by itself.

Pure: the I/O shell is ``signalpost.homes.HomeDirectory``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from signalpost.placement import ranking

#: The term of a record written without one (before re-homing existed): the first claim.
FIRST_TERM: Final = 1


@dataclass(frozen=True, slots=True)
class HomeRecord:
    """A room's home and the term of the claim that made it its home."""

    region: str
    term: int


def arbiters(room: str, regions: list[str]) -> list[str]:
    """The regions whose Consul may hold ``room``'s home record, in order of preference."""
    return ranking(room, sorted(regions))


def parse_record(value: bytes, regions: list[str]) -> HomeRecord:
    """A stored record (JSON, or a bare region name as first written); ValueError if it
    names no region of ``regions`` or is not a record."""
    text = value.decode(errors="replace").strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
            record = HomeRecord(str(data["home"]), int(data["term"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a home record: {text[:80]!r}") from exc
    else:
        record = HomeRecord(text, FIRST_TERM)
    if record.region not in regions or record.term < FIRST_TERM:
        raise ValueError(f"home record {text[:80]!r} names no region of {sorted(regions)}")
    return record


def encode_record(record: HomeRecord) -> bytes:
    return json.dumps({"home": record.region, "term": record.term}).encode()


def newest(
    records: dict[str, HomeRecord], order: list[str], also: HomeRecord | None = None
) -> HomeRecord | None:
    """The record that wins: the highest term, then the best-ranked arbiter's (``order``).
    ``also``: one this edge knows already (kept on a tie: it was read from a better one or
    written by this edge)."""
    best = also
    best_key = (also.term, 0) if also is not None else None
    for rank, region in enumerate(order):
        record = records.get(region)
        if record is None:
            continue
        key = (record.term, -rank)
        if best_key is None or key > best_key:
            best, best_key = record, key
    return best


@dataclass(frozen=True, slots=True)
class Write:
    """Write ``record`` at arbiter ``arbiter`` (check-and-set on what was read there)."""

    arbiter: str
    record: HomeRecord


@dataclass(frozen=True, slots=True)
class Wait:
    """No decision possible now: the room's arbiter is unreachable but not lost."""

    reason: str


def decide(
    order: list[str],
    read: dict[str, HomeRecord | None],
    known: HomeRecord | None,
    lost: set[str],
    local: str,
    first: str | None = None,
) -> HomeRecord | Write | Wait:
    """What an edge does about a room's home.

    ``order``: the room's arbiters; ``read``: what each arbiter that answered holds (None:
    no record; an arbiter missing from it did not answer); ``known``: what this edge knew
    before; ``lost``: the regions lost for this edge; ``local``: its own region;
    ``first``: the region to home a room in that has no record yet (a token's ``home``
    claim; None, or a lost region: ``local``). A re-homing always names ``local``.

    Returns the home to use, a record to write (then decide again, with it written), or
    ``Wait``. The deciding arbiter is the first that is not lost; its record is copied to
    the next one that is not lost (``mirror``), so that the loss of one region's store
    (a Consul that comes back empty) loses no home.
    """
    present = {region: r for region, r in read.items() if r is not None}
    best = newest(present, order, known)
    # Where a write goes: the first arbiter that is not lost, if it answered.
    target = next((region for region in order if region not in lost), None)
    if target is None or target not in read:
        return Wait(f"arbiter {target or order[0]} did not answer")
    if best is None:
        region = first if first is not None and first not in lost else local
        if target == order[0]:
            return Write(target, HomeRecord(region, FIRST_TERM))  # the first member's region
        # The arbiter is lost and may hold a first claim: this one must outrank it.
        return Write(target, HomeRecord(region, FIRST_TERM + 1))
    if best.region in lost and best.region != local:
        return Write(target, HomeRecord(local, best.term + 1))
    if present.get(target) != best:
        # The arbiter that decides holds an older record, or none (its store was lost, or
        # the newest was written at a stand-in meanwhile): it gets the newest back.
        return Write(target, best)
    # A copy at the next arbiter that is not lost (if it answered): the record outlives
    # the loss of the deciding arbiter's store, and a stand-in knows what it decided.
    after = order[order.index(target) + 1 :]
    mirror = next((region for region in after if region not in lost), None)
    if mirror is not None and mirror in read and present.get(mirror) != best:
        return Write(mirror, best)
    return best


class RegionLiveness:
    """Which other regions are lost, from what this edge's Consul agent says about them.

    ``observed(region, serving, now)`` after every look: ``serving`` is whether the agent
    named at least one passing broker there. A region is lost once it has not been serving
    for ``lost_after`` seconds; it is back at its first serving answer. Returns the change
    (``"lost"``, ``"back"``) or None.
    """

    def __init__(self, lost_after: float) -> None:
        self.lost_after = lost_after
        self._silent_since: dict[str, float] = {}
        self.lost: set[str] = set()

    def observed(self, region: str, serving: bool, now: float) -> str | None:
        if serving:
            self._silent_since.pop(region, None)
            if region in self.lost:
                self.lost.discard(region)
                return "back"
            return None
        since = self._silent_since.setdefault(region, now)
        if region not in self.lost and now - since >= self.lost_after:
            self.lost.add(region)
            return "lost"
        return None
