"""Near things first: every region's edges and ICE servers as one edge knows them (sans-I/O).

Each edge registers in its region's Consul with its ws URL and its region's STUN and TURN
URLs in the service meta (``edge_meta``). Every edge follows the healthy edges of each
region of ``regions`` (its own through its agent, the others with ``?dc=``; only its own
with fewer than two regions) and keeps what it learns in a ``RegionDirectory``:

- ``ice_regions()``: its own region's STUN/TURN URLs first (from its own settings, known
  without Consul), then each other region's in the order of ``regions``;
- ``answer(query, now)``: the ``GET /v1/edges`` reply, from bodies built when Consul's
  answer changes (a request never causes a Consul query), behind a token bucket.

Everything is bounded: ``MAX_EDGES_PER_REGION`` edges listed per region (the first by
URL), ``MAX_ICE_URLS`` STUN and as many TURN URLs per region, meta values of at most
``META_LIMIT`` characters (Consul's limit), query strings of at most ``MAX_QUERY``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final
from urllib.parse import parse_qs

import msgspec

from signalpost.errors import ErrorCode

#: Edges listed per region in a ``/v1/edges`` answer (the first, by URL).
MAX_EDGES_PER_REGION: Final = 64
#: STUN URLs, and as many TURN URLs, taken per region.
MAX_ICE_URLS: Final = 8
#: Consul refuses service meta values longer than this.
META_LIMIT: Final = 512
#: Longest query string ``/v1/edges`` reads.
MAX_QUERY: Final = 256
#: ``/v1/edges`` answers per second per edge, and the burst (past it: 429 rate_limited).
EDGES_RATE: Final = 200.0
EDGES_BURST: Final = 400
#: How long a client may cache a ``/v1/edges`` answer (seconds).
EDGES_MAX_AGE: Final = 5


def fit_urls(urls: Iterable[str], limit: int = META_LIMIT) -> str:
    """``urls`` comma-joined, as many as fit in ``limit`` characters (in order; a URL with
    a comma in it, which could not be split again, is left out)."""
    joined = ""
    for url in urls:
        if not url or "," in url:
            continue
        candidate = f"{joined},{url}" if joined else url
        if len(candidate) > limit:
            break
        joined = candidate
    return joined


def split_urls(value: object, limit: int = MAX_ICE_URLS) -> tuple[str, ...]:
    """The URLs of a comma-joined meta value (at most ``limit``; anything else: none)."""
    if not isinstance(value, str):
        return ()
    return tuple(u.strip() for u in value.split(",") if u.strip())[:limit]


def edge_meta(stun_urls: list[str], turn_urls: list[str]) -> dict[str, str]:
    """The service meta an edge adds to its registration: its region's ICE URLs."""
    meta = {}
    if stun := fit_urls(stun_urls):
        meta["stun_urls"] = stun
    if turn := fit_urls(turn_urls):
        meta["turn_urls"] = turn
    return meta


def edge_entries_of(entries: list[dict[str, Any]]) -> dict[str, str]:
    """``{service id: encoded EdgeEntry}`` from a ``/v1/health/service/signalpost-edge``
    answer (a ``Discovery.watch`` members reader: its values are strings)."""
    found: dict[str, str] = {}
    for entry in entries:
        service = entry.get("Service") or {}
        meta = service.get("Meta") or {}
        url, member = meta.get("endpoint"), service.get("ID")
        if not isinstance(url, str) or not url or not isinstance(member, str):
            continue
        edge = EdgeEntry(url, split_urls(meta.get("stun_urls")), split_urls(meta.get("turn_urls")))
        found[member] = msgspec.json.encode(edge).decode()
    return found


@dataclass(frozen=True, slots=True)
class EdgeEntry:
    """One edge as Consul lists it: its ws URL and its region's ICE URLs."""

    url: str
    stun: tuple[str, ...] = ()
    turn: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RegionIce:
    """One region's ICE URLs."""

    region: str
    stun: tuple[str, ...]
    turn: tuple[str, ...]


def _union(groups: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for group in groups:
        for url in group:
            seen.setdefault(url, None)
    return tuple(seen)[:MAX_ICE_URLS]


def region_order(region: str, regions: list[str]) -> list[str]:
    """This edge's region first, then the others in the order of ``regions``."""
    return [region, *(r for r in regions if r != region)]


@dataclass(slots=True)
class _Bucket:
    rate: float
    burst: int
    tokens: float = field(init=False)
    at: float | None = None

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self, now: float) -> bool:
        if self.at is not None:
            self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RegionDirectory:
    """Every region's healthy edges and ICE URLs, as this edge knows them."""

    def __init__(
        self,
        region: str,
        regions: list[str],
        *,
        own_url: str | None = None,
        stun_urls: list[str] | None = None,
        turn_urls: list[str] | None = None,
        rate: float = EDGES_RATE,
        burst: int = EDGES_BURST,
    ) -> None:
        self.region = region
        #: The regions this edge knows of, its own first (only its own: fewer than two).
        self.regions = region_order(region, regions) if len(regions) >= 2 else [region]
        self.own_url = own_url
        self._own_ice = RegionIce(
            region, tuple(stun_urls or ())[:MAX_ICE_URLS], tuple(turn_urls or ())[:MAX_ICE_URLS]
        )
        self._edges: dict[str, dict[str, EdgeEntry]] = {r: {} for r in self.regions}
        self._bucket = _Bucket(rate, burst)
        self._ice: list[RegionIce] = []
        self._bodies: dict[str | None, bytes] = {}
        self._rebuild()

    # ------------------------------------------------------------------ updates

    def update(self, region: str, members: dict[str, str]) -> None:
        """Consul's healthy edges of ``region`` (``edge_entries_of`` values) changed."""
        if region not in self._edges:
            return
        edges: dict[str, EdgeEntry] = {}
        for member, encoded in members.items():
            try:
                edges[member] = msgspec.json.decode(encoded, type=EdgeEntry)
            except msgspec.DecodeError:
                continue
        self._edges[region] = edges
        self._rebuild()

    def set_own_url(self, url: str | None) -> None:
        """This edge's URL, listed in its region (None: not any more, it drains)."""
        self.own_url = url
        self._rebuild()

    def _urls(self, region: str) -> list[str]:
        urls = {e.url for e in self._edges[region].values()}
        if region == self.region and self.own_url:
            urls.add(self.own_url)  # it answers: it is up, registered or not yet
        return sorted(urls)[:MAX_EDGES_PER_REGION]

    def _rebuild(self) -> None:
        ice = [self._own_ice]
        for region in self.regions[1:]:
            edges = sorted(self._edges[region].values(), key=lambda e: e.url)
            ice.append(
                RegionIce(region, _union(e.stun for e in edges), _union(e.turn for e in edges))
            )
        self._ice = ice
        listed = {r: self._urls(r) for r in self.regions}
        self._bodies = {
            None: _encode({"regions": [{"region": r, "edges": listed[r]} for r in self.regions]})
        }
        for region in self.regions:
            body = {"regions": [{"region": region, "edges": listed[region]}]}
            self._bodies[region] = _encode(body)

    # ------------------------------------------------------------------ reads

    def ice_regions(self) -> list[RegionIce]:
        """Each region's ICE URLs, this edge's region first (only its own with fewer than
        two regions; a region whose edges are not known lists none)."""
        return list(self._ice)

    def edges(self, region: str) -> list[str]:
        return self._urls(region) if region in self._edges else []

    def answer(self, query: str, now: float) -> tuple[HTTPStatus, bytes]:
        """The ``GET /v1/edges`` answer to ``query`` (``region=<name>`` or nothing)."""
        if not self._bucket.take(now):
            return HTTPStatus.TOO_MANY_REQUESTS, _error(
                ErrorCode.RATE_LIMITED, "too many /v1/edges requests; try again in a second"
            )
        if len(query) > MAX_QUERY:
            return HTTPStatus.BAD_REQUEST, _error(ErrorCode.BAD_REQUEST, "query too long")
        hints = parse_qs(query).get("region")
        if not hints:
            return HTTPStatus.OK, self._bodies[None]
        hint = hints[0]
        body = self._bodies.get(hint)
        if body is None:
            known = ", ".join(repr(r) for r in self.regions)
            message = f"unknown region {hint[:64]!r}; regions: {known}"
            return HTTPStatus.NOT_FOUND, _error(ErrorCode.BAD_REQUEST, message)
        return HTTPStatus.OK, body


def _encode(value: Any) -> bytes:
    return msgspec.json.encode(value)


def _error(code: ErrorCode, message: str) -> bytes:
    return msgspec.json.encode({"type": "error", "code": code.value, "message": message})
