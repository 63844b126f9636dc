"""The JWK Set core (sans I/O): which keys a token may name, given the documents and the time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from signalpost.auth import TokenVerifier
from signalpost.config import load_settings
from signalpost.errors import KeySetError, Unauthorized
from signalpost.jwks import MAX_KEYS, KeySet, reader

SECRET = "unit-secret-0123456789abcdef0123"
NOW = 1_700_000_000.0


class Signer:
    """An EC P-256 key pair published under ``kid``."""

    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.private = ec.generate_private_key(ec.SECP256R1())
        self.jwk = {
            **json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key())),
            "kid": kid,
            "alg": "ES256",
            "use": "sig",
        }

    def token(self, user: str = "alice", now: float = NOW, **headers: Any) -> str:
        claims = {"sub": user, "iat": int(now), "exp": int(now + 600)}
        return jwt.encode(
            claims, self.private, algorithm="ES256", headers={"kid": self.kid, **headers}
        )


def with_header(token: str, **header: Any) -> str:
    """``token`` with its header replaced (PyJWT will not encode a bad one)."""
    encoded = jwt.utils.base64url_encode(json.dumps(header).encode()).decode()
    return encoded + "." + token.split(".", 1)[1]


def document(*keys: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


def key_set(**overrides: Any) -> KeySet:
    options: dict[str, Any] = {
        "algorithms": ["ES256", "RS256", "EdDSA"],
        "grace": 60.0,
        "refresh": 300.0,
        "min_refresh": 10.0,
    }
    return KeySet(**{**options, **overrides})


def test_a_key_that_leaves_stays_valid_for_the_grace_period_then_not() -> None:
    old, new = Signer("old"), Signer("new")
    keys = key_set(grace=60.0)
    keys.loaded(document(old.jwk), 0.0)
    assert keys.key("old", 1.0) is not None and keys.key("new", 1.0) is None
    loaded = keys.loaded(document(new.jwk), 100.0)  # rotated: "old" left
    assert (loaded.added, loaded.gone) == (("new",), ("old",))
    assert keys.key("new", 100.0) is not None
    assert keys.key("old", 159.9) is not None  # grace counts from the fetch that missed it
    keys.loaded(document(new.jwk), 130.0)  # a later fetch does not restart the grace
    assert keys.key("old", 159.9) is not None
    assert keys.key("old", 160.0) is None
    assert "old" not in keys.keys


def test_a_key_that_comes_back_is_valid_again_without_grace() -> None:
    old, new = Signer("old"), Signer("new")
    keys = key_set(grace=10.0)
    keys.loaded(document(old.jwk), 0.0)
    keys.loaded(document(new.jwk), 1.0)
    keys.loaded(document(old.jwk, new.jwk), 2.0)
    assert keys.key("old", 1000.0) is not None


def test_an_unusable_document_is_an_error_and_the_keys_held_stand() -> None:
    signer = Signer("k1")
    keys = key_set()
    keys.loaded(document(signer.jwk), 0.0)
    for bad in [
        b"<html>",
        b'{"keys": "no"}',
        document(),
        document({"kty": "EC", "kid": "x"}),  # not a key
        document(*[{**signer.jwk, "kid": f"k{n}"} for n in range(MAX_KEYS + 1)]),
        b" " * (1024 * 1024 + 1),
    ]:
        with pytest.raises(KeySetError):
            keys.loaded(bad, 1.0)
    assert keys.failures == 6
    assert keys.key("k1", 1.0) is not None


def test_only_allowed_algorithms_signing_keys_with_a_kid_are_taken() -> None:
    signer = Signer("ec")
    hmac_key = {"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0", "kid": "hs"}
    edwards = json.loads(
        jwt.algorithms.OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate().public_key())
    )
    entries = [
        signer.jwk,
        hmac_key,  # HS256: not unless listed
        {**signer.jwk, "kid": "enc", "use": "enc"},
        {k: v for k, v in signer.jwk.items() if k != "kid"},
        {**signer.jwk, "alg": "none", "kid": "none"},  # no such algorithm: not a key
        {**edwards, "kid": "ed"},
        {**signer.jwk, "kid": "ec"},  # listed twice: the first wins
    ]
    loaded = key_set().loaded(document(*entries), 0.0)
    assert len(loaded.skipped) == 5, loaded.skipped
    assert set(loaded.added) == {"ec", "ed"}
    with_hs = key_set(algorithms=["ES256", "HS256"])
    assert set(with_hs.loaded(document(*entries), 0.0).added) == {"ec", "hs"}
    assert key_set(algorithms=["ES256", "none"]).algorithms == {"ES256"}


def test_fetches_are_scheduled_rate_limited_and_back_off() -> None:
    keys = key_set(refresh=300.0, min_refresh=10.0)
    assert keys.next_fetch() == float("-inf")  # never fetched: now
    keys.fetch_started(0.0)
    keys.failed()
    assert keys.next_fetch() == 10.0
    keys.fetch_started(10.0)
    keys.failed()
    assert keys.next_fetch() == 30.0  # doubling
    for _ in range(10):
        keys.failed()
    assert keys.next_fetch() == 310.0  # at most refresh
    keys.loaded(document(Signer("k").jwk), 10.0)
    assert keys.next_fetch() == 310.0
    # An unknown kid may fetch once per min_refresh, counted from the last fetch.
    assert not keys.may_fetch(19.9)
    assert keys.may_fetch(20.0)


def verifier(keys: KeySet, **overrides: Any) -> TokenVerifier:
    settings = load_settings(
        environ={}, jwt_secret=SECRET, jwks_source="/nonexistent/jwks.json", **overrides
    )
    verifier = TokenVerifier(settings)
    assert verifier.jwks is not None
    verifier.jwks.keys = keys
    return verifier


def test_the_verifier_takes_the_key_a_kid_names_and_nothing_else() -> None:
    signer, other = Signer("k1"), Signer("k2")
    keys = key_set(grace=0.0)
    keys.loaded(document(signer.jwk), 0.0)
    check = verifier(keys)
    assert check.verify(signer.token(), NOW).user == "alice"
    with pytest.raises(Unauthorized, match="not in the JWK Set"):
        check.verify(other.token(), NOW)
    # Signed by another key under k1's kid: the signature fails.
    forged = jwt.encode(
        {"sub": "eve", "exp": NOW + 60}, other.private, algorithm="ES256", headers={"kid": "k1"}
    )
    with pytest.raises(Unauthorized, match="invalid token"):
        check.verify(forged, NOW)
    # An HMAC token "signed" with the key's public JWK, and alg none, under the same kid.
    confused = jwt.encode(
        {"sub": "eve", "exp": NOW + 60}, SECRET, algorithm="HS256", headers={"kid": "k1"}
    )
    with pytest.raises(Unauthorized, match="does not match"):
        check.verify(confused, NOW)
    unsigned = jwt.encode({"sub": "eve", "exp": NOW + 60}, None, algorithm="none")
    with pytest.raises(Unauthorized):
        check.verify(with_header(unsigned, alg="none", kid="k1"), NOW)
    # Times are checked as for every token.
    with pytest.raises(Unauthorized, match="expired"):
        check.verify(signer.token(now=NOW - 3600), NOW)
    # A kid that is not a short string is refused before any lookup.
    with pytest.raises(Unauthorized, match=r"(?i)k(ey )?id"):
        check.verify(with_header(signer.token(), alg="ES256", kid=7), NOW)
    with pytest.raises(Unauthorized, match="kid"):
        check.verify(signer.token(kid="k" * 300), NOW)


def test_a_token_without_kid_is_checked_as_without_a_jwk_set() -> None:
    keys = key_set()
    keys.loaded(document(Signer("k1").jwk), 0.0)
    token = jwt.encode({"sub": "bob", "exp": NOW + 60}, SECRET, algorithm="HS256")
    assert verifier(keys).verify(token, NOW).user == "bob"


def test_jwks_settings_are_checked_at_load() -> None:
    with pytest.raises(Exception, match="jwks_algorithms"):
        load_settings(environ={"SIGNALPOST_JWKS_ALGORITHMS": "ES256,none"})
    settings = load_settings(environ={"SIGNALPOST_JWKS_SOURCE": "ftp://example.com/jwks"})
    with pytest.raises(Exception, match="https:// or http://"):
        TokenVerifier(settings)


def test_an_https_source_is_never_redirected_to_plain_http() -> None:
    import urllib.request

    from signalpost.jwks import _NoDowngrade

    request = urllib.request.Request("https://idp.example.com/jwks.json")
    with pytest.raises(KeySetError, match="redirect"):
        _NoDowngrade().redirect_request(request, None, 302, "Found", {}, "http://evil/jwks")
    followed = _NoDowngrade().redirect_request(
        request, None, 302, "Found", {}, "https://idp.example.com/v2/jwks.json"
    )
    assert followed is not None and followed.full_url.endswith("/v2/jwks.json")


def test_a_file_source_is_read(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(document(Signer("k").jwk))
    assert reader(str(path))() == path.read_bytes()
    assert reader(path.as_uri())() == path.read_bytes()
