"""The server API's pure cores: API keys and scopes, page merging, request ids, and what
the broker and presence tables do with the API's commands (no sockets, no clock)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import jwt
import pytest

from broker.rooms import RoomTable
from edge.server_api import (
    MAX_IDEMPOTENCY_KEY,
    PUBLISH_BUCKETS,
    idempotency_request_id,
    merge_pages,
    publish_session,
)
from presence.table import PresenceTable
from signalpost.api_keys import (
    ALL_SCOPES,
    REMEMBER_FOR,
    ApiKeys,
    bearer,
    key_from_claims,
    mint_api_key,
    parse_scopes,
)
from signalpost.auth import TokenVerifier, mint_token
from signalpost.config import Settings
from signalpost.errors import BadRequest, Forbidden, Unauthorized
from signalpost.wire import (
    ApiAnswer,
    ClaimCmd,
    ClaimReply,
    Deliver,
    JoinCmd,
    Kick,
    KickCmd,
    PresenceQuery,
    Reply,
    RoomQuery,
    RoomsQuery,
    SessionUp,
    SignalCmd,
    encode_json,
    peer_object,
)

SECRET = "unit-secret-0123456789abcdef-0123456789"
NOW = 1_800_000_000.0


def keys(**settings: Any) -> ApiKeys:
    return ApiKeys(TokenVerifier(Settings(jwt_secret=SECRET, **settings)))


# --------------------------------------------------------------------------- keys, scopes


def test_a_key_carries_its_name_and_scopes() -> None:
    key = mint_api_key(SECRET, "billing", ["publish", "rooms:read"], now=NOW)
    verified = keys().verify(f"Bearer {key}", NOW)
    assert verified.name == "billing"
    assert verified.scopes == {"publish", "rooms:read"}
    verified.require("publish")
    with pytest.raises(Forbidden, match="kick"):
        verified.require("kick")


def test_a_client_token_is_not_an_api_key_nor_the_reverse() -> None:
    client = mint_token(SECRET, "alice", now=NOW)
    with pytest.raises(Unauthorized, match="not a server API key"):
        keys().verify(f"Bearer {client}", NOW)
    key = mint_api_key(SECRET, "backend", ALL_SCOPES, now=NOW)
    with pytest.raises(Unauthorized, match="not a client token"):
        TokenVerifier(Settings(jwt_secret=SECRET)).verify(key, NOW)


def test_expired_forged_and_audience_less_keys_are_refused() -> None:
    key = mint_api_key(SECRET, "b", ["publish"], now=NOW, ttl=60)
    with pytest.raises(Unauthorized, match="expired"):
        keys().verify(f"Bearer {key}", NOW + 3600)
    forged = mint_api_key("another-secret-0123456789abcdef-0123", "b", ["publish"], now=NOW)
    with pytest.raises(Unauthorized, match="invalid token"):
        keys().verify(f"Bearer {forged}", NOW)
    with pytest.raises(Unauthorized):
        keys(jwt_audience="app").verify(f"Bearer {key}", NOW)
    with_audience = mint_api_key(SECRET, "b", ["publish"], now=NOW, audience="app")
    assert keys(jwt_audience="app").verify(f"Bearer {with_audience}", NOW).name == "b"


def test_claims_must_name_known_scopes() -> None:
    base = {"sub": "b", "typ": "signalpost-api"}
    with pytest.raises(Unauthorized, match="no scope"):
        key_from_claims(base)
    with pytest.raises(Unauthorized, match="no known scope"):
        key_from_claims({**base, "scope": "admin everything"})
    assert key_from_claims({**base, "scope": "kick admin"}).scopes == {"kick"}
    with pytest.raises(Unauthorized, match="subject"):
        key_from_claims({**base, "sub": "x" * 65, "scope": "kick"})


def test_a_key_with_alg_none_is_refused() -> None:
    claims = {"sub": "b", "typ": "signalpost-api", "scope": "kick", "exp": int(NOW) + 60}
    unsigned = jwt.encode(claims, None, algorithm="none")
    with pytest.raises(Unauthorized, match="algorithm"):
        keys().verify(f"Bearer {unsigned}", NOW)


def test_scope_lists_and_bearer_headers_parse_strictly() -> None:
    assert parse_scopes("publish, kick") == {"publish", "kick"}
    assert parse_scopes("all") == set(ALL_SCOPES)
    with pytest.raises(BadRequest, match="nope"):
        parse_scopes("publish nope")
    with pytest.raises(BadRequest):
        parse_scopes(" ")
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    for header in (None, "", "Basic abc", "Bearer", "Bearer  "):
        with pytest.raises(Unauthorized):
            bearer(header)
    with pytest.raises(BadRequest):
        mint_api_key(SECRET, "b", ["root"], now=NOW)


# --------------------------------------------------------------------------- pages, ids


def rooms(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "members": 1, "epoch": "e", "offset": 1} for n in names]


def test_pages_of_every_broker_merge_in_name_order_each_room_once() -> None:
    pages = [rooms("a", "d", "g"), rooms("b", "c"), rooms("c", "e")]  # c moved meanwhile
    page = merge_pages(pages, more=False, limit=3)
    assert [r["name"] for r in page["rooms"]] == ["a", "b", "c"]
    assert page["next_cursor"] == "c"  # more are left over (d, e, g)
    whole = merge_pages(pages, more=False, limit=10)
    assert [r["name"] for r in whole["rooms"]] == ["a", "b", "c", "d", "e", "g"]
    assert whole["next_cursor"] is None
    # A broker with more than it sent: a cursor even if this page is not full.
    assert merge_pages([rooms("a")], more=True, limit=5)["next_cursor"] == "a"
    assert merge_pages([[], []], more=False, limit=5) == {"rooms": [], "next_cursor": None}


def test_request_ids_fit_the_wire_and_are_scoped_per_key_name() -> None:
    longest = idempotency_request_id("backend", "k" * MAX_IDEMPOTENCY_KEY)
    assert len(longest) <= 64  # RequestId's bound on the wire
    assert idempotency_request_id("a", "k") != idempotency_request_id("b", "k")
    assert publish_session(longest) == publish_session(longest)  # a retry: the same records
    sessions = {publish_session(idempotency_request_id("b", str(n))) for n in range(2000)}
    assert len(sessions) == PUBLISH_BUCKETS and all(s.startswith("~api.") for s in sessions)


# --------------------------------------------------------------------------- broker


def table() -> RoomTable:
    counter = itertools.count()
    return RoomTable(
        capacity=3,
        resume_window=30.0,
        history_max_events=100,
        history_max_age=120.0,
        new_epoch=lambda: f"epoch-{next(counter)}",
        confirming=False,
    )


def join(rooms_table: RoomTable, session: str, user: str, room: str = "r1") -> None:
    peer = peer_object(session, user, None, None)
    out = rooms_table.handle(JoinCmd(session, f"c-{session}", "edge-1", 1, 1, room, peer), 0.0)
    assert any(isinstance(e, Reply) and e.ok for _, e in out)


SENDER = encode_json({"session": "~server", "user": "~server", "server": True, "key": "b"})


def publish(req: str | None, data: dict[str, Any], conn: str = "q1", **fields: Any) -> SignalCmd:
    return SignalCmd(
        "~api.1", conn, "edge-1", 1, req, "r1", fields.pop("to", None), SENDER,
        encode_json(data), server=True, **fields,
    )  # fmt: skip


def deliveries(out: list[tuple[str, Any]]) -> list[tuple[list[str], dict[str, Any]]]:
    return [(e.sessions, json.loads(e.payload)) for _, e in out if isinstance(e, Deliver)]


def reply_of(out: list[tuple[str, Any]]) -> Reply:
    (reply,) = [e for _, e in out if isinstance(e, Reply)]
    return reply


def test_a_server_publish_is_a_room_event_from_no_member() -> None:
    rooms_table = table()
    join(rooms_table, "s1", "alice")
    join(rooms_table, "s2", "bob")
    out = rooms_table.handle(publish("k1", {"n": 1}), 1.0)
    ((sessions, frame),) = deliveries(out)
    assert sorted(sessions) == ["s1", "s2"]
    assert frame["type"] == "signal" and frame["data"] == {"n": 1}
    assert frame["from"]["server"] is True
    reply = reply_of(out)
    assert reply.ok and reply.offset == frame["offset"] and reply.epoch == "epoch-0"


def test_a_retried_publish_gets_the_first_answer_and_no_second_event() -> None:
    rooms_table = table()
    join(rooms_table, "s1", "alice")
    first = reply_of(rooms_table.handle(publish("k1", {"n": 1}), 1.0))
    again = rooms_table.handle(publish("k1", {"n": 1}, conn="q2"), 2.0)
    assert deliveries(again) == []
    assert reply_of(again).offset == first.offset and reply_of(again).ok
    # The same key for another publish (other data, another target) is refused.
    for other in (publish("k1", {"n": 2}), publish("k1", {"n": 1}, to_user="alice")):
        refused = rooms_table.handle(other, 3.0)
        assert deliveries(refused) == [] and not reply_of(refused).ok
        assert json.loads(reply_of(refused).payload)["code"] == "bad_request"


def test_publish_to_a_user_reaches_each_of_its_sessions_only() -> None:
    rooms_table = table()
    join(rooms_table, "s1", "alice")
    join(rooms_table, "s2", "bob")
    join(rooms_table, "s3", "bob")
    ((sessions, _frame),) = deliveries(rooms_table.handle(publish(None, {}, to_user="bob"), 1.0))
    assert sorted(sessions) == ["s2", "s3"]
    ((sessions, _frame),) = deliveries(
        rooms_table.handle(publish(None, {}, conn="q2", to="s1"), 1.0)
    )
    assert sessions == ["s1"]
    for conn, target in (("q3", {"to_user": "carol"}), ("q4", {"to": "s9"})):
        refused = reply_of(rooms_table.handle(publish(None, {}, conn=conn, **target), 1.0))
        assert json.loads(refused.payload)["code"] == "unknown_peer"


def test_a_publish_to_a_room_without_members_is_not_found() -> None:
    refused = reply_of(table().handle(publish(None, {}), 1.0))
    assert not refused.ok and json.loads(refused.payload)["code"] == "not_found"


def test_close_is_a_room_closed_event_to_every_member() -> None:
    rooms_table = table()
    join(rooms_table, "s1", "alice")
    join(rooms_table, "s2", "bob")
    out = rooms_table.handle(publish("c1", {"reason": "over"}, close=True), 1.0)
    ((sessions, frame),) = deliveries(out)
    assert sorted(sessions) == ["s1", "s2"]
    assert frame == {"type": "room-closed", "room": "r1", "offset": 3, "reason": "over"}


def test_rooms_pages_and_one_room() -> None:
    rooms_table = table()
    for n in (3, 1, 2):
        join(rooms_table, f"s{n}", "alice", room=f"room-{n}")
    ((_, answer),) = rooms_table.handle(RoomsQuery("edge-1", "q", "", 2), 0.0)
    assert isinstance(answer, ApiAnswer)
    page = json.loads(answer.body)
    assert [r["name"] for r in page["rooms"]] == ["room-1", "room-2"] and page["more"]
    ((_, answer),) = rooms_table.handle(RoomsQuery("edge-1", "q", "room-2", 2), 0.0)
    assert isinstance(answer, ApiAnswer)
    assert [r["name"] for r in json.loads(answer.body)["rooms"]] == ["room-3"]
    ((_, answer),) = rooms_table.handle(RoomQuery("edge-1", "q", "room-3"), 0.0)
    assert isinstance(answer, ApiAnswer)
    assert json.loads(answer.body)["members"] == [
        {"session": "s3", "user": "alice", "meta": {}, "connected": True}
    ]
    ((_, answer),) = rooms_table.handle(RoomQuery("edge-1", "q", "room-9"), 0.0)
    assert isinstance(answer, ApiAnswer) and answer.status == 404


def test_a_broker_lists_and_answers_only_for_rooms_it_owns() -> None:
    rooms_table = table()
    join(rooms_table, "s1", "alice", room="mine")
    join(rooms_table, "s2", "alice", room="theirs")
    rooms_table.owns = lambda room: room == "mine"
    ((_, answer),) = rooms_table.handle(RoomsQuery("edge-1", "q", "", 10), 0.0)
    assert isinstance(answer, ApiAnswer)
    assert [r["name"] for r in json.loads(answer.body)["rooms"]] == ["mine"]
    assert rooms_table.handle(RoomQuery("edge-1", "q", "theirs"), 0.0) == []  # asked again


# --------------------------------------------------------------------------- presence


def test_kick_ends_the_lease_closes_the_connection_and_refuses_the_resume() -> None:
    presence = PresenceTable(resume_window=30.0)
    presence.handle(SessionUp("s1", "alice", "edge-1", "c1.1"), 0.0)
    presence.handle(SessionUp("s2", "alice", "edge-2", "c2.1"), 0.0)
    out = presence.handle(KickCmd("edge-3", "q", "alice", "s1", "bye"), 1.0)
    assert ("edge-1", Kick("s1", "c1.1", "bye")) in out
    (answer,) = [e for target, e in out if target == "edge-3"]
    assert isinstance(answer, ApiAnswer) and json.loads(answer.body)["kicked"] == ["s1"]
    claimed = presence.handle(ClaimCmd("s1", "alice", "edge-2", "c1.2"), 2.0)
    assert [e for _, e in claimed if isinstance(e, ClaimReply)] == [ClaimReply("s1", "c1.2", False)]
    (answer,) = [e for _, e in presence.handle(KickCmd("edge-3", "q", "alice", "s1"), 3.0)]
    assert isinstance(answer, ApiAnswer) and answer.status == 404
    (answer,) = [e for _, e in presence.handle(PresenceQuery("edge-3", "q", "alice"), 4.0)]
    assert isinstance(answer, ApiAnswer)
    assert json.loads(answer.body)["sessions"] == [
        {"session": "s2", "edge": "edge-2", "connected": True}
    ]


def test_presence_answers_only_for_users_it_owns_or_holds() -> None:
    presence = PresenceTable(resume_window=30.0, node_id="p1", owner_of=lambda user: "p2")
    assert presence.handle(PresenceQuery("edge-1", "q", "alice"), 0.0) == []
    assert presence.handle(KickCmd("edge-1", "q", "alice", None), 0.0) == []


async def test_a_verified_key_is_remembered_but_its_expiry_still_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api_keys = keys()
    key = mint_api_key(SECRET, "b", ["publish"], now=NOW, ttl=30)
    header = f"Bearer {key}"
    assert (await api_keys.authenticate(header, NOW)).name == "b"
    verifier = api_keys._verifier

    async def not_again(token: str, now: float) -> dict[str, Any]:
        raise AssertionError("verified again")

    monkeypatch.setattr(verifier, "authenticated_claims", not_again)
    assert (await api_keys.authenticate(header, NOW + 5)).name == "b"  # remembered
    monkeypatch.undo()
    with pytest.raises(Unauthorized, match="expired"):
        await api_keys.authenticate(header, NOW + 60)  # past exp (+ leeway): checked anew


async def test_a_remembered_key_is_verified_again_after_a_while() -> None:
    api_keys = keys()
    key = mint_api_key(SECRET, "b", ["publish"], now=NOW)
    await api_keys.authenticate(f"Bearer {key}", NOW)
    # The signing secret changed (rotation): within REMEMBER_FOR the key still works...
    api_keys._verifier = TokenVerifier(Settings(jwt_secret="rotated-" + SECRET))
    await api_keys.authenticate(f"Bearer {key}", NOW + 1)
    # ... after it, it is checked with the new key store, and refused.
    with pytest.raises(Unauthorized):
        await api_keys.authenticate(f"Bearer {key}", NOW + REMEMBER_FOR + 1)
