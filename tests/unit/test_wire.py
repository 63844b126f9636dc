"""signalpost.wire: client frames in, server frames out, node envelopes both ways."""

from __future__ import annotations

import json
import typing
from typing import Any

import msgspec
import pytest

from signalpost.errors import BadRequest, ErrorCode, ProtocolError
from signalpost.wire import (
    WIRE_VERSION,
    AckFrame,
    ApiAnswer,
    AttachCmd,
    ClaimCmd,
    ClaimReply,
    Confirm,
    Deliver,
    DemoteCmd,
    DetachCmd,
    EdgeSync,
    Envelope,
    ErrorFrame,
    Evict,
    Evicted,
    ForgetCmd,
    HandedMember,
    HandedRecord,
    Handoff,
    HandoffRequest,
    Heartbeat,
    Hello,
    HookAck,
    HookCopy,
    HookRecord,
    HookStream,
    IceServersFrame,
    IceServersRequest,
    Join,
    JoinCmd,
    JoinedFrame,
    Kick,
    KickCmd,
    LeaseCopy,
    Leave,
    LeaveCmd,
    LeftFrame,
    PeerJoinedFrame,
    PeerLeftFrame,
    Ping,
    PongFrame,
    PresenceFrame,
    PresenceQuery,
    RecoveredFrame,
    ReplicaAck,
    ReplicateCmd,
    ReplicatedEvent,
    Reply,
    RestoreCmd,
    RoomPosition,
    RoomQuery,
    RoomsQuery,
    SessionDown,
    SessionUp,
    Signal,
    SignalCmd,
    SignalFrame,
    StatusNote,
    StatusSubscribe,
    Synced,
    Unwatch,
    UnwatchCmd,
    UnwatchedFrame,
    Watch,
    WatchCmd,
    WatchingFrame,
    WelcomeFrame,
    batch_header,
    decode_batch,
    decode_batch_each,
    decode_client,
    decode_envelope,
    encode_batch,
    encode_envelope,
    encode_frame,
    encode_json,
    peer_object,
    request_id_of,
    sender_object,
)

# ---------------------------------------------------------------------- client -> server


def test_decode_hello() -> None:
    message = decode_client('{"type":"hello","token":"jwt"}')
    assert message == Hello(token="jwt")
    assert (message.resume, message.rooms, message.id) == (None, None, None)


def test_decode_hello_with_resume_and_positions() -> None:
    frame = {
        "type": "hello",
        "token": "jwt",
        "resume": "rt",
        "rooms": {"r1": {"epoch": "e", "offset": 17}, "r2": {"epoch": "f", "offset": 0}},
    }
    message = decode_client(json.dumps(frame))
    assert isinstance(message, Hello)
    assert message.resume == "rt"
    assert message.rooms == {"r1": RoomPosition("e", 17), "r2": RoomPosition("f", 0)}


def test_decode_join() -> None:
    message = decode_client('{"type":"join","id":1,"room":"r1","meta":{"a":[1,{"b":null}]}}')
    assert message == Join(id=1, room="r1", meta={"a": [1, {"b": None}]})
    assert decode_client('{"type":"join","room":"r1"}') == Join(room="r1")


def test_decode_leave() -> None:
    assert decode_client('{"type":"leave","id":2,"room":"r1"}') == Leave(id=2, room="r1")


def test_decode_signal_keeps_data_raw() -> None:
    raw = '{"type":"signal","id":3,"room":"r1","to":"s2","data":{"sdp":"v=0\\r\\n","n":1.50}}'
    message = decode_client(raw)
    assert isinstance(message, Signal)
    assert (message.id, message.room, message.to) == (3, "r1", "s2")
    # Relayed as the client wrote it: parsed once, never re-encoded.
    assert bytes(message.data) == b'{"sdp":"v=0\\r\\n","n":1.50}'


def test_decode_signal_without_to_is_for_everyone() -> None:
    message = decode_client(b'{"type":"signal","room":"r1","data":{}}')
    assert isinstance(message, Signal)
    assert message.to is None
    assert message.id is None


def test_decode_watch_and_unwatch() -> None:
    assert decode_client('{"type":"watch","id":4,"users":["eve","bob"]}') == Watch(
        id=4, users=["eve", "bob"]
    )
    assert decode_client('{"type":"unwatch","id":5,"users":["eve"]}') == Unwatch(
        id=5, users=["eve"]
    )


def test_decode_ping_and_ice_servers() -> None:
    assert decode_client('{"type":"ping","id":6}') == Ping(id=6)
    assert decode_client('{"type":"ice-servers","id":7}') == IceServersRequest(id=7)


def test_decode_accepts_str_and_bytes() -> None:
    assert decode_client('{"type":"ping"}') == decode_client(b'{"type":"ping"}') == Ping()


def test_fields_added_by_newer_clients_are_tolerated() -> None:
    # PROTOCOL.md: message types and fields may be added; an older server ignores them.
    assert decode_client('{"type":"ping","id":1,"trace":"abc"}') == Ping(id=1)


@pytest.mark.parametrize("request_id", [0, -1, 2**53, "", "a", "x" * 64, "\u00e9" * 64])
def test_valid_request_ids(request_id: Any) -> None:
    message = decode_client(json.dumps({"type": "ping", "id": request_id}))
    assert message.id == request_id
    assert type(message.id) is type(request_id)


def _bad(frame: str | bytes) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        decode_client(frame)
    exc = info.value
    assert isinstance(exc, ProtocolError)
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.close_code is None  # a bad frame does not end the connection
    assert exc.message
    return exc


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param("", id="empty"),
        pytest.param("{", id="truncated"),
        pytest.param("hello", id="text"),
        pytest.param(b"\xff\xfe\x00", id="not-utf8"),
        pytest.param('{"type":"ping"} {"type":"ping"}', id="two-objects"),
    ],
)
def test_not_json_is_bad_request(frame: str | bytes) -> None:
    assert request_id_of(_bad(frame)) is None


@pytest.mark.parametrize("frame", ["[]", '[{"type":"ping"}]', '"ping"', "42", "null", "true"])
def test_not_an_object_is_bad_request(frame: str) -> None:
    _bad(frame)


@pytest.mark.parametrize(
    "frame",
    [
        '{"id":1}',
        '{"type":"pong","id":1}',
        '{"type":"welcome","id":1}',
        '{"type":"PING","id":1}',
        '{"type":5,"id":1}',
        '{"type":null,"id":1}',
    ],
)
def test_unknown_or_missing_type_is_bad_request(frame: str) -> None:
    exc = _bad(frame)
    assert request_id_of(exc) == 1


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"hello","id":"m"}',
        '{"type":"join","id":"m"}',
        '{"type":"leave","id":"m"}',
        '{"type":"signal","id":"m","room":"r"}',
        '{"type":"signal","id":"m","data":{}}',
        '{"type":"watch","id":"m"}',
        '{"type":"unwatch","id":"m"}',
        '{"type":"hello","id":"m","token":"t","rooms":{"r":{"epoch":"e"}}}',
    ],
)
def test_missing_fields_are_bad_request(frame: str) -> None:
    assert request_id_of(_bad(frame)) == "m"


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"hello","id":9,"token":1}',
        '{"type":"hello","id":9,"token":"t","resume":5}',
        '{"type":"hello","id":9,"token":"t","rooms":[]}',
        '{"type":"hello","id":9,"token":"t","rooms":{"r":{"epoch":"e","offset":"17"}}}',
        '{"type":"join","id":9,"room":5}',
        '{"type":"join","id":9,"room":""}',
        '{"type":"join","id":9,"room":"r","meta":[]}',
        '{"type":"join","id":9,"room":"r","meta":"x"}',
        '{"type":"leave","id":9,"room":["r"]}',
        '{"type":"signal","id":9,"room":"r","to":5,"data":{}}',
        '{"type":"signal","id":9,"room":"r","to":"","data":{}}',
        '{"type":"watch","id":9,"users":"eve"}',
        '{"type":"watch","id":9,"users":[1]}',
        '{"type":"watch","id":9,"users":[""]}',
        '{"type":"unwatch","id":9,"users":{"eve":1}}',
    ],
)
def test_wrong_field_types_are_bad_request(frame: str) -> None:
    assert request_id_of(_bad(frame)) == 9


def test_signal_data_may_follow_whitespace() -> None:
    message = decode_client('{"type":"signal","room":"r","data": \n\t {"sdp":"x"} }')
    assert isinstance(message, Signal)
    assert bytes(message.data) == b'{"sdp":"x"}'


@pytest.mark.parametrize("data", ["[]", "[{}]", '"offer"', "1", "null", "true", " [1]", '"{}"'])
def test_signal_data_must_be_an_object(data: str) -> None:
    exc = _bad('{"type":"signal","id":"d","room":"r","data":' + data + "}")
    assert request_id_of(exc) == "d"


@pytest.mark.parametrize(
    "request_id",
    [
        pytest.param("x" * 65, id="str-65"),
        pytest.param("\u00e9" * 65, id="str-65-non-ascii"),
        pytest.param(True, id="bool"),
        pytest.param(False, id="false"),
        pytest.param(1.5, id="float"),
        pytest.param(1.0, id="float-integral"),
        pytest.param({}, id="object"),
        pytest.param([1], id="array"),
    ],
)
def test_bad_ids_are_bad_request_and_not_echoed(request_id: Any) -> None:
    exc = _bad(json.dumps({"type": "ping", "id": request_id}))
    assert request_id_of(exc) is None


def test_an_integer_id_longer_than_64_characters_is_bad_request() -> None:
    _bad('{"type":"ping","id":' + "9" * 65 + "}")


@pytest.mark.parametrize("request_id", [2**64, -(2**63) - 1, 10**30])
def test_every_accepted_id_can_travel_in_a_command_envelope(request_id: int) -> None:
    try:
        message = decode_client(json.dumps({"type": "leave", "id": request_id, "room": "r"}))
    except BadRequest:
        return  # refusing it is fine too
    command = LeaveCmd("s", "c", "e", 1, message.id, "r")
    decoded = decode_envelope(encode_envelope(command))
    assert isinstance(decoded, LeaveCmd)
    assert decoded.req == request_id


def test_request_id_of_echoes_a_valid_id_from_a_bad_frame() -> None:
    exc = _bad('{"type":"join","id":"abc","room":7}')
    assert request_id_of(exc) == "abc"
    assert request_id_of(_bad('{"type":"join","id":12,"room":7}')) == 12
    assert request_id_of(_bad('{"type":"join","id":0,"room":7}')) == 0


def test_request_id_of_other_errors_is_none() -> None:
    assert request_id_of(ValueError("x")) is None
    assert request_id_of(BadRequest("x")) is None


# ---------------------------------------------------------------------- server -> client


def test_signal_frame_encodes_from_not_from_() -> None:
    frame = SignalFrame(
        room="r1",
        data=msgspec.Raw(b'{"sdp":"x"}'),
        offset=3,
        from_=msgspec.Raw(sender_object("s1", "alice")),
    )
    encoded = encode_frame(frame)
    assert b"from_" not in encoded
    assert json.loads(encoded) == {
        "type": "signal",
        "room": "r1",
        "from": {"session": "s1", "user": "alice"},
        "data": {"sdp": "x"},
        "offset": 3,
    }


@pytest.mark.parametrize(
    "make",
    [
        lambda i: JoinedFrame(room="r", epoch="e", offset=1, members=[], id=i),
        lambda i: LeftFrame(room="r", id=i),
        lambda i: WatchingFrame(presence={"eve": "online"}, id=i),
        lambda i: UnwatchedFrame(id=i),
        lambda i: PongFrame(id=i),
        lambda i: IceServersFrame(ice_servers=[{"urls": ["stun:x"]}], id=i),
        lambda i: ErrorFrame(code="bad_request", message="m", id=i),
        lambda i: WelcomeFrame(
            session="s", user="u", resume="r", resumed=False, ice_servers=[], heartbeat=25, id=i
        ),
    ],
)
def test_reply_frames_omit_id_when_none_and_echo_it_otherwise(make: Any) -> None:
    assert "id" not in json.loads(encode_frame(make(None)))
    assert json.loads(encode_frame(make(7)))["id"] == 7
    assert json.loads(encode_frame(make("seven")))["id"] == "seven"
    assert json.loads(encode_frame(make(0)))["id"] == 0


def test_server_frames_have_the_protocol_shapes() -> None:
    peer = msgspec.Raw(peer_object("s1", "alice", {"k": 1}, None))
    assert json.loads(encode_frame(AckFrame(id=3))) == {"type": "ack", "id": 3}
    assert json.loads(encode_frame(PeerJoinedFrame(room="r", peer=peer, offset=4))) == {
        "type": "peer-joined",
        "room": "r",
        "peer": {"session": "s1", "user": "alice", "meta": {"k": 1}},
        "offset": 4,
    }
    left = PeerLeftFrame(room="r", peer=peer, reason="timeout", offset=5)
    assert json.loads(encode_frame(left))["reason"] == "timeout"
    assert json.loads(encode_frame(RecoveredFrame(room="r", recovered=False))) == {
        "type": "recovered",
        "room": "r",
        "recovered": False,  # a default-looking False is still sent
    }
    welcome = json.loads(
        encode_frame(
            WelcomeFrame(
                session="s", user="u", resume="t", resumed=False, ice_servers=[], heartbeat=25
            )
        )
    )
    assert welcome == {
        "type": "welcome",
        "session": "s",
        "user": "u",
        "resume": "t",
        "resumed": False,
        "ice_servers": [],
        "heartbeat": 25,
    }
    assert json.loads(encode_frame(PresenceFrame(user="eve", status="offline"))) == {
        "type": "presence",
        "user": "eve",
        "status": "offline",
    }


def test_peer_and_sender_objects() -> None:
    assert json.loads(peer_object("s", "u", None, None)) == {
        "session": "s",
        "user": "u",
        "meta": {},
    }
    assert json.loads(peer_object("s", "u", {"a": 1}, "Ann")) == {
        "session": "s",
        "user": "u",
        "meta": {"a": 1},
        "name": "Ann",
    }
    assert json.loads(sender_object("s", "u")) == {"session": "s", "user": "u"}
    assert json.loads(encode_json({"x": [1, "y"]})) == {"x": [1, "y"]}


# --------------------------------------------------------------------------- envelopes

_PEER = peer_object("s1", "alice", None, None)

ENVELOPES: list[Envelope] = [
    JoinCmd("s1", "c1", "edge-1", 1, 1, "r1", _PEER),
    JoinCmd("s1", "c1", "edge-1", 2, None, "r1", _PEER),
    JoinCmd("s1", "c1", "edge-1", 3, "req-\u00e9", "r1", _PEER),
    LeaveCmd("s1", "c1", "edge-1", 4, 4, "r1"),
    SignalCmd("s1", "c1", "edge-1", 5, 5, "r1", "s2", b'{"session":"s1"}', b'{"a":1}'),
    SignalCmd("s1", "c1", "edge-1", 6, None, "r1", None, b"{}", b"{}"),
    AttachCmd("s1", "c2", "edge-2", {"r1": RoomPosition("e", 17), "r2": RoomPosition("f", 0)}),
    AttachCmd("s1", "c2", "edge-2", {}),
    DetachCmd("s1", "c1", "edge-1", True),
    DetachCmd("s1", "c1", "edge-1", False),
    RestoreCmd("s1", "c1", "edge-1", "r1", _PEER, True),
    RestoreCmd("s1", "c1", "edge-1", "r1", _PEER, False, "e", 12),
    ForgetCmd("s1", "r1"),
    DemoteCmd("r1"),
    ReplicateCmd(
        "broker-a",
        "r1",
        "e",
        3,
        [ReplicatedEvent(7, ["s1", "s2"], b'{"type":"signal"}')],
        1764680000000,
        "s1",
        "i5",
        1,
        b'{"type":"ack","id":5}',
    ),
    ReplicateCmd("broker-a", "r1", "e", 4, []),
    ReplicaAck("r1", 3),
    HandoffRequest("r1", "broker-b"),
    Handoff("r1", "broker-a", False, retry=True),
    Handoff(
        "r1",
        "broker-a",
        True,
        term=5,
        epoch="e",
        offset=9,
        trimmed_through=2,
        events=[ReplicatedEvent(9, ["s1"], b'{"type":"signal"}')],
        members=[HandedMember("s1", _PEER, "edge-1", "c1", -1.0)],
        records=[HandedRecord("s1", "r1\x00i5", 77, b'{"type":"ack","id":5}', True, "", 0, 1.5)],
    ),
    Deliver(["s1", "s2"], b'{"type":"signal"}', "r1", 5, 3),
    Deliver(["s1"], b'{"type":"recovered"}'),
    Reply("s1", "c1", 1, b'{"type":"joined"}', True, "e", 4),
    Reply("s1", "c1", 2, b""),
    Synced("s1", "c1", "r1", "e", 9, True, False, _PEER),
    Confirm("edge-1", [("r1", "s1", "e", 9, False), ("r2", "s1", "f", 3, True)]),
    Evict("s1", "c1"),
    Evict("s1", "c1", "alice"),
    Evicted("s1", "c1", "edge-1"),
    ClaimReply("s1", "c2", True),
    ClaimReply("s1", "c2", True, {"eve": "online"}, ["eve"], 7),
    SessionUp("s1", "alice", "edge-1", "c1"),
    SessionDown("s1", "edge-1", "c1", False),
    ClaimCmd("s1", "alice", "edge-2", "c2"),
    WatchCmd("s1", "c1", "edge-1", 7, 7, ["eve", "bob"]),
    UnwatchCmd("s1", "c1", "edge-1", 8, "u", ["eve"]),
    EdgeSync("edge-1", [SessionUp("s1", "alice", "edge-1", "c1")], {"s1": ["eve"]}),
    StatusSubscribe("tcp://p1:5565", ["bob"], ["eve"]),
    StatusNote("tcp://p2:5565", {"bob": "online"}),
    LeaseCopy("tcp://p2:5565", "s1", "bob", "edge-1", "c1.2", 12.5, ["eve"], {"eve": "online"}),
    HookCopy(
        "tcp://b1:5555",
        3,
        [HookStream("room:r1", [HookRecord("room:r1", "room:r1:e:1", "peer.joined", b"{}")], "k")],
    ),
    HookAck(3),
    Heartbeat("broker-a", "inc-1"),
    SignalCmd(
        "~api.7", "q1", "edge-1", 1, "0badc0de:k1", "r1", None, b"{}", b"{}", 0, 0, True, "bob"
    ),
    SignalCmd("~api.7", "q2", "edge-1", 1, None, "r1", None, b"{}", b"{}", close=True, server=True),
    RoomsQuery("edge-1", "q3", "room-9", 100),
    RoomQuery("edge-1", "q4", "r1"),
    PresenceQuery("edge-1", "q5", "alice"),
    KickCmd("edge-1", "q6", "alice", "s1", "bye"),
    KickCmd("edge-1", "q7", "alice", None),
    Kick("s1", "c1", "bye"),
    ApiAnswer("q3", 200, b'{"rooms":[],"more":false}'),
]


@pytest.mark.parametrize("envelope", ENVELOPES, ids=lambda e: type(e).__name__)
def test_envelopes_round_trip(envelope: Envelope) -> None:
    body = encode_envelope(envelope)
    assert isinstance(body, bytes)
    decoded = decode_envelope(body)
    assert type(decoded) is type(envelope)
    assert decoded == envelope


def test_every_envelope_kind_is_covered_and_tags_are_distinct() -> None:
    kinds = {type(e) for e in ENVELOPES}
    assert kinds == set(typing.get_args(Envelope))  # every member of the Envelope union
    tags = {msgspec.msgpack.decode(encode_envelope(e))[0] for e in ENVELOPES}
    assert len(tags) == len(kinds)


@pytest.mark.parametrize(
    "body",
    [b"", b"\xc1", b"\x93\x01\x02\x03", msgspec.msgpack.encode([99, "x"]), b"not msgpack"],
)
def test_garbage_envelopes_raise_decode_error(body: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_envelope(body)


def test_a_client_frame_is_not_an_envelope() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_envelope(msgspec.msgpack.encode({"type": "ping"}))


def test_wire_version_is_bytes() -> None:
    assert isinstance(WIRE_VERSION, bytes) and WIRE_VERSION


@pytest.mark.parametrize("count", [0, 1, 15, 16, 65535, 65536])
def test_batch_header_makes_a_msgpack_array_at_each_size_boundary(count: int) -> None:
    # fixarray up to 15, array 16 up to 65535, array 32 beyond; 0x01 is the msgpack int 1.
    data = batch_header(count) + b"\x01" * count
    assert data.startswith(msgspec.msgpack.encode([1] * count)[:5])
    assert msgspec.msgpack.decode(data) == [1] * count


def test_a_batch_is_a_msgpack_array_of_the_envelope_bodies() -> None:
    bodies = [encode_envelope(e) for e in ENVELOPES]
    batch = encode_batch(bodies)
    assert batch == msgspec.msgpack.encode([msgspec.Raw(b) for b in bodies])
    assert decode_batch(batch) == ENVELOPES
    assert decode_batch(memoryview(b"xx" + batch)[2:]) == ENVELOPES
    assert decode_batch(encode_batch([])) == []


def test_one_bad_envelope_fails_the_batch_but_not_its_neighbours() -> None:
    good: list[Envelope] = [Heartbeat("n", "i"), ForgetCmd("s", "r"), DemoteCmd("r")]
    bad = msgspec.msgpack.encode([99, "x"])  # msgpack, but no envelope
    batch = encode_batch([encode_envelope(good[0]), bad, *map(encode_envelope, good[1:])])
    with pytest.raises(msgspec.DecodeError):
        decode_batch(batch)
    decoded = decode_batch_each(batch)
    assert isinstance(decoded[1], msgspec.DecodeError)
    assert [decoded[0], *decoded[2:]] == good


@pytest.mark.parametrize("data", [b"", b"\x93\x01", b"\xc1", encode_envelope(DemoteCmd("r"))[:-1]])
def test_a_batch_that_is_not_a_msgpack_array_raises_decode_error(data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_batch(data)
    with pytest.raises(msgspec.DecodeError):
        decode_batch_each(data)


@pytest.mark.parametrize("request_id", [2**63 - 1, -(2**63), 0, "x" * 64])
def test_ids_at_the_limits_are_accepted_and_travel(request_id: int | str) -> None:
    message = decode_client(json.dumps({"type": "leave", "id": request_id, "room": "r"}))
    assert message.id == request_id
    decoded = decode_envelope(encode_envelope(LeaveCmd("s", "c", "e", 1, message.id, "r")))
    assert isinstance(decoded, LeaveCmd) and decoded.req == request_id


@pytest.mark.parametrize("request_id", [2**63, -(2**63) - 1, int("9" * 65)])
def test_ids_past_the_limits_are_bad_request(request_id: int) -> None:
    exc = _bad(json.dumps({"type": "ping", "id": request_id}))
    assert request_id_of(exc) is None


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"ping","id":1,"extra":' + "[" * 1000 + "]" * 1000 + "}",
        '{"type":"hello","token":' + "[" * 1000 + "]" * 1000 + "}",
        '{"type":"signal","id":1,"room":"r","data":{"a":'
        + '{"a":' * 1000
        + "1"
        + "}" * 1000
        + "}}",
    ],
)
def test_a_frame_nested_too_deeply_is_a_bad_request(frame: str) -> None:
    # (A field of another type is refused at its first level; the untyped read for the
    # request id of such a refusal must not recurse out either.)
    with pytest.raises(BadRequest):
        decode_client(frame)


def test_a_node_frame_nested_too_deeply_is_dropped_and_counted() -> None:
    from signalpost import metrics
    from signalpost.transport import decode_frame

    deep = b"\x91" * 100_000 + b"\xc0"  # one msgpack element nested 100,000 deep
    batch = encode_batch([encode_envelope(ForgetCmd("s", "r")), deep])
    before = metrics.NODE_FRAMES_DROPPED.labels("frame")._value.get()
    assert decode_frame(batch, "peer") == []
    assert metrics.NODE_FRAMES_DROPPED.labels("frame")._value.get() == before + 1


def test_every_envelope_an_edge_sends_names_it_as_its_sender() -> None:
    # A node acts only on envelopes whose sender is the link's (``OwnerNode``): a new
    # envelope type carrying an ``edge`` must be in the sender map, or it goes unchecked.
    from typing import get_args

    from signalpost.wire import _SENDER_FIELDS, Envelope, LeaseCopy

    with_edge = {t for t in get_args(Envelope) if "edge" in t.__struct_fields__}
    assert with_edge - {LeaseCopy} == {t for t, f in _SENDER_FIELDS.items() if f == "edge"}
    assert _SENDER_FIELDS[LeaseCopy] == "owner"  # a copy names the session's edge, not its sender


def test_every_envelope_has_the_kinds_that_may_send_it_or_travels_back_on_a_dealer() -> None:
    # A ROUTER drops an envelope type its tier's table does not list: a new type must be
    # placed, or it is refused from everyone (and an edge's commands only from edges).
    from typing import get_args

    from signalpost.wire import (
        _SENDER_FIELDS,
        SENDER_KINDS,
        ApiAnswer,
        ClaimReply,
        Deliver,
        Envelope,
        Evict,
        Heartbeat,
        HookAck,
        Kick,
        ReplicaAck,
        Reply,
        StatusNote,
        Synced,
    )

    answers = {
        Deliver, Reply, Synced, ClaimReply, Evict, ReplicaAck, StatusNote, HookAck, Heartbeat,
    }  # fmt: skip
    answers |= {ApiAnswer, Kick}  # the server API's (edge/server_api.py)
    listed = {t for table in SENDER_KINDS.values() for t in table}
    assert listed | answers == set(get_args(Envelope)) and not listed & answers
    for table in SENDER_KINDS.values():
        for envelope_type, kinds in table.items():
            if _SENDER_FIELDS.get(envelope_type) == "edge":
                assert kinds == {"edge"}, envelope_type
            else:
                assert "edge" not in kinds or envelope_type.__name__ in ("ForgetCmd", "DemoteCmd")
