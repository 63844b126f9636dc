"""Everything that crosses a socket, defined and encoded in one place.

Two vocabularies live here:

* the **client protocol** (JSON text frames on ``/v1/signal``, see docs/protocol.md):
  ``ClientMessage`` is the tagged union a client may send, decoded and validated by
  ``decode_client``; the ``*Frame`` structs are what the server sends, encoded once by
  ``encode_frame`` and then passed around as bytes;
* the **node envelopes** (msgpack on ZeroMQ between edge, broker and presence):
  ``Envelope`` is their tagged union. The envelopes a node sends one peer in one event
  loop iteration travel together as one frame, ``WIRE_VERSION + msgpack array`` whose
  elements are the envelope bodies (``batch_header``, ``decode_batch``).

Payloads the server only relays (signal ``data``, peer objects) stay raw JSON bytes from
the moment the edge validated them until the receiving edge writes them out, so a
signal is parsed once and encoded once however many hops and recipients it has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Final, Literal, NewType

import msgspec
from msgspec import Meta, Raw, Struct

from signalpost.errors import BadRequest

SessionId = NewType("SessionId", str)
UserId = NewType("UserId", str)
EdgeId = NewType("EdgeId", str)
ConnId = NewType("ConnId", str)

#: Integer ids must fit a signed 64-bit integer: they travel in msgpack envelopes, and
#: that also keeps them within PROTOCOL.md's 64 characters.
INT_ID_MIN: Final = -(2**63)
INT_ID_MAX: Final = 2**63 - 1
RequestId = Annotated[int, Meta(ge=INT_ID_MIN, le=INT_ID_MAX)] | Annotated[str, Meta(max_length=64)]
RoomName = Annotated[str, Meta(min_length=1, max_length=128)]
UserName = Annotated[str, Meta(min_length=1, max_length=256)]
SessionRef = Annotated[str, Meta(min_length=1, max_length=64)]

#: Prefix of every node-to-node frame (``signalpost.transport.frame``):
#: ``WIRE_VERSION + batch_header(n) + body1 + ... + bodyN``, one msgpack array of n encoded
#: envelopes (ROUTER sockets prepend the peer identity frame). SP3: a frame carries a batch
#: (SP2 carried one bare envelope body); a node drops frames of any other version.
WIRE_VERSION: Final = b"SP3"


# --------------------------------------------------------------------------- client -> server


class RoomPosition(Struct, frozen=True):
    """The last event a client saw in a room: where a resume continues from."""

    epoch: str
    offset: int


class _ClientFrame(Struct, tag_field="type", frozen=True, kw_only=True):
    id: RequestId | None = None


class Hello(_ClientFrame, tag="hello", frozen=True):
    token: str
    resume: str | None = None
    rooms: dict[RoomName, RoomPosition] | None = None


class Join(_ClientFrame, tag="join", frozen=True):
    room: RoomName
    meta: dict[str, Any] | None = None


class Leave(_ClientFrame, tag="leave", frozen=True):
    room: RoomName


class Signal(_ClientFrame, tag="signal", frozen=True):
    room: RoomName
    data: Raw
    to: SessionRef | None = None


class Watch(_ClientFrame, tag="watch", frozen=True):
    users: Annotated[list[UserName], Meta(max_length=1000)]


class Unwatch(_ClientFrame, tag="unwatch", frozen=True):
    users: Annotated[list[UserName], Meta(max_length=1000)]


class Ping(_ClientFrame, tag="ping", frozen=True):
    pass


class IceServersRequest(_ClientFrame, tag="ice-servers", frozen=True):
    pass


ClientMessage = Hello | Join | Leave | Signal | Watch | Unwatch | Ping | IceServersRequest

_client_decoder: Final = msgspec.json.Decoder(ClientMessage)
_any_decoder: Final = msgspec.json.Decoder()


def decode_client(frame: bytes | str) -> ClientMessage:
    """Decode and validate one client text frame; raise ``BadRequest`` with the request id."""
    try:
        message: ClientMessage = _client_decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise _bad_request(frame, f"invalid message: {exc}") from None
    except msgspec.DecodeError:
        raise BadRequest("frame is not valid JSON") from None
    except RecursionError:
        # msgspec recurses per level of nesting: a small frame nested ~1,000 deep reaches
        # the interpreter's limit. Refused like any other bad frame.
        raise BadRequest("frame is nested too deeply") from None
    # A Raw value starts at its first byte (msgspec skips the whitespace before it).
    if isinstance(message, Signal) and memoryview(message.data)[:1].tobytes() != b"{":
        raise _bad_request(frame, "signal data must be a JSON object")
    return message


class FrameError(BadRequest):
    """A ``BadRequest`` that remembers the request id it could still read."""

    def __init__(self, message: str, request_id: RequestId | None) -> None:
        super().__init__(message)
        self.request_id = request_id


def _bad_request(frame: bytes | str, message: str) -> FrameError:
    """Build the error, echoing the frame's ``id`` when it is a valid one."""
    request_id: RequestId | None = None
    try:
        parsed = _any_decoder.decode(frame)
    except (msgspec.DecodeError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        candidate = parsed.get("id")
        if isinstance(candidate, bool):
            candidate = None
        if (isinstance(candidate, int) and INT_ID_MIN <= candidate <= INT_ID_MAX) or (
            isinstance(candidate, str) and len(candidate) <= 64
        ):
            request_id = candidate
    return FrameError(message, request_id)


def request_id_of(exc: Exception) -> RequestId | None:
    """The request id an error frame should echo, if the failing frame had one."""
    return exc.request_id if isinstance(exc, FrameError) else None


# --------------------------------------------------------------------------- server -> client


class _ServerFrame(Struct, tag_field="type", omit_defaults=True, kw_only=True):
    pass


class WelcomeFrame(_ServerFrame, tag="welcome"):
    session: str
    user: str
    resume: str
    resumed: bool
    ice_servers: list[dict[str, Any]]
    heartbeat: int
    id: RequestId | None = None


class JoinedFrame(_ServerFrame, tag="joined"):
    room: str
    epoch: str
    offset: int
    members: list[Raw]
    id: RequestId | None = None


class PeerJoinedFrame(_ServerFrame, tag="peer-joined"):
    room: str
    peer: Raw
    offset: int


class LeftFrame(_ServerFrame, tag="left"):
    room: str
    id: RequestId | None = None


class PeerLeftFrame(_ServerFrame, tag="peer-left"):
    room: str
    peer: Raw
    reason: Literal["left", "disconnected", "timeout"]
    offset: int


class SignalFrame(_ServerFrame, tag="signal"):
    room: str
    data: Raw
    offset: int
    # ``from`` is a keyword: encoded under its wire name by ``rename``.
    from_: Raw = msgspec.field(name="from")


class RoomClosedFrame(_ServerFrame, tag="room-closed"):
    """The server API closed the room: the session leaves it (a ``left`` frame follows)."""

    room: str
    offset: int
    reason: str = ""


class AckFrame(_ServerFrame, tag="ack"):
    id: RequestId


class RecoveredFrame(_ServerFrame, tag="recovered"):
    room: str
    recovered: bool
    #: Where the session's stream in the room now stands (absent: not a member).
    epoch: str | None = None
    offset: int | None = None


class WatchingFrame(_ServerFrame, tag="watching"):
    presence: dict[str, str]
    #: Each user's status version (see ``PresenceFrame.version``).
    versions: dict[str, int] = {}
    id: RequestId | None = None


class UnwatchedFrame(_ServerFrame, tag="unwatched"):
    id: RequestId | None = None


class PresenceFrame(_ServerFrame, tag="presence"):
    user: str
    status: Literal["online", "offline"]
    #: The user's status version: higher at every change of the user's status (odd while
    #: online, even while offline), carried with its leases to the node that takes it over;
    #: a frame with the status a client has and a version not above the one it has for
    #: it repeats what the client knows (docs/protocol.md). 0: unknown.
    version: int = 0


class PongFrame(_ServerFrame, tag="pong"):
    id: RequestId | None = None


class IceServersFrame(_ServerFrame, tag="ice-servers"):
    ice_servers: list[dict[str, Any]]
    id: RequestId | None = None


class ErrorFrame(_ServerFrame, tag="error"):
    code: str
    message: str
    id: RequestId | None = None


_json_encoder: Final = msgspec.json.Encoder()


#: Encode a server frame to the JSON bytes written to the socket. The encoder's own method,
#: not a wrapper around it: two or more frames per relayed signal.
encode_frame: Final[Callable[[_ServerFrame], bytes]] = _json_encoder.encode


def encode_json(value: object) -> bytes:
    """Encode any JSON-able value (peer objects, presence maps)."""
    return _json_encoder.encode(value)


def peer_object(session: str, user: str, meta: dict[str, Any] | None, name: str | None) -> bytes:
    """The ``peer``/``members`` object a room shows of a session, encoded once at join."""
    peer: dict[str, Any] = {"session": session, "user": user, "meta": meta or {}}
    if name is not None:
        peer["name"] = name
    return _json_encoder.encode(peer)


def sender_object(session: str, user: str) -> bytes:
    """The server-set ``from`` of a relayed signal."""
    return _json_encoder.encode({"session": session, "user": user})


# --------------------------------------------------------------------------- node envelopes
# Tags are small ints and bodies arrays: these go over ZeroMQ at every hop.


class _Envelope(Struct, tag_field="k", array_like=True, frozen=True):
    pass


class JoinCmd(_Envelope, tag=1, frozen=True):
    """Edge -> room owner: a session asks to join."""

    session: str
    conn: str
    edge: str
    seq: int
    req: RequestId | None
    room: str
    peer: bytes  # peer object JSON, see ``peer_object``
    rseq: int = 0  # see ``SignalCmd``
    rbase: int = 0
    #: Presence's seat ticket for ``conn`` on ``edge`` (``signalpost.tickets``), if the
    #: session resumed onto this edge: what lets a broker move its seat here.
    ticket: bytes = b""


class LeaveCmd(_Envelope, tag=2, frozen=True):
    session: str
    conn: str
    edge: str
    seq: int
    req: RequestId | None
    room: str
    rseq: int = 0  # see ``SignalCmd``
    rbase: int = 0


class SignalCmd(_Envelope, tag=3, frozen=True):
    """Edge -> room owner: relay ``data`` to ``to`` (or to every other member).

    Like ``JoinCmd`` and ``LeaveCmd`` it may carry its place among the connection's
    requests to the room (``rseq``, from 1; 0: unordered) and the lowest ``rseq`` the edge
    has not had answered yet (``rbase``): the owner applies a connection's requests to a
    room in ``rseq`` order, holding one that overtook a request lost on the way until the
    edge resends that one.
    """

    session: str
    conn: str
    edge: str
    seq: int
    req: RequestId | None
    room: str
    to: str | None
    sender: bytes  # ``from`` object JSON, set by the edge from the verified token
    data: bytes
    rseq: int = 0
    rbase: int = 0
    #: A publish of the server API (``edge.server_api``): ``session`` is a pseudo-session
    #: of the API (never a member), allowed because an edge checked the caller's API key;
    #: brokers accept it from edges only (``SENDER_KINDS``). ``to_user``: every member
    #: session of that user; ``close``: the event is ``room-closed`` (docs/server-api.md).
    server: bool = False
    to_user: str | None = None
    close: bool = False


class AttachCmd(_Envelope, tag=4, frozen=True):
    """Edge -> every room owner: a resumed session now lives on ``edge``/``conn``."""

    session: str
    conn: str
    edge: str
    positions: dict[str, RoomPosition]
    ticket: bytes = b""  # see ``JoinCmd``


class DetachCmd(_Envelope, tag=5, frozen=True):
    """Edge -> every room owner: the connection ended (``ended``) or dropped (suspend)."""

    session: str
    conn: str
    edge: str
    ended: bool


class RestoreCmd(_Envelope, tag=6, frozen=True):
    """Edge -> broker: a member re-announced (soft state).

    To the owner after the owner changed or restarted (``replica`` false), and to the
    runner-up in the rendezvous order after every join (``replica`` true), so the broker
    that takes over a room already knows all its members. To the owner it carries the
    position the edge has written to the session (``epoch``/``offset``): the owner replays
    what came after it and answers ``Synced``; the edge resends it until then.
    """

    session: str
    conn: str
    edge: str
    room: str
    peer: bytes
    replica: bool
    epoch: str = ""
    offset: int = 0
    ticket: bytes = b""  # see ``JoinCmd``


class ForgetCmd(_Envelope, tag=7, frozen=True):
    """Edge -> replica broker: the session left the room."""

    session: str
    room: str
    edge: str = ""  # the sending edge (which must hold the session's seat)


class DemoteCmd(_Envelope, tag=8, frozen=True):
    """Edge -> former room owner: another broker owns the room now; keep it passive."""

    room: str


class ReplicatedEvent(Struct, array_like=True, frozen=True):
    """One room event as the owner recorded it."""

    offset: int
    recipients: list[str]
    payload: bytes


class ReplicateCmd(_Envelope, tag=40, frozen=True):
    """Owner broker -> runner-up: events of a room (and the reply that caused them).

    The owner holds the deliveries and the ack until the runner-up answers ``ReplicaAck``:
    whatever a client saw is then known to the broker that takes over the room.
    """

    owner: str  # the owner's identity on the runner-up's ROUTER
    room: str
    epoch: str
    batch: int
    events: list[ReplicatedEvent]
    #: The owner's term for the room: a runner-up refuses a lower one than it knows, and
    #: refuses while it owns the room itself (a deposed owner gets nothing acked).
    term: int = 0
    #: The reply record of the request that caused the events (``reply_key`` "": none).
    reply_session: str = ""
    reply_key: str = ""
    reply_fingerprint: int = 0
    reply_payload: bytes = b""
    reply_ok: bool = False
    reply_epoch: str = ""
    reply_offset: int = 0
    #: With the whole history for a new runner-up: the room's members (a member away from
    #: its edge, in its resume window, is known to no edge that could re-announce it).
    members: list[HandedMember] = []
    #: ... and the reply records of the room's requests (of the events in that history:
    #: the batches that carried them may have gone to an earlier runner-up).
    records: list[HandedRecord] = []


class ReplicaAck(_Envelope, tag=41, frozen=True):
    """Runner-up -> owner: it has batch ``batch`` of the room's events. (Presence nodes
    answer a ``LeaseCopy`` with it too: ``room`` is the session, ``batch`` the copy's
    ``seq``.)

    ``refused``: it does not, because it serves the room itself or knows a newer owner
    (``term``): the sender was deposed and drops what it holds of the room.

    ``replica``: the node that has it. The owner takes an ack only from the node it last
    sent that batch (copy) to: a late ack from a runner-up replaced meanwhile would let
    out events the new runner-up may not have yet. ("": a node of an earlier version,
    which did not name itself; taken as before, so a rolling upgrade does not stall.)
    """

    room: str
    batch: int
    refused: bool = False
    term: int = 0
    replica: str = ""


class Deliver(_Envelope, tag=10, frozen=True):
    """Owner -> edge: write ``payload`` to each listed local session.

    A room event names its ``room`` and ``offset`` and, per delivery stream, ``prev``: the
    offset of the event the owner sent these sessions before this one in the room. The
    edge writes it only if it is new (``offset`` above what it wrote) and nothing is
    missing before it (``prev`` not above what it wrote); see ``edge.delivery``. Presence
    frames have no room.
    """

    sessions: list[str]
    payload: bytes
    room: str = ""
    offset: int = 0
    prev: int = 0
    term: int = 0  # the sending owner's term for the room: an edge drops lower ones
    epoch: str = ""  # the room's epoch: offsets of another epoch are not comparable


class Reply(_Envelope, tag=11, frozen=True):
    """Owner -> edge: the answer to request ``seq`` of ``conn``.

    ``ok`` is false for an ``error`` reply; a ``joined`` reply carries the room's
    ``epoch`` and the ``offset`` the session starts from.
    """

    session: str
    conn: str
    seq: int
    payload: bytes
    ok: bool = False
    epoch: str = ""
    offset: int = 0
    room: str = ""  # a room owner's reply names the room and its term: see ``Deliver``
    term: int = 0
    #: A join or leave answer: whether the session is a member of the room now.
    member: bool = False


class Synced(_Envelope, tag=14, frozen=True):
    """Owner -> edge: a session's delivery stream in ``room`` (re)starts after ``offset``.

    The answer to an ``AttachCmd`` (per room) and to a ``RestoreCmd`` to the owner: what
    came after the edge's position was replayed before it (``recovered``), or could not be
    (``recovered`` false: the client is told). ``peer`` is the session's peer object,
    so an edge that took over a resumed session knows its rooms; empty: the session is not
    a member (a resume named a room it is not in; reported ``recovered: false``).
    """

    session: str
    conn: str
    room: str
    epoch: str
    offset: int
    recovered: bool
    report: bool
    peer: bytes
    term: int = 0


class HandedMember(Struct, array_like=True, frozen=True):
    """A member as a room's owner hands it over."""

    session: str
    peer: bytes
    edge: str
    conn: str
    suspended_for: float  # seconds left of its resume window; -1 while attached
    confirmed: int = -1  # what its edge confirmed of the room; -1: unknown (it syncs anew)


class HandedRecord(Struct, array_like=True, frozen=True):
    """A reply record as a room's owner hands it over."""

    session: str
    key: str
    fingerprint: int
    payload: bytes
    ok: bool
    epoch: str
    offset: int
    age: float  # seconds since it was recorded


class HandoffRequest(_Envelope, tag=42, frozen=True):
    """Broker -> broker: I own ``room`` now; hand it over if you have it."""

    room: str
    requester: str  # the requester's identity on the answering broker's ROUTER
    term: int = 0  # the lowest term the requester's ownership has (a replica keeps it)


class Handoff(_Envelope, tag=43, frozen=True):
    """Broker -> broker: a room's whole state, from the broker that served it until now.

    ``present`` false: the sender has no state of the room to hand over (``retry``: it
    still serves the room in its view of the brokers; ask again). The receiver continues
    the epoch and offsets with a higher term, so nothing a client saw is lost and every
    resume still recovers; with ``history`` false (the sender only had the membership) it
    keeps the members and offsets in a new epoch.
    """

    room: str
    sender: str
    present: bool
    retry: bool = False
    term: int = 0
    epoch: str = ""
    offset: int = 0
    trimmed_through: int = 0
    events: list[ReplicatedEvent] = []
    members: list[HandedMember] = []
    records: list[HandedRecord] = []
    history: bool = True


class Confirm(_Envelope, tag=15, frozen=True):
    """Edge -> room owner: what it has written, per (room, session), cumulatively.

    Each position is ``(room, session, epoch, offset, gap)``; ``gap`` asks for a resend now
    (the edge dropped a delivery that had an earlier one missing before it). A position of
    another epoch than the room's is ignored.
    """

    edge: str
    positions: list[tuple[str, str, str, int, bool]]


class Evict(_Envelope, tag=12, frozen=True):
    """Presence -> edge: ``session`` resumed elsewhere; close this stale connection.

    The edge answers ``Evicted`` once it is closed (or was not there): the resume that
    caused it is welcomed only then (``presence.table``).
    """

    session: str
    conn: str
    user: str = ""  # whose session: the edge sends ``Evicted`` to the user's presence owner


class Evicted(_Envelope, tag=29, frozen=True):
    """Edge -> presence: the connection an ``Evict`` named is closed (or was gone)."""

    session: str
    conn: str
    edge: str


class ClaimReply(_Envelope, tag=13, frozen=True):
    session: str
    conn: str
    live: bool
    #: When live: the users the session watches and their status now, and those whose
    #: status changed since the session was last told (it was away).
    watching: dict[str, Literal["online", "offline"]] = {}
    changed: list[str] = []
    #: The answering node's term (the presence view's number; 0 without Consul): an edge
    #: that read a newer view ignores a grant from a deposed owner.
    term: int = 0
    #: The status version of each user in ``watching`` (``PresenceFrame.version``).
    versions: dict[str, int] = {}
    #: When live: the seat ticket of ``conn`` on the claiming edge (``signalpost.tickets``),
    #: which the edge sends with the commands that move the session's seats to it.
    ticket: bytes = b""


class SessionUp(_Envelope, tag=20, frozen=True):
    session: str
    user: str
    edge: str
    conn: str


class SessionDown(_Envelope, tag=21, frozen=True):
    session: str
    edge: str
    conn: str
    ended: bool


class ClaimCmd(_Envelope, tag=22, frozen=True):
    """Edge -> presence: may ``session`` be resumed (is it connected or suspended)?

    ``fresh``: a new session asks for its lease instead (made by the claim, granted once
    the user's runner-up has its copy). A presence node that predates the field reads a
    resume claim of an unknown session and answers ``live: False``: the edge then
    announces the session with ``SessionUp``, as it did before fresh claims."""

    session: str
    user: str
    edge: str
    conn: str
    fresh: bool = False


class WatchCmd(_Envelope, tag=23, frozen=True):
    session: str
    conn: str
    edge: str
    seq: int
    req: RequestId | None
    users: list[str]


class UnwatchCmd(_Envelope, tag=24, frozen=True):
    session: str
    conn: str
    edge: str
    seq: int
    req: RequestId | None
    users: list[str]


class EdgeSync(_Envelope, tag=25, frozen=True):
    """Edge -> presence after the presence node (re)appears: the edge's soft state."""

    edge: str
    sessions: list[SessionUp]
    watches: dict[str, list[str]]


class StatusSubscribe(_Envelope, tag=26, frozen=True):
    """Presence node -> the presence node that owns ``users``: send ``node`` their status
    now and on every change (``StatusNote``); ``drop``: stop for these users.

    A presence node serves the watches of the sessions it owns; a watched user owned by
    another node reaches it this way (``presence.table``).

    ``region`` (the subscriber's region) set: a subscription from the users' owner in
    another region, to their *regional* status (online while a session holds a lease in
    the owner's region), which that node merges into their global status
    (``presence.regional``).
    """

    node: str  # the subscriber's placement id: its identity on the owner's ROUTER
    users: list[str]
    drop: list[str] = []
    region: str = ""


class StatusNote(_Envelope, tag=27, frozen=True):
    """Owner presence node -> subscriber: the status of users ``owner`` owns.

    ``region`` (the owner's region) set: their regional status, with regional versions
    (odd online, even offline, higher at every change of the user's status in that
    region), to a subscriber in another region (``StatusSubscribe.region``).
    """

    owner: str
    statuses: dict[str, Literal["online", "offline"]]
    versions: dict[str, int] = {}  # user -> status version (``PresenceFrame.version``)
    region: str = ""


class LeaseCopy(_Envelope, tag=28, frozen=True):
    """Owner presence node -> the runner-up of the session's user (its replica), after
    every change of the session's lease or watches; or -> the user's new owner when a view
    moves the user (``handoff``: take it as a lease now).

    The whole state of the session, not the change: copies are idempotent, and the last
    one received is the state. ``suspended_for`` is the time left of the resume window
    when sent (nodes' clocks are not comparable), -1 while connected.

    The receiver answers ``ReplicaAck(session, seq)``: the owner holds what the change
    caused (a claim's grant, status notes) until then. ``seq`` numbers the owner's copies
    (increasing, across its restarts too): a runner-up ignores a copy of a session older
    than the one it holds from the same owner (a resend), and refuses one whose ``term``
    (the owner's presence view number) is below the held copy's (a deposed owner).
    """

    owner: str
    session: str
    user: str
    edge: str = ""
    conn: str = ""
    suspended_for: float = -1.0
    watches: list[str] = []
    told: dict[str, Literal["online", "offline"]] = {}
    gone: bool = False  # the lease ended: drop the copy
    handoff: bool = False
    seq: int = 0
    term: int = 0
    version: int = 0  # the user's status version (``PresenceFrame.version``)


# Server API queries (edge.server_api): an edge asks, the owner answers ``ApiAnswer`` with a
# JSON body, matched by ``qid`` (unique per request of that edge).


class RoomsQuery(_Envelope, tag=60, frozen=True):
    """Edge -> every broker: the rooms it serves named after ``after``, at most ``limit``."""

    edge: str
    qid: str
    after: str
    limit: int


class RoomQuery(_Envelope, tag=61, frozen=True):
    """Edge -> a room's owner: the room and its members."""

    edge: str
    qid: str
    room: str


class PresenceQuery(_Envelope, tag=62, frozen=True):
    """Edge -> the presence owner of ``user``: its status and sessions."""

    edge: str
    qid: str
    user: str


class KickCmd(_Envelope, tag=63, frozen=True):
    """Edge -> the presence owner of ``user``: end ``session`` (all its sessions when
    None): its lease ends (a resume is refused) and the edge holding it closes it."""

    edge: str
    qid: str
    user: str
    session: str | None
    reason: str = ""


class Kick(_Envelope, tag=64, frozen=True):
    """Presence -> edge: close ``session``'s connection ``conn`` with 4410 (kicked)."""

    session: str
    conn: str
    reason: str = ""


class ApiAnswer(_Envelope, tag=65, frozen=True):
    """Broker or presence -> edge: the answer to query ``qid``: an HTTP status, a JSON body."""

    qid: str
    status: int
    body: bytes


class HookRecord(Struct, array_like=True, frozen=True, gc=False):
    """One webhook event (``signalpost.webhooks``): its stream (``room:<name>``,
    ``user:<id>``), idempotency key, type and the JSON body receivers get."""

    stream: str
    key: str
    kind: str
    body: bytes


class HookStream(Struct, array_like=True, frozen=True):
    """A stream's part of a ``HookCopy``: new events, and the key of the last event
    delivered to every URL (``cursor``; "": unchanged)."""

    stream: str
    events: list[HookRecord]
    cursor: str = ""


class HookCopy(_Envelope, tag=50, frozen=True):
    """Owner -> runner-up (brokers, presence nodes): webhook events it made and how far
    each stream is delivered. The owner sends an event to receivers only once the
    runner-up answered ``HookAck``; the runner-up keeps what is not delivered yet and
    delivers it if it takes the streams over."""

    owner: str
    number: int
    streams: list[HookStream]


class HookAck(_Envelope, tag=51, frozen=True):
    """Runner-up -> owner: it keeps ``HookCopy`` ``number``."""

    number: int


class Heartbeat(_Envelope, tag=30, frozen=True):
    """Both ways on every link; ``incarnation`` changes when a node restarts.

    ``peer``: from the dialling side, the incarnation of the node it dials as it last heard
    it ("": none heard yet). A node takes some envelopes (``RouterEndpoint``'s
    ``addressed``: an owner's requests) only from a peer whose last heartbeat named its own
    incarnation or none: what an edge queued for a node that restarted meanwhile is not
    applied before the edge has seen the restart and re-announced what the node forgot.
    """

    node: str
    incarnation: str
    peer: str = ""


Envelope = (
    JoinCmd
    | LeaveCmd
    | SignalCmd
    | AttachCmd
    | DetachCmd
    | RestoreCmd
    | ForgetCmd
    | DemoteCmd
    | ReplicateCmd
    | ReplicaAck
    | HandoffRequest
    | Handoff
    | Deliver
    | Reply
    | Synced
    | Confirm
    | Evict
    | ClaimReply
    | SessionUp
    | SessionDown
    | ClaimCmd
    | WatchCmd
    | UnwatchCmd
    | EdgeSync
    | StatusSubscribe
    | StatusNote
    | LeaseCopy
    | Evicted
    | HookCopy
    | HookAck
    | Heartbeat
    | RoomsQuery
    | RoomQuery
    | PresenceQuery
    | KickCmd
    | Kick
    | ApiAnswer
)


def conn_generation(conn: str) -> int:
    """A connection's place among its session's connections: ``<random>.<generation>``.

    Owners ignore what an older connection of a session says once a newer one spoke
    (a late attach, join or re-announcement must not move the session back to it).
    """
    _, _, generation = conn.rpartition(".")
    return int(generation) if generation.isdigit() else 0


def conn_supersedes(conn: str, than: str, strictly: bool = False) -> bool:
    """Whether ``conn`` may speak for its session over ``than``: the same connection (unless
    ``strictly``) or one of a generation no older (newer, if ``strictly``). The rule every
    owner applies, brokers to members and presence to leases."""
    if conn == than:
        return not strictly
    ours, theirs = conn_generation(conn), conn_generation(than)
    return ours > theirs or (ours == theirs and not strictly)


def request_key(req: RequestId | None, conn: str, seq: int) -> str:
    """What identifies a request within its session for the reply record.

    A client ``id`` names the request on every connection of the session (a resend after
    a resume is the same request); a request without one is known by the connection and
    the edge's sequence number (edge retries reuse both).
    """
    if req is None:
        return f"~{conn}:{seq}"
    if isinstance(req, int):
        return f"i{req}"
    return f"s{req}"


_envelope_encoder: Final = msgspec.msgpack.Encoder()
_envelope_decoder: Final = msgspec.msgpack.Decoder(Envelope)


def encode_envelope(envelope: Envelope) -> bytes:
    """msgpack body of one envelope."""
    return _envelope_encoder.encode(envelope)


def decode_envelope(body: bytes) -> Envelope:
    """Decode and validate one envelope body; raise ``msgspec.DecodeError`` on garbage."""
    envelope: Envelope = _envelope_decoder.decode(body)
    return envelope


# --------------------------------------------------------------------------- envelope batches
# An encoded envelope is one msgpack object, so an array header followed by n encoded
# envelopes is a msgpack array of them: batching joins bytes, it does not re-encode.

_batch_decoder: Final = msgspec.msgpack.Decoder(list[Envelope])
_raw_batch_decoder: Final = msgspec.msgpack.Decoder(list[Raw])


def batch_header(count: int) -> bytes:
    """The msgpack array header for ``count`` elements (fixarray, array 16 or array 32)."""
    if count < 16:
        return bytes((0x90 | count,))
    if count < 0x10000:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def encode_batch(bodies: list[bytes]) -> bytes:
    """One msgpack array of the encoded envelopes ``bodies``, in order."""
    return b"".join([batch_header(len(bodies)), *bodies])


def decode_batch(data: bytes | memoryview) -> list[Envelope]:
    """Decode a whole batch in one call; raise ``msgspec.DecodeError`` if any part is bad."""
    envelopes: list[Envelope] = _batch_decoder.decode(data)
    return envelopes


def decode_batch_each(
    data: bytes | memoryview,
) -> list[Envelope | msgspec.DecodeError | RecursionError]:
    """Decode a batch element by element: the error in place of each bad envelope
    (``RecursionError``: nested too deeply).

    The slow path after ``decode_batch`` failed, so one bad envelope costs only itself.
    Raises ``msgspec.DecodeError`` when ``data`` is not a msgpack array at all.
    """
    decoded: list[Envelope | msgspec.DecodeError | RecursionError] = []
    for element in _raw_batch_decoder.decode(data):
        try:
            decoded.append(_envelope_decoder.decode(element))
        except (msgspec.DecodeError, RecursionError) as exc:
            decoded.append(exc)
    return decoded


#: Envelope type -> its field naming the node that sent it (a routing id on the receiving
#: ROUTER): a node acts only on envelopes whose sender is the node the link authenticated
#: (``signalpost.node.OwnerNode``). ``DemoteCmd`` names no sender (and is ignored).
_SENDER_FIELDS: Final[dict[type, str]] = {
    JoinCmd: "edge",
    LeaveCmd: "edge",
    SignalCmd: "edge",
    AttachCmd: "edge",
    DetachCmd: "edge",
    RestoreCmd: "edge",
    ForgetCmd: "edge",
    Confirm: "edge",
    Evicted: "edge",
    SessionUp: "edge",
    SessionDown: "edge",
    ClaimCmd: "edge",
    WatchCmd: "edge",
    UnwatchCmd: "edge",
    EdgeSync: "edge",
    ReplicateCmd: "owner",
    HandoffRequest: "requester",
    Handoff: "sender",
    StatusSubscribe: "node",
    StatusNote: "owner",
    LeaseCopy: "owner",
    RoomsQuery: "edge",
    RoomQuery: "edge",
    PresenceQuery: "edge",
    KickCmd: "edge",
    HookCopy: "owner",
}


def sender_of(envelope: Envelope) -> str | None:
    """The node ``envelope`` says sent it, or None if it names none."""
    name = _SENDER_FIELDS.get(type(envelope))
    return None if name is None else str(getattr(envelope, name))


#: Who may send what where: tier (the kind of node whose ROUTER receives) -> envelope type
#: -> the kinds of node allowed to send it there. An envelope a tier's table does not list,
#: or from another kind of node, is dropped unread (``signalpost.node.OwnerNode``, counted
#: as ``signalpost_node_frames_dropped_total{what="kind"}``). The kind of the sender is its
#: key's (``signalpost.node_keys``: ZAP's User-Id); ``Heartbeat`` goes both ways on every
#: link and is not listed. Answers that travel back on the dialler's own link (``Deliver``,
#: ``Reply``, ``Synced``, ``ClaimReply``, ``Evict``, ``ReplicaAck``, ``HookAck``,
#: ``StatusNote``, ``ApiAnswer``, ``Kick``) reach a DEALER, which only ever talks to the
#: node its certificate names for the endpoint, of the kind it dialled (``dial_curve``).
_EDGE: Final = frozenset({"edge"})
_BROKER: Final = frozenset({"broker"})
_PRESENCE: Final = frozenset({"presence"})
SENDER_KINDS: Final[dict[str, dict[type, frozenset[str]]]] = {
    "broker": {
        JoinCmd: _EDGE,
        LeaveCmd: _EDGE,
        SignalCmd: _EDGE,
        AttachCmd: _EDGE,
        DetachCmd: _EDGE,
        RestoreCmd: _EDGE,
        ForgetCmd: _EDGE,
        DemoteCmd: _EDGE,
        Confirm: _EDGE,
        ReplicateCmd: _BROKER,
        HandoffRequest: _BROKER,
        Handoff: _BROKER,
        RoomsQuery: _EDGE,
        RoomQuery: _EDGE,
        HookCopy: _BROKER,
    },
    "presence": {
        SessionUp: _EDGE,
        SessionDown: _EDGE,
        ClaimCmd: _EDGE,
        WatchCmd: _EDGE,
        UnwatchCmd: _EDGE,
        EdgeSync: _EDGE,
        Evicted: _EDGE,
        StatusSubscribe: _PRESENCE,
        LeaseCopy: _PRESENCE,
        PresenceQuery: _EDGE,
        KickCmd: _EDGE,
        HookCopy: _PRESENCE,
    },
}

#: Node kind -> the envelopes it applies only from a peer that addressed this run of the
#: node (``Heartbeat.peer``): an owner's requests. One queued for a broker that restarted
#: meanwhile would be refused ``not_in_room`` by the empty broker before the edge has seen
#: the restart and re-announced its members; dropped instead (counted), it is resent by
#: the edge after the re-announcement.
ADDRESSED: Final[dict[str, frozenset[type]]] = {
    "broker": frozenset({JoinCmd, LeaveCmd, SignalCmd}),
}
