"""Client tokens (JWT), resume tokens, and TURN REST credentials. Pure: ``now`` is passed in."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt

from signalpost.config import Settings
from signalpost.errors import Unauthorized
from signalpost.jwks import MAX_KID, JwksKeys

RESUME_TOKEN_LIFETIME: Final = 24 * 3600.0

#: The ``typ`` claim of a server API key (``signalpost.api_keys``): a token with it is
#: never a client token, and a token without it never an API key.
API_KEY_TYPE: Final = "signalpost-api"


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified token says about its holder."""

    user: str
    rooms: tuple[str, ...] | None  # None: any room
    name: str | None
    meta: dict[str, Any] | None
    #: The region where rooms this client is the first member of are homed (the ``home``
    #: claim, docs/multi-region.md); None: its edge's region.
    home: str | None = None

    def may_join(self, room: str) -> bool:
        """True when the token grants ``room`` (exact name or a ``prefix*`` pattern)."""
        if self.rooms is None:
            return True
        return any(
            room.startswith(grant[:-1]) if grant.endswith("*") else room == grant
            for grant in self.rooms
        )


class TokenVerifier:
    """Checks client JWTs: signature, exp/nbf/iat (with leeway), aud when configured.

    With ``jwks_source``, a token with a ``kid`` header is checked with that key of the JWK
    Set only (``signalpost/jwks.py``); a token without one as without a JWK Set.
    """

    def __init__(self, settings: Settings) -> None:
        self._secret = settings.jwt_secret
        self._audience = settings.jwt_audience
        self.leeway = settings.jwt_leeway
        self._public_key: str | None = None
        if settings.jwt_public_key_file:
            self._public_key = Path(settings.jwt_public_key_file).read_text()
        self.jwks = JwksKeys(settings) if settings.jwks_source else None

    async def start(self) -> None:
        """Load the JWK Set (when configured) and keep it fresh until ``close()``."""
        if self.jwks is not None:
            await self.jwks.start()

    async def close(self) -> None:
        if self.jwks is not None:
            await self.jwks.close()

    async def authenticate(self, token: str, now: float) -> Identity:
        """``verify``, fetching the JWK Set again (rate limited) for an unknown ``kid``."""
        if self.jwks is None:
            return self.verify(token, now)
        return _identity_from_claims(await self.authenticated_claims(token, now))

    async def authenticated_claims(self, token: str, now: float) -> dict[str, Any]:
        """``verified_claims``, fetching the JWK Set again (rate limited) for an unknown
        ``kid``."""
        if self.jwks is None:
            return self.verified_claims(token, now)
        header = _header(token)
        kid = header.get("kid")
        if kid is None:
            return self._verify(token, header, now)
        return self._with_jwk(token, header, await self.jwks.key(_kid(kid)), now)

    def verify(self, token: str, now: float) -> Identity:
        """Return the identity in ``token`` or raise ``Unauthorized`` (no I/O: a ``kid``
        is looked up in the JWK Set as last fetched)."""
        return _identity_from_claims(self.verified_claims(token, now))

    def verified_claims(self, token: str, now: float) -> dict[str, Any]:
        """The claims of ``token`` once its signature, times and audience are checked, of
        a client token or an API key alike (each caller checks the kind it wants)."""
        header = _header(token)
        kid = header.get("kid")
        if self.jwks is None or kid is None:
            return self._verify(token, header, now)
        jwk = self.jwks.keys.key(_kid(kid), self.jwks.clock())
        return self._with_jwk(token, header, jwk, now)

    def _with_jwk(
        self, token: str, header: dict[str, Any], jwk: jwt.PyJWK | None, now: float
    ) -> dict[str, Any]:
        algorithm = header.get("alg")
        if jwk is None:
            raise Unauthorized(f"token key {header.get('kid')!r:.80} is not in the JWK Set")
        # The key's algorithm (its "alg", else its type's) decides, never the token's
        # header alone: "none" and algorithm confusion find no key.
        if algorithm != jwk.algorithm_name:
            raise Unauthorized(
                f"token algorithm {algorithm!r:.20} does not match its key's ({jwk.algorithm_name})"
            )
        return self._decode(token, jwk.key, jwk.algorithm_name, now)

    def _verify(self, token: str, header: dict[str, Any], now: float) -> dict[str, Any]:
        algorithm = header.get("alg")
        # The key is picked by our configuration, never by the token: alg "none" and
        # algorithm-confusion tricks (HS256 signed with a public key) find no key here.
        if algorithm == "HS256":
            key: str = self._secret
        elif algorithm in ("ES256", "RS256") and self._public_key:
            key = self._public_key
        else:
            raise Unauthorized(f"token algorithm {algorithm!r} is not accepted")
        return self._decode(token, key, algorithm, now)

    def _decode(self, token: str, key: Any, algorithm: str, now: float) -> dict[str, Any]:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                # Times are checked below against the caller's ``now`` (pure, testable).
                options={
                    "require": ["sub", "exp"],
                    "verify_aud": self._audience is not None,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        self._check_times(claims, now)
        return claims

    def _check_times(self, claims: dict[str, Any], now: float) -> None:
        times = {name: claims.get(name) for name in ("exp", "nbf", "iat")}
        for name, value in times.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value != value
            ):
                raise Unauthorized(f"token {name} claim must be a number")
        exp, nbf, iat = times["exp"], times["nbf"], times["iat"]
        if exp is not None and now > exp + self.leeway:
            raise Unauthorized("token has expired")
        if nbf is not None and now < nbf - self.leeway:
            raise Unauthorized("token is not yet valid (nbf)")
        if iat is not None and now < iat - self.leeway:
            raise Unauthorized("token was issued in the future (iat)")


def _header(token: str) -> dict[str, Any]:
    try:
        header: dict[str, Any] = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"malformed token: {exc}") from None
    return header


def _kid(kid: object) -> str:
    if not isinstance(kid, str) or not kid or len(kid) > MAX_KID:
        raise Unauthorized(f"token kid must be a string of 1 to {MAX_KID} characters")
    return kid


def _identity_from_claims(claims: dict[str, Any]) -> Identity:
    if claims.get("typ") == API_KEY_TYPE:
        raise Unauthorized("a server API key is not a client token")
    user = claims.get("sub")
    if not isinstance(user, str) or not user or len(user) > 256:
        raise Unauthorized("token subject must be a non-empty string")
    rooms = claims.get("rooms")
    if rooms is not None and (
        not isinstance(rooms, list) or not all(isinstance(r, str) and r for r in rooms)
    ):
        raise Unauthorized("token rooms claim must be a list of room names")
    name = claims.get("name")
    meta = claims.get("meta")
    home = claims.get("home")
    if home is not None and (not isinstance(home, str) or not home or len(home) > 64):
        raise Unauthorized("token home claim must be a region name")
    return Identity(
        user=user,
        rooms=tuple(rooms) if rooms is not None else None,
        name=name if isinstance(name, str) else None,
        meta=meta if isinstance(meta, dict) else None,
        home=home,
    )


def mint_token(
    secret: str,
    user: str,
    *,
    now: float,
    ttl: float = 3600.0,
    rooms: list[str] | None = None,
    audience: str | None = None,
    name: str | None = None,
    home: str | None = None,
) -> str:
    """Mint an HS256 client token (``signalpost token``, dev page, tests); ``home``: the
    region of the rooms its holder opens (docs/multi-region.md)."""
    claims: dict[str, Any] = {"sub": user, "iat": int(now), "exp": int(now + ttl)}
    if rooms:
        claims["rooms"] = rooms
    if audience:
        claims["aud"] = audience
    if name:
        claims["name"] = name
    if home:
        claims["home"] = home
    return jwt.encode(claims, secret, algorithm="HS256")


class ResumeTokens:
    """Signed resume tokens: any edge holding the cluster secret can check them.

    Keyed with a secret derived from the JWT secret, so neither kind of token can stand in
    for the other.
    """

    def __init__(self, jwt_secret: str) -> None:
        self._key = hmac.new(jwt_secret.encode(), b"signalpost resume v1", hashlib.sha256).digest()

    def issue(
        self, session: str, user: str, now: float, generation: int = 1, region: str = ""
    ) -> str:
        """A token that lets ``user`` continue ``session`` on any edge.

        ``generation`` numbers the session's connections (the one the token is issued to):
        the connection that resumes with it is the next one. ``region``: the region of the
        edge that issued it, whose presence service holds the session's lease.
        """
        claims: dict[str, Any] = {"sid": session, "sub": user, "iat": int(now), "gen": generation}
        if region:
            claims["reg"] = region
        claims["exp"] = int(now + RESUME_TOKEN_LIFETIME)
        return jwt.encode(claims, self._key, algorithm="HS256")

    def session_of(self, token: str, user: str, now: float | None = None) -> str | None:
        """The session id ``token`` resumes for ``user``; None when invalid or not theirs.

        Expiry is checked against ``now`` (default: the wall clock).
        """
        try:
            claims = jwt.decode(
                token, self._key, algorithms=["HS256"], options={"verify_exp": False}
            )
        except jwt.PyJWTError:
            return None
        session, expiry = claims.get("sid"), claims.get("exp")
        if claims.get("sub") != user or not isinstance(session, str):
            return None
        if not isinstance(expiry, int) or (time.time() if now is None else now) > expiry:
            return None
        return session

    def region_of(self, token: str) -> str:
        """The region of the edge that issued a (valid) token; "" when it names none."""
        try:
            claims = jwt.decode(
                token, self._key, algorithms=["HS256"], options={"verify_exp": False}
            )
        except jwt.PyJWTError:
            return ""
        region = claims.get("reg", "")
        return region if isinstance(region, str) else ""

    def generation_of(self, token: str) -> int:
        """The connection generation a (valid) token was issued to; 1 for older tokens."""
        try:
            claims = jwt.decode(
                token, self._key, algorithms=["HS256"], options={"verify_exp": False}
            )
        except jwt.PyJWTError:
            return 1
        generation = claims.get("gen", 1)
        return generation if isinstance(generation, int) and generation > 0 else 1


def turn_credentials(secret: str, user: str, ttl: int, now: float) -> tuple[str, str]:
    """TURN REST API credentials: username ``<expiry>:<user>``, base64 HMAC-SHA1 password.

    This is the scheme coturn checks with ``use-auth-secret``/``static-auth-secret``.
    """
    username = f"{int(now) + ttl}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_servers(
    settings: Settings,
    user: str,
    now: float,
    regions: Sequence[tuple[Sequence[str], Sequence[str]]] | None = None,
) -> list[dict[str, Any]]:
    """RTCIceServer list for ``user``: STUN URLs, then TURN URLs with fresh credentials.

    ``regions``: ``(stun_urls, turn_urls)`` per region, this edge's own first, the others
    as fallbacks (``signalpost.near``); None: this edge's settings alone. TURN URLs of
    every region get the same credentials, minted with this edge's ``turn_secret``: every
    region's coturn must accept that secret (docs/webrtc.md).
    """
    if regions is None:
        regions = [(settings.stun_urls, settings.turn_urls)]
    servers: list[dict[str, Any]] = []
    credentials = None
    if settings.turn_secret:
        credentials = turn_credentials(settings.turn_secret, user, settings.turn_ttl, now)
    for stun_urls, turn_urls in regions:
        if stun_urls:
            servers.append({"urls": list(stun_urls)})
        if turn_urls and credentials is not None:
            username, credential = credentials
            servers.append(
                {"urls": list(turn_urls), "username": username, "credential": credential}
            )
    return servers
