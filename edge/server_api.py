"""The server API: ``/v1/api/`` on every edge's HTTP port (docs/server-api.md).

An app's own servers list rooms, read a room and its members, read users' presence,
publish into rooms, kick sessions, close rooms and mint client tokens, over HTTP/1.1 with
JSON in and out, authenticated by API keys (``signalpost.api_keys``). Errors carry the
client protocol's codes (``signalpost.errors``) with an HTTP status (``STATUS``).

How each request is served, so that it has the guarantees of client signals:

* **publish** and **close** are a ``SignalCmd`` from a pseudo-session of the API (``server``
  set), sent to the room's owner like a member's signal: one numbered event of the room,
  ordered with the members' signals, kept in its history, replicated to the runner-up
  before it is released, replayed on resume, delivered exactly once by the delivery
  streams. The idempotency key is the request id: the owner's reply records (replicated
  with the event) answer a retried publish with the first one's answer instead of applying
  it again, also after the owner was killed and its runner-up took the room over.
* **list rooms** asks every broker of the view (``RoomsQuery``) for its rooms after the
  cursor, and merges the pages by name: the cursor is the last name, stable across
  pages while rooms move between brokers.
* **room**, **presence**, **kick** ask the owner (room owner, or the user's presence
  owner), resent every ``RESEND`` until ``api_timeout``; no answer by then: 503
  ``unavailable`` (the caller retries; a publish with the same idempotency key is applied
  once).

The HTTP shell (``ApiConnection``) takes a connection over from its ``WebSocketLink`` when
the request is not a WebSocket handshake or page (``WebSocketLink`` hands over any request
that is not a ``GET``, and ``GET /v1/api/...``), parses with h11, bounds the head
(``MAX_HEAD``) and the body (``api_max_body``: 413), serves one request at a time per
connection (keep-alive), and closes a connection idle for ``IDLE_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import secrets
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from signalpost import metrics
from signalpost.api_keys import ApiKey, ApiKeys
from signalpost.auth import mint_token
from signalpost.errors import (
    BadRequest,
    CloseCode,
    ErrorCode,
    NotFound,
    ProtocolError,
    RateLimited,
    TooLarge,
    Unavailable,
)
from signalpost.wire import (
    ApiAnswer,
    Envelope,
    Kick,
    KickCmd,
    LeaveCmd,
    PresenceQuery,
    Reply,
    RoomQuery,
    RoomsQuery,
    SignalCmd,
    encode_json,
)

if TYPE_CHECKING:
    from edge.server import ClientConnection, EdgeServer
    from edge.websocket_link import WebSocketLink

log = logging.getLogger("signalpost.api")
_T = TypeVar("_T")

API_PREFIX: Final = "/v1/api/"
OPENAPI_PATH: Final = "/v1/api/openapi.json"

#: HTTP status of each error code.
STATUS: Final[dict[str, int]] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.NOT_IN_ROOM: 404,
    ErrorCode.UNKNOWN_PEER: 404,
    ErrorCode.ROOM_FULL: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}

#: How often an unanswered query or publish is sent again (to the owner known then).
RESEND: Final = 0.5
#: Largest request head (request line and headers), bytes.
MAX_HEAD: Final = 16 * 1024
#: Seconds an API connection may stay idle (between requests, or mid-request) before it
#: is closed.
IDLE_TIMEOUT: Final = 30.0
#: Users one presence request may name.
MAX_PRESENCE_USERS: Final = 100
#: Longest idempotency key (the request id is ``<key hash>:<idempotency key>``, 64 at most).
MAX_IDEMPOTENCY_KEY: Final = 48
#: Pseudo-sessions publishes are spread over (each keeps ``REPLY_RECORDS_PER_SESSION``
#: reply records at its owner): the idempotency window is 120 s or the last 1024 keyed
#: publishes of a bucket, whichever is shorter (docs/server-api.md).
PUBLISH_BUCKETS: Final = 256
#: ``from`` session and user of a server-published signal (with ``server: true``).
SERVER_SENDER: Final = "~server"
#: Longest client token lifetime the API mints (seconds).
MAX_TOKEN_TTL: Final = 7 * 86400
#: Rooms per page: default and most.
DEFAULT_PAGE: Final = 100
MAX_PAGE: Final = 1000

RoomName = Annotated[str, Meta(min_length=1, max_length=128)]
UserName = Annotated[str, Meta(min_length=1, max_length=256)]
SessionRef = Annotated[str, Meta(min_length=1, max_length=64)]
IdempotencyKey = Annotated[str, Meta(min_length=1, max_length=MAX_IDEMPOTENCY_KEY)]
Reason = Annotated[str, Meta(max_length=256)]


# Optional fields are absent or valid, never null (``UNSET``): what the OpenAPI document says.


class PublishBody(Struct, forbid_unknown_fields=True):
    data: dict[str, Any]
    to: SessionRef | UnsetType = UNSET
    to_user: UserName | UnsetType = UNSET
    idempotency_key: IdempotencyKey | UnsetType = UNSET


class CloseBody(Struct, forbid_unknown_fields=True):
    reason: Reason = ""
    idempotency_key: IdempotencyKey | UnsetType = UNSET


class KickBody(Struct, forbid_unknown_fields=True):
    user: UserName
    session: SessionRef | UnsetType = UNSET
    reason: Reason = ""


class TokenBody(Struct, forbid_unknown_fields=True):
    user: UserName
    ttl: Annotated[int, Meta(ge=1, le=MAX_TOKEN_TTL)] = 3600
    rooms: Annotated[list[RoomName], Meta(max_length=100)] | UnsetType = UNSET
    name: Annotated[str, Meta(min_length=1, max_length=256)] | UnsetType = UNSET
    home: Annotated[str, Meta(min_length=1, max_length=64)] | UnsetType = UNSET


def _given(value: _T | UnsetType) -> _T | None:
    return None if isinstance(value, UnsetType) else value


@dataclass(slots=True)
class ApiRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class ApiResponse:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def error_response(exc: ProtocolError) -> ApiResponse:
    """The JSON error of ``exc``: ``{"code", "message"}`` with the code's HTTP status."""
    status = STATUS.get(exc.code, 500)
    headers: tuple[tuple[str, str], ...] = ()
    if status == 401:
        headers = (("WWW-Authenticate", 'Bearer realm="signalpost"'),)
    elif status in (429, 503):
        headers = (("Retry-After", "1"),)
    return ApiResponse(status, encode_json({"code": exc.code, "message": exc.message}), headers)


def _decode(body: bytes, kind: type[_T]) -> _T:
    if not body.strip():
        body = b"{}"
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid body: {exc}") from None
    except msgspec.DecodeError:
        raise BadRequest("body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("body is nested too deeply") from None


# --------------------------------------------------------------------------- pages


def merge_pages(pages: list[list[dict[str, Any]]], more: bool, limit: int) -> dict[str, Any]:
    """One page of rooms from every broker's page (each sorted by name, each the first
    ``limit`` of that broker after the cursor): the first ``limit`` names of all of them,
    each once (a room that moved between two brokers' answers may be in both), and the
    cursor after the last if any broker had more or more are left."""
    seen: set[str] = set()
    rooms: list[dict[str, Any]] = []
    merged = heapq.merge(*pages, key=lambda room: str(room["name"]))
    left_over = False
    for room in merged:
        name = str(room["name"])
        if name in seen:
            continue
        if len(rooms) == limit:
            left_over = True
            break
        seen.add(name)
        rooms.append(room)
    has_more = (more or left_over) and bool(rooms)
    return {"rooms": rooms, "next_cursor": rooms[-1]["name"] if has_more else None}


def idempotency_request_id(key_name: str, idempotency_key: str) -> str:
    """The request id of a keyed publish: idempotency keys are scoped per API key name."""
    return f"{zlib.crc32(key_name.encode()):08x}:{idempotency_key}"


def publish_session(request_id: str | None) -> str:
    """The API pseudo-session a publish is sent from (its reply records' bucket)."""
    if request_id is None:
        bucket = secrets.randbelow(PUBLISH_BUCKETS)
    else:
        bucket = zlib.crc32(request_id.encode()) % PUBLISH_BUCKETS
    return f"~api.{bucket}"


# --------------------------------------------------------------------------- the API


class ServerApi:
    """Routes API requests and matches the owners' answers to them."""

    def __init__(self, server: EdgeServer, keys: ApiKeys) -> None:
        self.server = server
        self.settings = server.settings
        self.keys = keys
        self._pending: dict[str, asyncio.Future[ApiAnswer | Reply]] = {}
        self._sender_of: dict[str, bytes] = {}
        self._openapi: bytes | None = None
        self.connections: set[ApiConnection] = set()

    # ----------------------------------------------------------------- from the edge

    def connection(self, link: WebSocketLink, head: bytes) -> ApiConnection:
        """An HTTP connection taken over from ``link`` (``head``: its first bytes)."""
        connection = ApiConnection(self, link)
        self.connections.add(connection)
        return connection

    def receive(self, envelope: ApiAnswer | Kick) -> None:
        """An owner's answer to a query, or presence's order to close a kicked session."""
        if isinstance(envelope, Kick):
            self._kick_local(envelope)
            return
        future = self._pending.get(envelope.qid)
        if future is not None and not future.done():
            future.set_result(envelope)

    def replied(self, reply: Reply) -> None:
        """A room owner's reply no session here awaited: a publish's, if it is ours."""
        future = self._pending.get(reply.conn)
        if future is not None and not future.done():
            future.set_result(reply)

    def room_closed(self, client: ClientConnection, room: str) -> None:
        """``client`` was written ``room-closed``: it leaves the room (its edge sends the
        leave, as for a client's own; the client gets a ``left`` frame without id)."""
        server = self.server
        if room not in client.rooms and room not in client.positions:
            # (A resume's replay comes before the owner's ``Synced`` adds the room to
            # ``rooms``; the position the client named is there already.)
            return
        seq = client.next_seq()
        command = LeaveCmd(
            client.session,
            client.conn,
            server.edge_id,
            seq,
            None,
            room,
            *server.core.room_order(client, room),
        )
        server.core.await_answer(client, seq, command, time.monotonic())
        server.backplane.to_room_owner(room, command)

    def _kick_local(self, kick: Kick) -> None:
        client = self.server.sessions.get(kick.session)
        if client is None or client.conn != kick.conn:
            return
        metrics.API_KICKED.inc()
        # Closed for good: the session ends (no resume), as after abuse.
        client.guard.close_code = CloseCode.KICKED
        self.server.close_client(client, CloseCode.KICKED, (kick.reason or "kicked")[:120])

    async def close(self) -> None:
        for connection in list(self.connections):
            connection.abort()

    # ----------------------------------------------------------------- routing

    async def serve(self, request: ApiRequest) -> ApiResponse:
        """Answer one request (never raises)."""
        started = time.perf_counter()
        route = "unknown"
        try:
            if self.server.draining:
                raise Unavailable("this edge is draining: use another edge")
            route, response = await self._route(request)
        except _MethodNotAllowed as exc:
            response = error_response(exc)
            response.status = 405
            response.headers = (("Allow", exc.allowed),)
        except ProtocolError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("serving %s %s failed", request.method, request.path)
            response = error_response(_INTERNAL)
        metrics.API_REQUESTS.labels(route, str(response.status)).inc()
        metrics.API_SECONDS.labels(route).observe(time.perf_counter() - started)
        return response

    async def _route(self, request: ApiRequest) -> tuple[str, ApiResponse]:
        path, method = request.path, request.method
        if not path.startswith(API_PREFIX):
            raise NotFound(f"no such path {path[:100]!r} (the server API is under {API_PREFIX})")
        if path == OPENAPI_PATH:
            _allow(method, "GET")
            return "openapi", ApiResponse(200, self.openapi())
        parts = [unquote(p) for p in path[len(API_PREFIX) :].split("/")]
        key = await self._key(request)
        if parts == ["rooms"]:
            _allow(method, "GET")
            key.require("rooms:read")
            return "rooms", await self.list_rooms(request.query)
        if len(parts) == 2 and parts[0] == "rooms":
            _allow(method, "GET")
            key.require("rooms:read")
            return "room", await self.room(_room(parts[1]))
        if len(parts) == 3 and parts[0] == "rooms" and parts[2] == "publish":
            _allow(method, "POST")
            key.require("publish")
            body = _decode(request.body, PublishBody)
            return "publish", await self.publish(key, _room(parts[1]), body)
        if len(parts) == 3 and parts[0] == "rooms" and parts[2] == "close":
            _allow(method, "POST")
            key.require("rooms:close")
            close = _decode(request.body, CloseBody)
            return "close", await self.close_room(key, _room(parts[1]), close)
        if parts == ["presence"]:
            _allow(method, "GET")
            key.require("presence:read")
            return "presence", await self.presence(request.query)
        if parts == ["kick"]:
            _allow(method, "POST")
            key.require("kick")
            return "kick", await self.kick(_decode(request.body, KickBody))
        if parts == ["tokens"]:
            _allow(method, "POST")
            key.require("tokens:mint")
            return "tokens", self.mint(_decode(request.body, TokenBody))
        raise NotFound(f"no such path {path[:100]!r}")

    async def _key(self, request: ApiRequest) -> ApiKey:
        return await self.keys.authenticate(request.headers.get("authorization"), time.time())

    # ----------------------------------------------------------------- owners

    async def _ask(self, send: Callable[[str], None], what: str) -> ApiAnswer | Reply:
        """Send a query (``send(qid)``) until answered, for ``api_timeout`` at most."""
        if len(self._pending) >= self.settings.api_max_inflight:
            raise RateLimited(
                f"{self.settings.api_max_inflight} API requests are waiting for owners; retry"
            )
        qid = f"{self.server.edge_id}/{_INCARNATION}.{next(_QUERY_NUMBERS)}"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ApiAnswer | Reply] = loop.create_future()
        self._pending[qid] = future
        deadline = loop.time() + self.settings.api_timeout
        try:
            while True:
                send(qid)
                if future.done():  # answered at once (one process: ``signalpost dev``)
                    return future.result()
                wait = min(RESEND, deadline - loop.time())
                if wait <= 0:
                    break
                try:
                    return await asyncio.wait_for(asyncio.shield(future), wait)
                except TimeoutError:
                    if loop.time() >= deadline:
                        break
                    metrics.API_RESENT.inc()
            raise Unavailable(f"{what} did not answer within {self.settings.api_timeout:g} s")
        finally:
            del self._pending[qid]

    @staticmethod
    def _answered(answer: ApiAnswer | Reply) -> ApiResponse:
        assert isinstance(answer, ApiAnswer)
        return ApiResponse(answer.status, answer.body)

    async def list_rooms(self, query: str) -> ApiResponse:
        params = parse_qs(query, keep_blank_values=True)
        limit = _int_param(params, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        after = _one(params, "cursor") or ""
        if len(after) > 128:
            raise BadRequest("cursor is a room name (the last of the previous page)")
        backplane = self.server.backplane
        brokers = backplane.broker_ids()
        if not brokers:
            raise Unavailable("no broker is known yet")

        async def page(broker: str) -> ApiAnswer | Reply:
            def send(qid: str) -> None:
                backplane.to_broker(broker, RoomsQuery(self.server.edge_id, qid, after, limit))

            return await self._ask(send, f"broker {broker}")

        answers = await asyncio.gather(*(page(b) for b in brokers))
        pages: list[list[dict[str, Any]]] = []
        more = False
        for answer in answers:
            assert isinstance(answer, ApiAnswer)
            decoded = msgspec.json.decode(answer.body)
            pages.append(decoded["rooms"])
            more = more or bool(decoded["more"])
        return ApiResponse(200, encode_json(merge_pages(pages, more, limit)))

    async def room(self, room: str) -> ApiResponse:
        server = self.server

        def send(qid: str) -> None:
            server.backplane.to_room_owner(room, RoomQuery(server.edge_id, qid, room))

        return self._answered(await self._ask(send, f"the owner of room {room!r}"))

    async def presence(self, query: str) -> ApiResponse:
        users = parse_qs(query, keep_blank_values=True).get("user", [])
        if not users:
            raise BadRequest("name at least one user: ?user=<user>[&user=...]")
        if len(users) > MAX_PRESENCE_USERS:
            raise BadRequest(f"at most {MAX_PRESENCE_USERS} users per request")
        for user in users:
            if not user or len(user) > 256:
                raise BadRequest("a user is 1 to 256 characters")
        server = self.server

        async def one(user: str) -> Any:
            def send(qid: str) -> None:
                server.backplane.to_presence(user, PresenceQuery(server.edge_id, qid, user))

            answer = await self._ask(send, f"the presence owner of {user!r}")
            assert isinstance(answer, ApiAnswer)
            return msgspec.json.decode(answer.body)

        found = await asyncio.gather(*(one(u) for u in dict.fromkeys(users)))
        return ApiResponse(200, encode_json({"users": found}))

    async def kick(self, body: KickBody) -> ApiResponse:
        server = self.server

        session = _given(body.session)

        def send(qid: str) -> None:
            kick = KickCmd(server.edge_id, qid, body.user, session, body.reason)
            server.backplane.to_presence(body.user, kick)

        return self._answered(await self._ask(send, f"the presence owner of {body.user!r}"))

    def mint(self, body: TokenBody) -> ApiResponse:
        now = time.time()
        token = mint_token(
            self.settings.jwt_secret,
            body.user,
            now=now,
            ttl=body.ttl,
            rooms=_given(body.rooms),
            audience=self.settings.jwt_audience,
            name=_given(body.name),
            home=_given(body.home),
        )
        expires = int(now + body.ttl)
        return ApiResponse(200, encode_json({"token": token, "user": body.user, "exp": expires}))

    # ----------------------------------------------------------------- publish, close

    def _sender(self, key: ApiKey) -> bytes:
        sender = self._sender_of.get(key.name)
        if sender is None:
            if len(self._sender_of) > 10_000:
                self._sender_of.clear()
            sender = self._sender_of[key.name] = encode_json(
                {"session": SERVER_SENDER, "user": SERVER_SENDER, "server": True, "key": key.name}
            )
        return sender

    async def publish(self, key: ApiKey, room: str, body: PublishBody) -> ApiResponse:
        to, to_user = _given(body.to), _given(body.to_user)
        if to is not None and to_user is not None:
            raise BadRequest("give `to` (a session) or `to_user` (a user), not both")
        data = encode_json(body.data)
        if len(data) > self.settings.max_frame:
            raise TooLarge(f"data is {len(data)} bytes; at most max_frame")
        idempotency = _given(body.idempotency_key)
        return await self._room_event(
            key, room, data, idempotency, to=to, to_user=to_user, close=False
        )

    async def close_room(self, key: ApiKey, room: str, body: CloseBody) -> ApiResponse:
        data = encode_json({"reason": body.reason})
        return await self._room_event(key, room, data, _given(body.idempotency_key), close=True)

    async def _room_event(
        self,
        key: ApiKey,
        room: str,
        data: bytes,
        idempotency: str | None,
        *,
        to: str | None = None,
        to_user: str | None = None,
        close: bool,
    ) -> ApiResponse:
        server = self.server
        req = None if idempotency is None else idempotency_request_id(key.name, idempotency)
        session = publish_session(req)
        sender = self._sender(key)

        def send(conn: str) -> None:
            command = SignalCmd(
                session,
                conn,
                server.edge_id,
                1,
                req,
                room,
                to,
                sender,
                data,
                server=True,
                to_user=to_user,
                close=close,
            )
            server.backplane.to_room_owner(room, command)

        reply = await self._ask(send, f"the owner of room {room!r}")
        assert isinstance(reply, Reply)
        if not reply.ok:
            error = msgspec.json.decode(reply.payload)
            exc = ProtocolError(str(error.get("message", "refused")))
            exc.code = ErrorCode(error.get("code", ErrorCode.INTERNAL))
            response = error_response(exc)
            if exc.code == ErrorCode.BAD_REQUEST:
                # The one bad_request an owner gives a server publish (the edge checked the
                # rest): its idempotency key was used for another request. A conflict.
                response.status = 409
            return response
        metrics.API_PUBLISHED.labels("close" if close else "publish").inc()
        answer = {"room": room, "epoch": reply.epoch, "offset": reply.offset}
        return ApiResponse(200, encode_json(answer))

    # ----------------------------------------------------------------- OpenAPI

    def openapi(self) -> bytes:
        if self._openapi is None:
            from edge.server_api_openapi import openapi_document

            self._openapi = encode_json(openapi_document())
        return self._openapi


_INTERNAL: Final = ProtocolError("internal error; the request was not served")
#: Query ids: this process's random incarnation and a counter (unique across restarts: a
#: publish without idempotency key is recorded under its query id for 120 s).
_INCARNATION: Final = secrets.token_hex(6)
_QUERY_NUMBERS: Final = itertools.count(1)


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise _MethodNotAllowed(allowed)


class _MethodNotAllowed(BadRequest):
    def __init__(self, allowed: str) -> None:
        super().__init__(f"method not allowed here (only {allowed})")
        self.allowed = allowed


def _room(name: str) -> str:
    if not name or len(name) > 128:
        raise BadRequest("a room name is 1 to 128 characters")
    return name


def _one(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"{name} given more than once")
    return values[0]


def _int_param(params: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    value = _one(params, name)
    if value is None:
        return default
    if not value.isascii() or not value.isdigit() or not low <= int(value) <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return int(value)


# --------------------------------------------------------------------------- HTTP shell


#: Requests being served (a reference keeps each task alive until it is done).
_SERVING: set[asyncio.Task[None]] = set()


class ApiConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to the API, taken over from a ``WebSocketLink``."""

    def __init__(self, api: ServerApi, link: WebSocketLink) -> None:
        self.api = api
        self.link = link
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.transport: asyncio.Transport | None = None
        self._request: h11.Request | None = None
        self._body = bytearray()
        self._busy = False
        self._closed = False
        self._idle: asyncio.TimerHandle | None = None
        self._active_at = 0.0

    def take_over(self, transport: asyncio.Transport, data: bytes) -> None:
        """Start on ``transport`` with the bytes read so far."""
        self.transport = transport
        self._arm_idle()
        self.data_received(data)

    def _arm_idle(self) -> None:
        """Note activity; the idle timer (one per connection, re-armed only when it fires,
        not per request) closes the connection ``IDLE_TIMEOUT`` after the last."""
        loop = asyncio.get_running_loop()
        self._active_at = loop.time()
        if self._idle is None:
            self._idle = loop.call_later(IDLE_TIMEOUT, self._idle_check)

    def _idle_check(self) -> None:
        loop = asyncio.get_running_loop()
        left = self._active_at + IDLE_TIMEOUT - loop.time()
        if left > 0 or self._busy:  # (a request being served is not idleness)
            self._idle = loop.call_later(max(left, 1.0), self._idle_check)
        else:
            self._idle = None
            self.abort()

    def data_received(self, data: bytes) -> None:
        try:
            self.http.receive_data(data)
        except h11.RemoteProtocolError:
            self._fail(400, "malformed HTTP")
            return
        self._pump()

    def eof_received(self) -> bool | None:
        with contextlib.suppress(h11.RemoteProtocolError):
            self.http.receive_data(b"")
        self._pump()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._idle is not None:
            self._idle.cancel()
        self.api.connections.discard(self)
        self.link.handler.on_closed(self.link)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _pump(self) -> None:
        """Read events until a whole request is in (then serve it) or more bytes are needed."""
        while not self._busy and not self._closed:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc.error_status_hint, "malformed HTTP request")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._arm_idle()
                self._request = event
                self._body = bytearray()
                length = _header(event.headers, b"content-length")
                if length is not None and (
                    not length.isdigit() or int(length) > self.api.settings.api_max_body
                ):
                    self._fail(413, f"body larger than {self.api.settings.api_max_body} bytes")
                    return
                if self.http.they_are_waiting_for_100_continue and self.transport is not None:
                    # (curl asks before sending a body over 1 KiB, and waits a second.)
                    self.transport.write(
                        self.http.send(h11.InformationalResponse(status_code=100, headers=[]))
                        or b""
                    )
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self.api.settings.api_max_body:
                    self._fail(413, f"body larger than {self.api.settings.api_max_body} bytes")
                    return
            elif isinstance(event, h11.EndOfMessage):
                assert self._request is not None
                self._busy = True
                asyncio.get_running_loop().create_task(
                    self._serve(self._request, bytes(self._body))
                )
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._close_transport()
                return

    async def _serve(self, head: h11.Request, body: bytes) -> None:
        target = head.target.decode("latin-1")
        url = urlsplit(target)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
        request = ApiRequest(
            head.method.decode("ascii", "replace"), url.path, url.query, headers, body
        )
        self._respond(await self.api.serve(request))

    def _respond(self, response: ApiResponse) -> None:
        if self._closed or self.transport is None:
            return
        status = response.status
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            ("Server", "signalpost"),
            *response.headers,
        ]
        try:
            data = self.http.send(h11.Response(status_code=status, headers=headers))
            data = (data or b"") + (self.http.send(h11.Data(data=response.body)) or b"")
            data += self.http.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            self._close_transport()
            return
        self.transport.write(data)
        self._next()

    def _next(self) -> None:
        self._busy = False
        if self.http.our_state is h11.MUST_CLOSE or self.http.their_state is h11.MUST_CLOSE:
            self._close_transport()
            return
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()
            self._arm_idle()
            self._pump()
        elif self.http.their_state is not h11.DONE:
            # The response went before the whole body was read (an early error): close.
            self._close_transport()

    def _fail(self, status: int, message: str) -> None:
        """Answer a request that cannot be served (malformed, too large) and close."""
        code = ErrorCode.TOO_LARGE if status == 413 else ErrorCode.BAD_REQUEST
        body = encode_json({"code": code, "message": message})
        if self.transport is None or self._closed:
            return
        if self.http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError):
                phrase = HTTPStatus(status).phrase.encode()
                head = f"HTTP/1.1 {status} ".encode() + phrase + b"\r\n"
                head += b"Content-Type: application/json\r\nConnection: close\r\n"
                head += f"Content-Length: {len(body)}\r\n\r\n".encode()
                self.transport.write(head + body)
        self._close_transport()

    def _close_transport(self) -> None:
        if self.transport is not None and not self._closed:
            self._closed = True
            self.transport.close()


def _header(headers: Any, name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return str(value.decode("latin-1")).strip()
    return None


#: Envelopes the edge hands to ``ServerApi.receive``.
API_ENVELOPES: Final = (ApiAnswer, Kick)


def is_api_envelope(envelope: Envelope) -> bool:
    return isinstance(envelope, API_ENVELOPES)
