"""Which edge a client tries next, region by region (sans-I/O), and how near each region is.

A client is given edge URLs per region, ``{"eu": [...], "us": [...]}`` in the order to try
the regions (or one list: one region, as before). ``EdgePlan`` walks them: the URLs of the
current region in turn; when every URL of the region has failed in a row (the one that
dropped counts), the next region's, wrapping around. A connection that is welcomed resets
the count, so the client stays in the region it reached.

``rank_regions`` orders regions by measured round trip (``probe_url`` names what to time:
the edge's ``/healthz``), unreachable ones last in their given order. The timing itself is
I/O and lives in ``signalpost.client``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from statistics import median
from urllib.parse import urlsplit, urlunsplit

Urls = str | Sequence[str] | Mapping[str, Sequence[str]]


def regions_of(urls: Urls) -> list[tuple[str, list[str]]]:
    """``[(region, [url, ...]), ...]`` from what a client is given; ValueError when empty.

    A string or a list is one region named ``""``."""
    if isinstance(urls, str):
        regions = [("", [urls])]
    elif isinstance(urls, Mapping):
        regions = [(str(name), _url_list(name, group)) for name, group in urls.items()]
    else:
        regions = [("", _url_list("", urls))]
    if not regions:
        raise ValueError("no edge URLs given")
    for name, group in regions:
        if not group:
            raise ValueError(f"region {name!r} has no edge URLs" if name else "no edge URLs given")
    return regions


def _url_list(region: object, urls: object) -> list[str]:
    listed = (
        list(urls)
        if isinstance(urls, Iterable) and not isinstance(urls, str | bytes | Mapping)
        else None
    )
    if listed is None or not all(isinstance(u, str) and u for u in listed):
        raise ValueError(f"edge URLs of region {region!r} must be a list of URL strings")
    return [str(u) for u in listed]


class EdgePlan:
    """The edge to try now, and where to go when it fails."""

    def __init__(self, regions: Sequence[tuple[str, Sequence[str]]]) -> None:
        if not regions or not all(urls for _, urls in regions):
            raise ValueError("every region needs at least one edge URL")
        self.regions = [(name, list(urls)) for name, urls in regions]
        self._region = 0
        self._index = 0
        self._failures = 0  # edges of the current region that failed in a row

    @property
    def region(self) -> str:
        return self.regions[self._region][0]

    @property
    def url(self) -> str:
        return self.regions[self._region][1][self._index]

    @property
    def urls(self) -> list[str]:
        """Every URL, regions in order."""
        return [url for _, urls in self.regions for url in urls]

    def failed(self) -> None:
        """The current edge failed (or dropped): its region's next URL, or, when all of
        the region's failed in a row, the next region's first."""
        urls = self.regions[self._region][1]
        self._failures += 1
        if self._failures >= len(urls):
            self._region = (self._region + 1) % len(self.regions)
            self._index = 0
            self._failures = 0
        else:
            self._index = (self._index + 1) % len(urls)

    def succeeded(self) -> None:
        """Welcomed: the region is good again."""
        self._failures = 0

    def prefer(self, order: Sequence[str]) -> None:
        """Try the regions in ``order`` (names it omits keep their place after it); start
        over at the first."""
        rank = {name: i for i, name in enumerate(order)}
        self.regions.sort(key=lambda region: rank.get(region[0], len(rank)))
        self._region = self._index = self._failures = 0


def rank_regions(order: Sequence[str], rtts: Mapping[str, float | None]) -> list[str]:
    """``order`` sorted by round trip, nearest first; regions with none (unreachable, not
    measured) last, in their given order."""
    return sorted(
        order, key=lambda name: (rtts.get(name) is None, rtts.get(name) or 0.0, order.index(name))
    )


def summarize(samples: Sequence[float | None]) -> float | None:
    """A region's round trip from its samples: the median of those that answered."""
    answered = [s for s in samples if s is not None]
    return median(answered) if answered else None


def probe_url(edge_url: str) -> str:
    """The ``/healthz`` URL of the edge behind ``ws(s)://host:port/v1/signal``."""
    parts = urlsplit(edge_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "/healthz", "", ""))
