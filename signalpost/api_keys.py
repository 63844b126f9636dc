"""Server API keys: signed tokens with scopes, checked with the client tokens' key store.

An API key is a JWT like a client token (HS256 with ``jwt_secret``, or a key of the JWK
Set by ``kid``, or ``jwt_public_key_file``), told apart by its ``typ`` claim
(``API_KEY_TYPE``): ``signalpost.auth`` refuses it as a client token, and ``ApiKeys``
refuses any token without it, so neither kind can stand in for the other. Its ``scope``
claim lists what it may do (space separated, as OAuth 2 scopes are). Pure: ``now`` is
passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

import jwt

from signalpost.auth import API_KEY_TYPE, TokenVerifier
from signalpost.errors import BadRequest, Forbidden, Unauthorized

#: Every scope, and what it allows (docs/server-api.md).
SCOPES: Final[dict[str, str]] = {
    "rooms:read": "list rooms, read one room and its members",
    "presence:read": "read users' status and sessions",
    "publish": "publish to a room, a session or a user",
    "kick": "end sessions (close 4410, resume refused)",
    "rooms:close": "close rooms (room-closed, every member leaves)",
    "tokens:mint": "mint client tokens",
}
#: What ``--scope all`` stands for when minting a key.
ALL_SCOPES: Final = tuple(SCOPES)
#: Longest key name (its ``sub``): it shows in a published signal's ``from``.
MAX_KEY_NAME: Final = 64


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A verified API key: its name (``sub``) and scopes."""

    name: str
    scopes: frozenset[str]

    def require(self, scope: str) -> None:
        """Raise ``Forbidden`` unless the key has ``scope``."""
        if scope not in self.scopes:
            raise Forbidden(f"API key {self.name!r} lacks scope {scope!r}")


def parse_scopes(text: str) -> frozenset[str]:
    """Scopes from a space or comma separated list (``all``: every scope); unknown ones
    are refused, naming them."""
    names = [s for s in text.replace(",", " ").split() if s]
    if "all" in names:
        return frozenset(ALL_SCOPES)
    unknown = sorted(set(names) - SCOPES.keys())
    if unknown:
        raise BadRequest(f"unknown scope(s) {unknown}; known: {sorted(SCOPES)}")
    if not names:
        raise BadRequest("an API key needs at least one scope")
    return frozenset(names)


def key_from_claims(claims: dict[str, Any]) -> ApiKey:
    """The API key a verified token's claims describe; ``Unauthorized`` if they are not
    an API key's."""
    if claims.get("typ") != API_KEY_TYPE:
        raise Unauthorized("not a server API key (a client token cannot call the API)")
    name = claims.get("sub")
    if not isinstance(name, str) or not name or len(name) > MAX_KEY_NAME:
        raise Unauthorized(f"API key subject must be a string of 1 to {MAX_KEY_NAME} characters")
    scope = claims.get("scope")
    if not isinstance(scope, str):
        raise Unauthorized("API key has no scope claim (a space-separated string)")
    scopes = frozenset(s for s in scope.split(" ") if s in SCOPES)
    if not scopes:
        raise Unauthorized("API key grants no known scope")
    return ApiKey(name, scopes)


def bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        raise Unauthorized("no API key: send Authorization: Bearer <key>")
    kind, _, token = header.strip().partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be Bearer <API key>")
    return token.strip()


#: Verified keys remembered (a backend sends the same key with every request: its
#: signature is checked once, not per request); past that the oldest is forgotten.
MAX_REMEMBERED_KEYS: Final = 1024
#: Seconds a verified key is taken as verified without checking it again (its ``exp`` is
#: checked every time): a key whose signing key left the JWK Set stops working this late.
REMEMBER_FOR: Final = 60.0


class ApiKeys:
    """Checks API keys with a ``TokenVerifier`` (the edge's, sharing its keys)."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier
        # token -> (key, its exp, verified until)
        self._known: OrderedDict[str, tuple[ApiKey, float, float]] = OrderedDict()

    async def authenticate(self, authorization: str | None, now: float) -> ApiKey:
        """The key of an ``Authorization`` header, or ``Unauthorized``."""
        token = bearer(authorization)
        known = self._known.get(token)
        if known is not None:
            key, expires, until = known
            if now <= until and now <= expires + self._verifier.leeway:
                return key
            del self._known[token]
        claims = await self._verifier.authenticated_claims(token, now)
        key = key_from_claims(claims)
        self._known[token] = (key, float(claims["exp"]), now + REMEMBER_FOR)
        if len(self._known) > MAX_REMEMBERED_KEYS:
            self._known.popitem(last=False)
        return key

    def verify(self, authorization: str | None, now: float) -> ApiKey:
        """As ``authenticate``, without fetching the JWK Set (an unknown kid is refused)."""
        return key_from_claims(self._verifier.verified_claims(bearer(authorization), now))


def mint_api_key(
    secret: str,
    name: str,
    scopes: frozenset[str] | tuple[str, ...] | list[str],
    *,
    now: float,
    ttl: float = 365 * 86400.0,
    audience: str | None = None,
) -> str:
    """An HS256 API key (``signalpost api key``, tests): ``name`` and ``scopes``."""
    if not name or len(name) > MAX_KEY_NAME:
        raise BadRequest(f"API key name must be 1 to {MAX_KEY_NAME} characters")
    unknown = sorted(set(scopes) - SCOPES.keys())
    if unknown or not scopes:
        raise BadRequest(f"bad scopes {unknown or '(none)'}; known: {sorted(SCOPES)}")
    claims: dict[str, Any] = {
        "sub": name,
        "typ": API_KEY_TYPE,
        "scope": " ".join(sorted(scopes)),
        "iat": int(now),
        "exp": int(now + ttl),
    }
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
