"""Client JWTs, resume tokens and TURN REST credentials (pure: ``now`` is passed in)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signalpost.auth import (
    RESUME_TOKEN_LIFETIME,
    ResumeTokens,
    TokenVerifier,
    ice_servers,
    mint_token,
    turn_credentials,
)
from signalpost.config import Settings, load_settings
from signalpost.errors import Unauthorized

SECRET = "unit-secret-0123456789abcdef0123"
NOW = 1_700_000_000.0


def settings(**overrides: Any) -> Settings:
    return load_settings(environ={}, jwt_secret=SECRET, **overrides)


def encode(claims: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def verify(token: str, now: float = NOW, **overrides: Any) -> Any:
    return TokenVerifier(settings(**overrides)).verify(token, now)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# --------------------------------------------------------------------------- client tokens


def test_a_minted_token_verifies_to_its_identity() -> None:
    token = mint_token(SECRET, "alice", now=NOW, rooms=["r1", "team-*"], name="Alice")
    identity = verify(token)
    assert (identity.user, identity.name, identity.rooms) == ("alice", "Alice", ("r1", "team-*"))
    assert identity.may_join("r1") and identity.may_join("team-blue")
    assert not identity.may_join("r2") and not identity.may_join("team")


def test_without_a_rooms_claim_any_room_may_be_joined() -> None:
    assert verify(mint_token(SECRET, "bob", now=NOW)).may_join("anything")


def test_expiry_is_checked_against_now_with_the_leeway() -> None:
    token = mint_token(SECRET, "alice", now=NOW, ttl=60)
    assert verify(token, now=NOW + 60 + 9, jwt_leeway=10).user == "alice"
    with pytest.raises(Unauthorized, match="expired"):
        verify(token, now=NOW + 60 + 11, jwt_leeway=10)


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_tokens_from_the_future_are_refused(claim: str) -> None:
    token = encode({"sub": "alice", "exp": NOW + 3600, claim: NOW + 120})
    with pytest.raises(Unauthorized, match=claim):
        verify(token, jwt_leeway=10)
    assert verify(token, now=NOW + 115, jwt_leeway=10).user == "alice"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": NOW + 60}, "sub"),
        ({"sub": "alice"}, "exp"),
        ({"sub": "", "exp": NOW + 60}, "subject"),
        ({"sub": 42, "exp": NOW + 60}, "(?i)sub"),
        ({"sub": "alice", "exp": "tomorrow"}, "exp"),
        ({"sub": "alice", "exp": NOW + 60, "rooms": "r1"}, "rooms"),
        ({"sub": "alice", "exp": NOW + 60, "rooms": ["r1", ""]}, "rooms"),
        ({"sub": "alice", "exp": NOW + 60, "home": ["us"]}, "home"),
        ({"sub": "alice", "exp": NOW + 60, "home": ""}, "home"),
    ],
)
def test_bad_claims_are_refused(claims: dict[str, Any], reason: str) -> None:
    with pytest.raises(Unauthorized, match=reason):
        verify(encode(claims))


def test_the_home_claim_is_the_identitys_home_region() -> None:
    assert verify(encode({"sub": "alice", "exp": NOW + 60, "home": "us"})).home == "us"
    assert verify(encode({"sub": "alice", "exp": NOW + 60})).home is None


def test_a_token_signed_with_another_secret_is_refused() -> None:
    with pytest.raises(Unauthorized, match="invalid token"):
        verify(mint_token("some-other-secret-0123456789abcdef", "alice", now=NOW))


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(alg: str) -> None:
    unsigned = f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64({'sub': 'alice', 'exp': NOW + 60})}."
    with pytest.raises(Unauthorized, match="algorithm"):
        verify(unsigned)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "a.b", "🦊.🦊.🦊"])
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(Unauthorized):
        verify(token)


def test_audience_is_checked_when_configured() -> None:
    right = mint_token(SECRET, "alice", now=NOW, audience="signalpost")
    wrong = mint_token(SECRET, "alice", now=NOW, audience="elsewhere")
    none = mint_token(SECRET, "alice", now=NOW)
    assert verify(right, jwt_audience="signalpost").user == "alice"
    for token in (wrong, none):
        with pytest.raises(Unauthorized):
            verify(token, jwt_audience="signalpost")


@pytest.fixture
def ec_keys(tmp_path: Path) -> tuple[str, Path]:
    """An ES256 private key (PEM text) and the file holding its public key."""
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = tmp_path / "public.pem"
    public.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pem, public


def test_es256_tokens_verify_with_the_configured_public_key(ec_keys: tuple[str, Path]) -> None:
    private, public = ec_keys
    token = encode({"sub": "alice", "exp": NOW + 60}, private, "ES256")
    assert verify(token, jwt_public_key_file=str(public)).user == "alice"
    with pytest.raises(Unauthorized, match="algorithm"):
        verify(token)  # no public key configured: ES256 is not accepted


def test_hs256_signed_with_the_public_key_is_refused(ec_keys: tuple[str, Path]) -> None:
    # Algorithm confusion: the public key is no secret, so it must never act as an HMAC key.
    _, public = ec_keys
    forged = _hmac_token({"sub": "mallory", "exp": NOW + 60}, public.read_bytes())
    with pytest.raises(Unauthorized, match="invalid token"):
        verify(forged, jwt_public_key_file=str(public))


def _hmac_token(claims: dict[str, Any], key: bytes) -> str:
    """HS256 by hand: PyJWT itself refuses to use a PEM key as an HMAC secret."""
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(claims)}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


# --------------------------------------------------------------------------- resume tokens


def test_resume_tokens_name_the_session_for_their_user_only() -> None:
    tokens = ResumeTokens(SECRET)
    token = tokens.issue("s-1", "alice", NOW)
    assert tokens.session_of(token, "alice", NOW + 60) == "s-1"
    assert tokens.session_of(token, "mallory", NOW + 60) is None
    other_cluster = ResumeTokens("another-cluster-secret-0123456789")
    assert other_cluster.session_of(token, "alice", NOW + 60) is None
    assert tokens.session_of("garbage", "alice", NOW + 60) is None


def test_resume_tokens_expire() -> None:
    tokens = ResumeTokens(SECRET)
    token = tokens.issue("s-1", "alice", NOW)
    assert tokens.session_of(token, "alice", NOW + RESUME_TOKEN_LIFETIME) == "s-1"
    assert tokens.session_of(token, "alice", NOW + RESUME_TOKEN_LIFETIME + 1) is None


def test_client_tokens_and_resume_tokens_are_not_interchangeable() -> None:
    tokens = ResumeTokens(SECRET)
    client_token = mint_token(SECRET, "alice", now=NOW)
    assert tokens.session_of(client_token, "alice", NOW) is None
    with pytest.raises(Unauthorized):
        verify(tokens.issue("s-1", "alice", NOW))


# --------------------------------------------------------------------------- TURN


def test_turn_credentials_follow_the_turn_rest_scheme() -> None:
    # Reference: printf 1700000600:alice | openssl dgst -sha1 -hmac north-pole-secret -binary
    #            | base64
    assert turn_credentials("north-pole-secret", "alice", 600, 1_700_000_000) == (
        "1700000600:alice",
        "z0ekCXwUFOJc/fYesfOwQftdgI0=",
    )


def test_ice_servers_list_stun_then_turn_with_fresh_credentials() -> None:
    configured = settings(
        stun_urls=["stun:stun.example:3478"],
        turn_urls=["turn:turn.example:3478?transport=udp", "turns:turn.example:5349"],
        turn_secret="north-pole-secret",
        turn_ttl=600,
    )
    stun, turn = ice_servers(configured, "alice", 1_700_000_000)
    assert stun == {"urls": ["stun:stun.example:3478"]}
    assert turn == {
        "urls": ["turn:turn.example:3478?transport=udp", "turns:turn.example:5349"],
        "username": "1700000600:alice",
        "credential": "z0ekCXwUFOJc/fYesfOwQftdgI0=",
    }


def test_without_a_turn_secret_no_turn_server_is_offered() -> None:
    configured = settings(stun_urls=["stun:s:3478"], turn_urls=["turn:t:3478"])
    assert ice_servers(configured, "alice", NOW) == [{"urls": ["stun:s:3478"]}]
