"""Client-token keys from a JWK Set (JWKS) that rotates: a sans-I/O key set and its fetcher.

An identity provider publishes its signing keys as a JWK Set (RFC 7517) at a URL and
rotates them: a new key appears (tokens signed with it name it in their ``kid`` header),
the old one disappears some time later. ``jwks_source`` names that document: an
``https://`` (or ``http://``) URL, or a file (kept up to date by something else).

``KeySet`` is the core, sans I/O (documents and the time in, keys out):

* a document is parsed key by key with PyJWT (``PyJWK``); keys without a ``kid``, with a ``use``
  other than ``sig``, or whose algorithm (its ``alg``, else the default of its ``kty`` and
  curve) is not in ``jwks_algorithms`` are skipped. A document that is not JSON, larger
  than ``MAX_DOCUMENT_BYTES``, with more than ``MAX_KEYS`` keys or no usable key is an
  error: the keys held stand;
* a key that is no longer in the document stays valid ``jwks_grace`` seconds after the
  first fetch that missed it (then it is dropped); at most ``MAX_KEYS`` such keys are held
  (beyond that the ones that left first go first);
* fetches: every ``jwks_refresh`` seconds; after a failure again after
  ``jwks_min_refresh`` seconds, doubling up to ``jwks_refresh``; and for a token whose
  ``kid`` is unknown, at once, but never twice within ``jwks_min_refresh`` seconds: a
  client sending random ``kid`` values causes at most one fetch per that interval, and
  is refused without one in between.

``JwksKeys`` is the shell: it fetches in a daemon thread (the event loop never blocks),
one fetch at a time (callers that want one while it runs wait for that one), and keeps
refreshing until ``close()``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
from prometheus_client import Counter, Gauge

from signalpost.config import Settings
from signalpost.errors import ConfigError, KeySetError
from signalpost.lifecycle import cancel_all, in_thread, spawn

log = logging.getLogger("signalpost.jwks")

#: A larger JWKS document is refused (a fetch failure: the keys held stand).
MAX_DOCUMENT_BYTES: Final = 1024 * 1024
#: Most keys taken from one document (more: refused); also most keys kept in grace.
MAX_KEYS: Final = 100
#: Longest ``kid`` taken (a longer one in a token is refused without a fetch).
MAX_KID: Final = 256
#: Seconds one fetch may take (connect, answer, read).
FETCH_TIMEOUT: Final = 5.0

FETCHES = Counter(
    "signalpost_jwks_fetches",
    "Fetches of jwks_source: ok, or failed (unreachable, not a usable JWK Set: the keys "
    "held stand)",
    ["result"],
)
KEYS = Gauge("signalpost_jwks_keys", "JWKS keys a token may be signed with (in grace included)")
UNKNOWN_KIDS = Counter(
    "signalpost_jwks_unknown_kid",
    "Tokens naming a kid the JWK Set does not hold (refused after at most one fetch)",
)


@dataclass(slots=True)
class _Held:
    jwk: jwt.PyJWK
    gone_since: float | None = None  # the first fetch that missed it (monotonic time)


@dataclass(frozen=True, slots=True)
class Loaded:
    """What one document changed."""

    added: tuple[str, ...]
    gone: tuple[str, ...]  # left the document now: in grace from here
    skipped: tuple[str, ...]  # keys of the document not taken, each with why


class KeySet:
    """The keys a token may name, from the documents fetched and the time (sans I/O)."""

    def __init__(
        self,
        *,
        algorithms: Iterable[str],
        grace: float,
        refresh: float,
        min_refresh: float,
    ) -> None:
        self.algorithms = frozenset(algorithms) - {"none"}
        self.grace = grace
        self.refresh = refresh
        self.min_refresh = min_refresh
        self.keys: dict[str, _Held] = {}
        self.failures = 0  # failed fetches in a row
        self.loaded_once = False
        self._last_fetch = float("-inf")

    # ------------------------------------------------------------------ fetching

    def next_fetch(self) -> float:
        """When the next scheduled fetch is due."""
        if self.failures:
            wait = min(self.refresh, self.min_refresh * 2.0 ** (self.failures - 1))
        elif self.loaded_once:
            wait = self.refresh
        else:
            wait = 0.0
        return self._last_fetch + wait

    def may_fetch(self, now: float) -> bool:
        """Whether a fetch for an unknown ``kid`` may start now (rate limit)."""
        return now >= self._last_fetch + self.min_refresh

    def fetch_started(self, now: float) -> None:
        self._last_fetch = now

    def failed(self) -> None:
        """The fetch failed: keep every key held."""
        self.failures += 1

    def loaded(self, document: bytes, now: float) -> Loaded:
        """Take a fetched document; raises ``KeySetError`` (keeping the keys) if unusable."""
        try:
            fresh, skipped = self._parse(document)
        except KeySetError:
            self.failed()
            raise
        self.failures = 0
        self.loaded_once = True
        added = tuple(kid for kid in fresh if kid not in self.keys)
        gone = []
        for kid, held in self.keys.items():
            if kid not in fresh and held.gone_since is None:
                held.gone_since = now
                gone.append(kid)
        retired = {kid: held for kid, held in self.keys.items() if kid not in fresh}
        self.keys = {kid: _Held(jwk) for kid, jwk in fresh.items()}
        # Bounded: the keys that left first are dropped first.
        kept = sorted(retired.items(), key=lambda item: item[1].gone_since or now)[-MAX_KEYS:]
        self.keys.update(kept)
        self.expire(now)
        return Loaded(added, tuple(gone), tuple(skipped))

    def _parse(self, document: bytes) -> tuple[dict[str, jwt.PyJWK], list[str]]:
        if len(document) > MAX_DOCUMENT_BYTES:
            raise KeySetError(f"the JWK Set is larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            data = json.loads(document)
        except ValueError as exc:
            raise KeySetError(f"the JWK Set is not JSON: {exc}") from None
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise KeySetError('the JWK Set has no "keys" list')
        if len(entries) > MAX_KEYS:
            raise KeySetError(f"the JWK Set has {len(entries)} keys, more than {MAX_KEYS}")
        skipped: list[str] = []
        fresh: dict[str, jwt.PyJWK] = {}
        for entry in entries:
            why = self._unusable(entry)
            if why is not None:
                skipped.append(why)
                continue
            try:
                jwk = jwt.PyJWK(entry)
            # Not only PyJWTError: PyJWT raises NotImplementedError for "alg": "none"
            # (which is why ``PyJWKSet``, failing whole on one such entry, is not used).
            except (jwt.PyJWTError, NotImplementedError, ValueError, TypeError) as exc:
                skipped.append(f"{entry.get('kid')!r:.80}: not a key ({exc})")
                continue
            kid = entry["kid"]
            if jwk.algorithm_name not in self.algorithms:
                skipped.append(f"{kid!r}: algorithm {jwk.algorithm_name} not in jwks_algorithms")
            elif kid in fresh:
                skipped.append(f"{kid!r}: listed twice (the first is used)")
            else:
                fresh[kid] = jwk
        if not fresh:
            raise KeySetError(f"the JWK Set has no usable key ({'; '.join(skipped)})")
        return fresh, skipped

    def _unusable(self, entry: object) -> str | None:
        """Why a document entry cannot be a key here (None: try it)."""
        if not isinstance(entry, dict):
            return "an entry that is not an object"
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > MAX_KID:
            return f"a {entry.get('kty')!r:.20} key without a usable kid"
        if entry.get("use") not in (None, "sig"):
            return f"{kid!r}: use {entry.get('use')!r:.20}"
        algorithm = entry.get("alg")
        if algorithm is not None and algorithm not in self.algorithms:
            return f"{kid!r}: algorithm {algorithm!r:.20} not in jwks_algorithms"
        return None

    # ------------------------------------------------------------------ keys

    def expire(self, now: float) -> None:
        """Drop the keys whose grace is over."""
        for kid in [k for k, held in self.keys.items() if self._over(held, now)]:
            del self.keys[kid]

    def _over(self, held: _Held, now: float) -> bool:
        return held.gone_since is not None and now >= held.gone_since + self.grace

    def key(self, kid: str, now: float) -> jwt.PyJWK | None:
        """The key ``kid`` names, if a token may be signed with it now."""
        held = self.keys.get(kid)
        if held is None:
            return None
        if self._over(held, now):
            del self.keys[kid]
            return None
        return held.jwk


# --------------------------------------------------------------------------- I/O shell


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never from https to anything else."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if req.full_url.startswith("https:") and not newurl.startswith("https:"):
            raise KeySetError(f"refusing a redirect from https to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def reader(source: str) -> Callable[[], bytes]:
    """A blocking function that returns the document at ``source`` (URL or file path)."""
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme in ("https", "http"):
        if scheme == "http":
            host = urllib.parse.urlsplit(source).hostname or ""
            if host not in ("127.0.0.1", "::1", "localhost"):
                log.warning("jwks_source %s is plain http: anyone on the way can swap keys", source)
        opener = urllib.request.build_opener(_NoDowngrade)

        def fetch() -> bytes:
            request = urllib.request.Request(
                source, headers={"Accept": "application/json", "User-Agent": "signalpost"}
            )
            try:
                with opener.open(request, timeout=FETCH_TIMEOUT) as response:
                    body: bytes = response.read(MAX_DOCUMENT_BYTES + 1)
            except urllib.error.HTTPError as exc:
                exc.close()  # it holds the connection
                raise KeySetError(f"HTTP {exc.code} {exc.reason}") from None
            return body

        return fetch
    if scheme == "file":
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(source).path))
    elif scheme and len(scheme) > 1:  # (one letter: a Windows drive)
        raise ConfigError(
            f"jwks_source {source!r}: an https:// or http:// URL or a file path is needed"
        )
    else:
        path = Path(source)

    def read() -> bytes:
        with path.open("rb") as document:
            return document.read(MAX_DOCUMENT_BYTES + 1)

    return read


class JwksKeys:
    """Keeps a ``KeySet`` filled from ``jwks_source`` and answers which key a ``kid`` is."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        assert settings.jwks_source is not None
        self.source = settings.jwks_source
        self._read = reader(settings.jwks_source)
        self.keys = KeySet(
            algorithms=settings.jwks_algorithms,
            grace=settings.jwks_grace,
            refresh=settings.jwks_refresh,
            min_refresh=settings.jwks_min_refresh,
        )
        self.clock = clock
        self._fetching: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Fetch once (a failure is logged, not fatal), then keep refreshing."""
        await self.refresh()
        self._tasks.append(spawn(self._refresher(), "jwks-refresh"))

    async def close(self) -> None:
        if self._fetching is not None:
            self._tasks.append(self._fetching)
        await cancel_all(self._tasks)
        self._tasks = []

    async def key(self, kid: str) -> jwt.PyJWK | None:
        """The key for ``kid``; an unknown one fetches the set again if the rate limit
        allows (or waits for the fetch under way), else it is None at once."""
        now = self.clock()
        jwk = self.keys.key(kid, now)
        if jwk is not None:
            return jwk
        UNKNOWN_KIDS.inc()
        if self._fetching is None and not self.keys.may_fetch(now):
            return None
        await self.refresh()
        return self.keys.key(kid, self.clock())

    async def refresh(self) -> None:
        """Fetch now, or wait for the fetch under way."""
        if self._fetching is None:
            self._fetching = asyncio.get_running_loop().create_task(self._fetch())
        await asyncio.shield(self._fetching)

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self.keys.next_fetch() - self.clock()))
            try:
                await self.refresh()
            except Exception:  # a bug here must not stop the refreshes for good
                log.exception("refreshing the JWK Set failed")
                await asyncio.sleep(self.keys.min_refresh)

    async def _fetch(self) -> None:
        keys = self.keys
        keys.fetch_started(self.clock())
        try:
            try:
                async with asyncio.timeout(FETCH_TIMEOUT + 1):
                    document = await in_thread(self._read, "jwks-fetch")
            except (OSError, TimeoutError, KeySetError, ValueError) as exc:
                keys.failed()
                raise KeySetError(f"cannot fetch it: {exc}") from None
            loaded = keys.loaded(document, self.clock())
        except KeySetError as exc:
            FETCHES.labels("failed").inc()
            log.warning(
                "JWK Set %s: %s; keeping the %d keys held (%s)",
                self.source,
                exc,
                len(keys.keys),
                ", ".join(keys.keys) or "none",
            )
        else:
            FETCHES.labels("ok").inc()
            if loaded.added or loaded.gone or loaded.skipped:
                log.info(
                    "JWK Set %s: %d keys (%s); new: %s; left (valid %.0f s more): %s%s",
                    self.source,
                    len(keys.keys),
                    ", ".join(keys.keys),
                    ", ".join(loaded.added) or "none",
                    keys.grace,
                    ", ".join(loaded.gone) or "none",
                    f"; skipped: {'; '.join(loaded.skipped)}" if loaded.skipped else "",
                )
        finally:
            KEYS.set(len(keys.keys))
            self._fetching = None
