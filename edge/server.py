"""EdgeServer: what clients connect to.

Per connection (an ``edge.websocket_link.WebSocketLink``, which hands over whole text
messages synchronously): origin check, ``hello`` within ``hello_timeout`` (JWT or
resume), then every frame is validated (``signalpost.wire.decode_client``), held to the
connection's ``ClientGuard`` and turned into a command for the room owner or the
presence service. Everything the owners send back arrives at ``receive`` and is queued
per client, then written once per client per loop iteration.

The same HTTP port serves ``/healthz``, ``/metrics``, the demo app and the JS SDK
(``signalpost/static``) and, in dev mode only, ``/v1/dev-token``; all of it over TLS only
when a certificate is configured (``edge.tls``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from pathlib import PurePosixPath
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from edge.admission import Admission, Refusal, exempt_addresses
from edge.backplane import Backplane
from edge.core import (
    Attach,
    ConfirmPositions,
    EdgeCore,
    Reannounce,
    SessionState,
    ToOwner,
    ToReplica,
    Write,
)
from edge.delivery import ACCEPT, DUPLICATE, GAP, OTHER_EPOCH
from edge.guard import CLOSE, SERVE, ClientGuard, origin_admitted
from edge.server_api import API_ENVELOPES, ApiConnection, ServerApi
from edge.tls import EdgeTls
from edge.websocket_link import WebSocketLink
from signalpost import metrics
from signalpost.api_keys import ApiKeys
from signalpost.auth import Identity, ResumeTokens, TokenVerifier, ice_servers, mint_token
from signalpost.config import Settings
from signalpost.errors import (
    BadRequest,
    CloseCode,
    Forbidden,
    InternalError,
    ProtocolError,
    RateLimited,
    TooLarge,
    Unauthorized,
)
from signalpost.near import EDGES_MAX_AGE, RegionDirectory
from signalpost.wire import (
    ClaimCmd,
    ClaimReply,
    ClientMessage,
    Deliver,
    DetachCmd,
    EdgeSync,
    Envelope,
    ErrorFrame,
    Evict,
    Evicted,
    Hello,
    IceServersFrame,
    IceServersRequest,
    Join,
    JoinCmd,
    Leave,
    LeaveCmd,
    Ping,
    PongFrame,
    PresenceFrame,
    Reply,
    RequestId,
    SessionDown,
    SessionUp,
    Signal,
    SignalCmd,
    Synced,
    Unwatch,
    UnwatchCmd,
    Watch,
    WatchCmd,
    WelcomeFrame,
    decode_client,
    encode_frame,
    encode_json,
    peer_object,
    request_id_of,
    sender_object,
)

log = logging.getLogger("signalpost.edge")

SIGNAL_PATH = "/v1/signal"
EDGES_PATH = "/v1/edges"
#: How often an unanswered resume claim is sent again (seconds): its user's presence
#: owner may have died, and the claim then reaches the node that took its users over as
#: soon as the edge has read the new view (0.2-0.3 s after a kill, with Consul). A claim is
#: idempotent at presence (the same connection's claim again changes nothing).
CLAIM_RESEND = 0.5

_PRESENCE_PREFIX = b'{"type":"presence"'

#: Requests of one connection that may wait for an answer at once; more are refused with
#: ``rate_limited`` until answers come back (an owner that stalls must not make the edge
#: buffer without end).
MAX_UNANSWERED = 1024

#: How often an edge confirms what it wrote and resends what was not answered (cluster).
DELIVERY_TICK = 0.1


@dataclass(slots=True, eq=False, kw_only=True)
class ClientConnection(SessionState):
    """One authenticated WebSocket and the session it holds (room state: ``SessionState``)."""

    link: WebSocketLink
    identity: Identity
    guard: ClientGuard
    sender: bytes
    ready: bool = False  # welcome sent; until then output is held back
    held: list[bytes] = field(default_factory=list)
    outbox: list[bytes] = field(default_factory=list)  # frames waiting for this iteration's flush
    watching: set[str] = field(default_factory=set)
    told_status: dict[str, str] = field(default_factory=dict)  # watched user -> last status
    #: Presence frames of users whose ``watch`` is not answered yet (``MAX_EARLY_NOTES``):
    #: sent after the ``watching`` reply, if they are newer than it.
    early_notes: list[bytes] = field(default_factory=list)
    evicted: bool = False


@dataclass(slots=True, eq=False)
class Greeting:
    """A link that is open but not yet authenticated."""

    timer: asyncio.TimerHandle
    early: list[bytes] | None = None  # frames that came after hello, while it is checked


#: Frames a client may send after its hello before the welcome; more is abuse.
MAX_EARLY_FRAMES = 64
#: Presence frames held per client for users whose watch is not answered; past it they are
#: dropped (the reply, made after every frame its presence node sent before it, has them).
MAX_EARLY_NOTES = 1000


class EdgeServer:
    """Serves ``/v1/signal`` and hands client commands to a ``Backplane``."""

    def __init__(
        self, settings: Settings, backplane: Backplane, edge_id: str | None = None
    ) -> None:
        self.settings = settings
        #: TLS on the listener (``tls_cert_file``/``tls_key_file``), or None: plain.
        self.tls = EdgeTls.from_settings(settings)
        self.edge_id = edge_id or settings.node_id or f"edge-{secrets.token_hex(4)}"
        self.backplane = backplane
        #: Dev mode's own webhook receiver (``signalpost.dev_webhooks``): its events since
        #: a number, for ``/v1/dev-webhooks`` (None: not served).
        self.dev_webhooks: Callable[[str], bytes] | None = None
        #: The room logic, sans I/O; its actions are carried out by ``_act``.
        self.core: EdgeCore[ClientConnection] = EdgeCore(self.edge_id, lossy=backplane.lossy)
        self.sessions: dict[str, ClientConnection] = self.core.sessions
        self._verifier = TokenVerifier(settings)
        self._resume_tokens = ResumeTokens(settings.jwt_secret)
        self._claims: dict[str, asyncio.Future[ClaimReply]] = {}  # conn -> claim outcome
        # session -> presence frames sent it while its resume claim was out (not registered yet)
        self._held_for_claim: dict[str, list[bytes]] = {}
        self._server: asyncio.Server | None = None
        self._links: dict[WebSocketLink, Greeting | ClientConnection | None] = {}
        self._all_closed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False
        self._to_flush: list[ClientConnection] = []
        self._lossy = backplane.lossy
        #: Per-IP and per-user caps and the accept rate (``edge.admission``); the links it
        #: counted (-> peer address), those to refuse once open, those holding a user slot.
        self.admission = _admission(settings)
        self._peers: dict[WebSocketLink, str] = {}
        self._ip_refused: dict[WebSocketLink, Refusal] = {}
        self._user_slots: dict[WebSocketLink, str] = {}
        #: Every region's edges and ICE URLs (``signalpost.near``): ``/v1/edges``, ICE order.
        self.directory = RegionDirectory(
            settings.region,
            settings.regions,
            stun_urls=settings.stun_urls,
            turn_urls=settings.turn_urls,
        )
        #: The server API on this HTTP port (``edge.server_api``, docs/server-api.md).
        self.api = ServerApi(self, ApiKeys(self._verifier))
        backplane.connect(self.edge_id, self.receive, self.sync_state, self.owners_changed)
        backplane.on_home_moved(lambda room: self.core.terms.pop(room, None))

    # ----------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """The ws URL clients reach this edge at (``advertise_host``, the bound port)."""
        secure = "s" if self.tls is not None else ""
        return f"ws{secure}://{self.settings.advertised_host}:{self.port}{SIGNAL_PATH}"

    async def start(self) -> None:
        """Start the backplane (and the JWK Set, if any) and listen."""
        await self._verifier.start()
        await self.backplane.start()
        loop = asyncio.get_running_loop()
        max_size = self.settings.max_frame
        self._server = await loop.create_server(
            lambda: WebSocketLink(self, max_size, self.settings.hello_timeout),
            self.settings.host,
            self.settings.port,
            ssl=None if self.tls is None else self.tls.listening,
            ssl_handshake_timeout=None if self.tls is None else self.settings.hello_timeout,
        )
        self.directory.set_own_url(self.url)
        self._spawn(self._keepalive())
        if self._lossy:
            self._spawn(self._delivery_loop())
        log.info("edge %s listening on %s:%d", self.edge_id, self.settings.host, self.port)

    async def drain(self) -> None:
        """Close every client with 1001 (resume elsewhere), within ``drain_timeout``."""
        self._draining = True
        self.directory.set_own_url(None)  # /v1/edges stops naming this edge
        if self._server is None:
            return
        self._server.close()  # no new connections; the open ones are closed below
        for link, state in list(self._links.items()):
            if isinstance(state, ClientConnection):
                self._close(state, CloseCode.GOING_AWAY, "edge draining")
            else:
                link.close(CloseCode.GOING_AWAY, "edge draining")
        if self._links:
            self._all_closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), self.settings.drain_timeout)
        for link in list(self._links):
            link.abort()
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        """Drain clients, then stop the backplane."""
        await self.drain()
        await self.api.close()
        await self._verifier.close()
        await self.backplane.close()

    async def __aenter__(self) -> EdgeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keepalive(self) -> None:
        # One timer for the whole edge instead of one per connection.
        while True:
            await asyncio.sleep(self.settings.heartbeat)
            for link in list(self._links):
                link.keepalive()

    async def _delivery_loop(self) -> None:
        # One timer for the whole edge: confirm what was written, resend what is owed.
        while True:
            await asyncio.sleep(DELIVERY_TICK)
            try:
                self._delivery_tick(time.monotonic())
            except Exception:  # a bug here must not stop confirmations for good
                log.exception("delivery tick failed")

    def _delivery_tick(self, now: float) -> None:
        self.core.tick(now)
        self._act()

    def _act(self) -> None:
        """Carry out what the core decided, in order."""
        backplane = self.backplane
        for action in self.core.take():
            if isinstance(action, ToOwner):
                if isinstance(action.command, SignalCmd | JoinCmd | LeaveCmd):
                    metrics.REQUESTS_RESENT.inc()
                backplane.to_room_owner(action.room, action.command)
            elif isinstance(action, ConfirmPositions):
                backplane.confirm(action.positions)
            elif isinstance(action, Write):
                state = self.sessions.get(action.state.session)
                if state is action.state:
                    self._write([state], action.payload)
            elif isinstance(action, ToReplica):
                backplane.to_room_replica(action.room, action.command)
            elif isinstance(action, Reannounce):
                backplane.reannounce(action.room, action.restore)
            elif isinstance(action, Attach):
                backplane.attach(action.session, action.conn, action.positions)
            else:
                command = action.command  # a watch or unwatch resent
                if isinstance(command, WatchCmd | UnwatchCmd):
                    client = self.sessions.get(command.session)
                    if client is not None:  # else the session is gone: nothing to resend
                        backplane.to_presence(client.identity.user, command)

    # ----------------------------------------------------------------- from owners

    def receive(self, envelope: Envelope) -> None:
        """Handle one envelope from a broker or the presence service."""
        if isinstance(envelope, Deliver):
            sessions = envelope.sessions
            if envelope.room:
                if (
                    self._lossy
                    and envelope.term != self.core.terms.get(envelope.room)  # (the usual case)
                    and self.core.stale(envelope.room, envelope.term)
                ):
                    metrics.DELIVERIES_DROPPED.labels("stale_term").inc()
                    return
                if len(sessions) == 1:  # a signal to one peer: most of the traffic, inline
                    client = self.sessions.get(sessions[0])
                    if client is None:
                        return
                    verdict = self.core.admit(client, envelope)  # ``_admit``, inline
                    if verdict == ACCEPT:
                        self._write([client], envelope.payload)
                        if envelope.payload.startswith(_ROOM_CLOSED):
                            self.api.room_closed(client, envelope.room)
                    else:
                        metrics.DELIVERIES_DROPPED.labels(_DROPPED[verdict]).inc()
                    return
                targets = [
                    c
                    for s in sessions
                    if (c := self.sessions.get(s)) is not None and self._admit(c, envelope)
                ]
                if envelope.payload.startswith(_ROOM_CLOSED):
                    self._write(targets, envelope.payload)
                    for client in targets:
                        self.api.room_closed(client, envelope.room)
                    return
            else:
                targets = [c for s in sessions if (c := self.sessions.get(s)) is not None]
                if envelope.payload.startswith(_PRESENCE_PREFIX):
                    if self._held_for_claim:
                        self._hold_for_claims(envelope)
                    targets = self._status_changes(targets, envelope.payload)
            self._write(targets, envelope.payload)
        elif isinstance(envelope, Reply):
            answered = self.core.reply(envelope)
            if answered is None:
                self.api.replied(envelope)  # a server API publish's, or stale
                return
            client, command = answered
            if envelope.payload:
                self._write([client], envelope.payload)
            if type(command) is not SignalCmd:  # signals change no membership or watch
                self._track_watches(client, command, envelope)
                self._act()
        elif isinstance(envelope, Synced):
            self.core.synced(envelope)
            self._act()
        elif isinstance(envelope, ClaimReply):
            if envelope.term < self.backplane.presence_term:
                # A grant from a node deposed since (it answered from an older view):
                # the claim is sent again to the owner of the view this edge knows.
                log.warning("ignoring a claim answer of term %d", envelope.term)
                return
            claim = self._claims.get(envelope.conn)
            if claim is not None and not claim.done():
                claim.set_result(envelope)
        elif isinstance(envelope, API_ENVELOPES):
            self.api.receive(envelope)
        elif isinstance(envelope, Evict):
            client = self.sessions.get(envelope.session)
            if client is not None and client.conn == envelope.conn:
                self._evict(client)
            # Closed (or never here): the resume that replaces it may be welcomed now.
            evicted = Evicted(envelope.session, envelope.conn, self.edge_id)
            self.backplane.to_presence(envelope.user, evicted)

    def _hold_for_claims(self, envelope: Deliver) -> None:
        """Keep a presence frame for sessions between their claim and their registration.

        Presence routes to the claiming connection as soon as it answers the claim; the
        edge registers the session when the claim's answer has been awaited, a loop
        iteration later. (Room events need no holding: brokers replay them after attach.)
        """
        for session in envelope.sessions:
            held = self._held_for_claim.get(session)
            if held is not None:
                held.append(envelope.payload)

    def _admit(self, client: ClientConnection, deliver: Deliver) -> bool:
        """Whether ``client`` is written this room event (``EdgeCore.admit``), counted."""
        verdict = self.core.admit(client, deliver)
        if verdict == ACCEPT:
            return True
        metrics.DELIVERIES_DROPPED.labels(_DROPPED[verdict]).inc()
        return False

    @staticmethod
    def _status_changes(targets: list[ClientConnection], payload: bytes) -> list[ClientConnection]:
        """Drop presence frames that tell a watcher what it already knows.

        A restarted presence service rebuilds from the edges one at a time, so it can
        announce a status its watchers were already told. A frame of a user whose watch is
        not answered yet waits for the ``watching`` reply (the user's presence node notes a
        change to its watchers while it waits for the status from another region, before
        it answers): the client hears of a user first in that reply.
        """
        frame = msgspec.json.decode(payload)
        user, status = frame["user"], frame["status"]
        news = []
        for client in targets:
            told = client.told_status.get(user)
            if told is None and user in client.watching:
                if len(client.early_notes) < MAX_EARLY_NOTES:
                    client.early_notes.append(payload)
            elif told != status:
                client.told_status[user] = status
                news.append(client)
        return news

    def _track_watches(self, client: ClientConnection, command: Envelope, reply: Reply) -> None:
        """Remember what a watcher was told (rooms are the core's: ``EdgeCore.reply``);
        after a ``watching`` reply, send the frames that waited for it and are newer."""
        if isinstance(command, WatchCmd):
            early, client.early_notes = client.early_notes, []
            if not reply.ok:
                return
            answer = msgspec.json.decode(reply.payload)
            client.told_status.update(answer["presence"])
            versions: dict[str, int] = answer.get("versions", {})
            for payload in early:
                frame = msgspec.json.decode(payload)
                version = frame.get("version", 0)
                if version and version <= versions.get(frame["user"], 0):
                    continue  # the reply has it already
                self._write(self._status_changes([client], payload), payload)
        elif isinstance(command, UnwatchCmd) and reply.ok:
            for user in command.users:
                client.told_status.pop(user, None)

    def owners_changed(self) -> None:
        """Brokers came or went: re-announce memberships, then retry unanswered requests
        (``EdgeCore.owners_changed``)."""
        self.core.owners_changed(time.monotonic())
        self._act()

    def sync_state(self) -> EdgeSync:
        """Everything this edge holds, for a presence node that (re)appeared."""
        return EdgeSync(
            self.edge_id,
            [
                SessionUp(c.session, c.identity.user, self.edge_id, c.conn)
                for c in self.sessions.values()
                if c.ready
            ],
            {c.session: sorted(c.watching) for c in self.sessions.values() if c.watching},
        )

    def _write(self, targets: list[ClientConnection], payload: bytes) -> None:
        # Frames are queued and written once per client per loop iteration: a burst (a
        # batch of deliveries from a broker, a replay) costs one transport write per client.
        to_flush = self._to_flush
        if not to_flush:
            asyncio.get_running_loop().call_soon(self._flush)
        for client in targets:
            if not client.ready:
                client.held.append(payload)
                continue
            if not client.outbox:
                to_flush.append(client)
            client.outbox.append(payload)

    def _flush(self) -> None:
        clients, self._to_flush = self._to_flush, []
        frames = 0
        limit = self.settings.send_buffer_limit
        for client in clients:
            outbox = client.outbox
            frames += len(outbox)
            if outbox:  # _flush_client, inline: once per client per loop iteration
                client.outbox = []
                try:
                    client.link.send_texts(outbox)
                except (OSError, RuntimeError) as exc:
                    # One client's broken transport must not stop the flush of the others
                    # (their outboxes would never be flushed again: a client is queued for
                    # a flush only when its outbox was empty).
                    log.warning("session %s: write failed (%s); closing", client.session, exc)
                    client.link.abort()
                    continue
            if client.link.write_buffer_size() > limit:
                # A client that does not read must not make the edge buffer without end.
                log.warning("session %s exceeds the send buffer; closing", client.session)
                client.link.abort()
        metrics.HOT.frames_out += frames

    @staticmethod
    def _flush_client(client: ClientConnection) -> None:
        """Write ``client``'s queued frames now (also before closing it, to keep order)."""
        outbox, client.outbox = client.outbox, []
        if outbox:
            client.link.send_texts(outbox)

    def _close(self, client: ClientConnection, code: int, reason: str) -> None:
        self._flush_client(client)
        client.link.close(code, reason)

    close_client = _close  # (for ``edge.server_api``: a kicked session)

    def _evict(self, client: ClientConnection) -> None:
        client.evicted = True
        if self.sessions.get(client.session) is client:
            del self.sessions[client.session]
        self._close(client, CloseCode.REPLACED, "session resumed on another connection")

    # ----------------------------------------------------------------- HTTP

    def on_http(self, link: WebSocketLink, head: bytes) -> ApiConnection | None:
        """A request for the server API (or not a GET): its connection is the API's."""
        return self.api.connection(link, head)

    @property
    def draining(self) -> bool:
        """SIGTERM came: no new sessions, API requests answered 503."""
        return self._draining

    def on_request(self, link: WebSocketLink, request: Request) -> Response:
        """Answer an HTTP request: the WebSocket handshake on ``/v1/signal``, or a page."""
        url = urlsplit(request.path)
        if url.path == SIGNAL_PATH:
            if self._draining:
                return link.protocol.reject(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            return link.protocol.accept(request)
        if url.path == "/healthz":
            if self._draining:
                return link.protocol.reject(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
            if not self.backplane.ready:
                return link.protocol.reject(HTTPStatus.SERVICE_UNAVAILABLE, "no broker\n")
            return link.protocol.reject(HTTPStatus.OK, "ok\n")
        if url.path == EDGES_PATH:
            status, body = self.directory.answer(url.query, time.monotonic())
            metrics.EDGES_ANSWERS.labels(str(status.value)).inc()
            return _edges_response(status, body)
        if url.path == "/metrics":
            body, content_type = metrics.exposition()
            return _response(HTTPStatus.OK, body, content_type)
        if url.path == "/v1/dev-token" and self.settings.dev_tokens:
            return self._dev_token(url.query)
        if url.path == "/v1/dev-webhooks" and self.dev_webhooks is not None:
            return _response(HTTPStatus.OK, self.dev_webhooks(url.query), "application/json")
        return _static(url.path)

    def _ice_servers(self, user: str, now: float) -> list[dict[str, Any]]:
        """This region's STUN/TURN first, the other regions' after (``signalpost.near``)."""
        regions = [(r.stun, r.turn) for r in self.directory.ice_regions()]
        return ice_servers(self.settings, user, now, regions)

    def _dev_token(self, query: str) -> Response:
        params = parse_qs(query)
        user = (params.get("user") or [""])[0].strip()
        if not user or len(user) > 64:
            return _response(HTTPStatus.BAD_REQUEST, b'{"error":"user required"}', "json")
        token = mint_token(self.settings.jwt_secret, user, now=time.time(), ttl=3600)
        body = encode_json({"token": token, "user": user})
        return _response(HTTPStatus.OK, body, "application/json")

    # ----------------------------------------------------------------- connections

    def on_connect(self, link: WebSocketLink) -> bool:
        """A TCP connection was accepted: count it against its address's cap."""
        refusal = self.admission.connect(link.peer)
        if refusal is not None:
            metrics.ADMISSION_REFUSED.labels(refusal.kind.value).inc()
            if refusal.drop:
                return False
            self._ip_refused[link] = refusal  # closed 4503 once it is a WebSocket
        self._peers[link] = link.peer
        return True

    def on_open(self, link: WebSocketLink) -> None:
        """A WebSocket opened: check its origin, then wait for ``hello``."""
        refusal = self._ip_refused.pop(link, None)
        if refusal is not None:
            link.close(CloseCode.TRY_AGAIN_LATER, refusal.reason)
            return
        request = link.request
        origin = request.headers.get("Origin") if request is not None else None
        settings = self.settings
        if not origin_admitted(origin, settings.allowed_origins, settings.allow_missing_origin):
            link.close(CloseCode.ORIGIN_REFUSED, "origin refused")
            return
        timer = asyncio.get_running_loop().call_later(
            self.settings.hello_timeout, link.close, CloseCode.HELLO_TIMEOUT, "hello timeout"
        )
        self._links[link] = Greeting(timer)

    def on_binary(self, link: WebSocketLink) -> None:
        state = self._links.get(link)
        if isinstance(state, ClientConnection):
            self._close(state, CloseCode.UNSUPPORTED_DATA, "text frames only")
        else:
            link.close(CloseCode.UNSUPPORTED_DATA, "text frames only")

    def on_text(self, link: WebSocketLink, message: bytes) -> None:
        state = self._links.get(link)
        if type(state) is ClientConnection:
            self._serve(state, message)
        elif isinstance(state, Greeting):
            if state.early is None:
                metrics.HOT.frames_in += 1  # the hello (the frames behind it count when served)
                state.timer.cancel()
                state.early = []
                self._spawn(self._hello(link, state, message))
            elif len(state.early) < MAX_EARLY_FRAMES:
                state.early.append(message)
            else:
                link.close(CloseCode.RATE_LIMITED, "too many frames before the welcome")

    def on_closed(self, link: WebSocketLink) -> None:
        peer = self._peers.pop(link, None)
        if peer is not None:
            self.admission.disconnect(peer)
            self._ip_refused.pop(link, None)
        user = self._user_slots.pop(link, None)
        if user is not None:
            self.admission.close_session(user)
        state = self._links.pop(link, None)
        if isinstance(state, ClientConnection):
            metrics.CONNECTIONS.dec()
            self._closed(state)
        elif isinstance(state, Greeting):
            state.timer.cancel()
        if not self._links:
            self._all_closed.set()

    async def _hello(self, link: WebSocketLink, greeting: Greeting, first: bytes) -> None:
        if not self.backplane.ready:
            # No broker known or alive: a session here could not reach its rooms. The
            # client resumes on another edge (1001), as when an edge drains.
            link.close(CloseCode.GOING_AWAY, "no broker reachable; try another edge")
            return
        try:
            client = await self._authenticate(link, first)
        except Exception:
            # A bug must not leave the connection open with no welcome and no close (the
            # hello timer was cancelled when the hello arrived).
            log.exception("a hello failed")
            link.close(CloseCode.INTERNAL_ERROR, "internal error")
            return
        if client is None or self._links.get(link) is not greeting:
            return  # refused, or the link closed while the claim was out
        self._links[link] = client
        metrics.CONNECTIONS.inc()
        for message in greeting.early or ():
            if self._links.get(link) is not client:
                break
            self._serve(client, message)

    async def _authenticate(self, link: WebSocketLink, first: bytes) -> ClientConnection | None:
        try:
            hello = decode_client(first)
            if not isinstance(hello, Hello):
                raise Unauthorized("the first frame must be hello")
            identity = await self._verifier.authenticate(hello.token, time.time())
            regions = self.settings.regions
            if identity.home is not None and regions and identity.home not in regions:
                raise Unauthorized(
                    f"token home claim {identity.home!r} is no region of this deployment "
                    f"({', '.join(regions)})"
                )
        except ProtocolError as exc:
            # Whatever the first frame got wrong, nobody gets in without a good hello.
            link.send_texts([_error(Unauthorized(exc.message), request_id_of(exc))])
            link.close(CloseCode.UNAUTHORIZED, "unauthorized")
            return None
        if not link.is_open:
            return None  # gone while a JWK Set fetch for its token's kid was under way

        session = None
        generation = 1
        claimed: ClaimReply | None = None
        on_token = False
        held_for_claim: list[bytes] = []
        if hello.resume:
            session = self._resume_tokens.session_of(hello.resume, identity.user)
            generation = self._resume_tokens.generation_of(hello.resume) + 1
        if not self._admit_hello(link, identity.user, session):
            return None
        # The connection id says which of the session's connections it is (owners ignore
        # an older one's late word): ``<random>.<generation>``.
        conn = f"{secrets.token_urlsafe(9)}.{generation}"
        if hello.resume and session is not None:
            self._held_for_claim[session] = held_for_claim
            try:
                claimed = None
                if not self._from_another_region(hello.resume):
                    claimed = await self._claim(session, identity.user, conn)
                if claimed is None:  # presence unreachable or elsewhere: trust the token
                    on_token = True
                    claimed = ClaimReply(session, conn, True)
            finally:
                # Popped now: from here to the registration below nothing awaits.
                if self._held_for_claim.get(session) is held_for_claim:
                    del self._held_for_claim[session]
            if not claimed.live:
                session = None
            if not link.is_open:
                if session is not None:
                    # Gone while the claim was out: presence moved the lease to this
                    # connection, which will never say goodbye. Its resume window starts
                    # now (the session can still resume), as for any dropped connection.
                    self.backplane.to_presence(
                        identity.user, SessionDown(session, self.edge_id, conn, False)
                    )
                return None
        resumed = session is not None
        if session is None:
            session = secrets.token_urlsafe(16)
            # Its lease is made and copied to the runner-up before the welcome.
            granted = await self._claim(session, identity.user, conn, fresh=True)
            on_token = granted is None or not granted.live  # (not granted: announced below)
            if not link.is_open:  # never welcomed: nothing to resume
                self.backplane.to_presence(
                    identity.user, SessionDown(session, self.edge_id, conn, True)
                )
                return None
        s = self.settings
        client = ClientConnection(
            link=link,
            session=session,
            conn=conn,
            identity=identity,
            guard=ClientGuard(s.rate_per_second, s.rate_burst, s.rate_strikes, s.bad_frame_strikes),
            sender=sender_object(session, identity.user),
        )
        if resumed and claimed is not None:
            # The session's watches continue; it hears what changed while it was away.
            client.watching = set(claimed.watching)
            client.told_status = dict(claimed.watching)
        previous = self.sessions.get(session)
        if previous is not None:
            self._evict(previous)
        self.sessions[session] = client
        if on_token:
            # (Welcomed on the edge's authority: presence made or moved no lease, so the
            # session is announced.)
            self.backplane.to_presence(
                identity.user, SessionUp(session, identity.user, self.edge_id, conn)
            )
        now = time.time()
        welcome = WelcomeFrame(
            session=session,
            user=identity.user,
            resume=self._resume_tokens.issue(session, identity.user, now, generation, s.region),
            resumed=resumed,
            ice_servers=self._ice_servers(identity.user, now),
            heartbeat=s.heartbeat,
            id=hello.id,
        )
        held, client.held = client.held, []
        client.ready = True
        self._write([client], encode_frame(welcome))
        for payload in held:
            self._write([client], payload)
        if resumed and claimed is not None:
            for user in claimed.changed:
                status = claimed.watching[user]
                version = claimed.versions.get(user, 0)
                frame = PresenceFrame(user=user, status=status, version=version)
                self._write([client], encode_frame(frame))
            for payload in held_for_claim:  # newer than the claim's snapshot: after it
                self._write(self._status_changes([client], payload), payload)
        if resumed:
            # Where the client says it is in each room: the owners replay what came after.
            self.core.resumed(client, dict(hello.rooms or {}), time.monotonic())
            self._act()
        return client

    def _from_another_region(self, resume: str) -> bool:
        """A resume token issued in another region: the session's presence lease is there,
        which this region's presence cannot claim (no global presence yet); the session
        resumes on the signed token (docs/multi-region.md)."""
        issued_in = self._resume_tokens.region_of(resume)
        return len(self.settings.regions) >= 2 and issued_in not in ("", self.settings.region)

    def _admit_hello(self, link: WebSocketLink, user: str, session: str | None) -> bool:
        """The accept rate and the per-user cap (``edge.admission``); a refused hello is
        closed 4503 with when to try again. ``session``: the one a valid resume names."""
        if link not in self._links:
            return False  # closed meanwhile: nothing to take on
        admission = self.admission
        refusal = admission.hello(resume=session is not None, now=time.monotonic())
        if refusal is None:
            replacing = session is not None and session in self.sessions
            refusal = admission.open_session(user, replacing=replacing)
            if refusal is None:
                self._user_slots[link] = user  # given back when the link closes
                metrics.HELLOS_ADMITTED.labels("fresh" if session is None else "resume").inc()
                return True
        metrics.ADMISSION_REFUSED.labels(refusal.kind.value).inc()
        link.close(CloseCode.TRY_AGAIN_LATER, refusal.reason)
        return False

    async def _claim(
        self, session: str, user: str, conn: str, fresh: bool = False
    ) -> ClaimReply | None:
        """Presence's answer to a resume claim, or (``fresh``) to a new session's claim of
        its lease (None: it did not answer in time)."""
        claim: asyncio.Future[ClaimReply] = asyncio.get_running_loop().create_future()
        self._claims[conn] = claim
        try:
            # Sent again every CLAIM_RESEND until answered, for two request timeouts.
            attempts = max(1, round(2 * self.settings.request_timeout / CLAIM_RESEND))
            wait = 2 * self.settings.request_timeout / attempts
            for _attempt in range(attempts):
                claim_cmd = ClaimCmd(session, user, self.edge_id, conn, fresh)
                self.backplane.to_presence(user, claim_cmd)
                try:
                    return await asyncio.wait_for(asyncio.shield(claim), wait)
                except TimeoutError:
                    continue
            # Presence unreachable: trust the signed token; brokers still decide per room.
            # (Watches are not known then: the client re-watches if it wants them.)
            log.warning(
                "presence did not answer a %s claim; welcoming on the edge's authority",
                "fresh" if fresh else "resume",
            )
            return None
        finally:
            del self._claims[conn]

    def _serve(self, client: ClientConnection, frame: bytes) -> None:
        metrics.HOT.frames_in += 1
        guard = client.guard
        verdict = guard.admit(time.monotonic())
        if verdict is SERVE:
            try:
                message = decode_client(frame)
            except ProtocolError as exc:
                metrics.CLIENT_BAD_FRAMES.inc()
                self._write([client], _error(exc, request_id_of(exc)))
                verdict = guard.bad_frame(time.monotonic())
            else:
                try:
                    self._dispatch(client, message)
                    return
                except ProtocolError as exc:
                    self._write([client], _error(exc, message.id))
                    if not isinstance(exc, BadRequest):
                        return
                    metrics.CLIENT_BAD_FRAMES.inc()
                    verdict = guard.bad_frame(time.monotonic())
                except Exception:
                    # A bug must cost this one request, not the connection or the edge.
                    log.exception("serving a frame of %s failed", client.session)
                    self._write([client], _error(_INTERNAL, message.id))
                    return
        else:
            self._write([client], _error(_RATE_LIMITED, _frame_id(frame)))
        if verdict is CLOSE:
            assert guard.close_code is not None
            self._close(client, guard.close_code, guard.close_code.name.lower())

    def _dispatch(self, client: ClientConnection, message: ClientMessage) -> None:
        if len(client.unanswered) >= MAX_UNANSWERED and not isinstance(
            message, Ping | IceServersRequest
        ):
            raise RateLimited(f"{MAX_UNANSWERED} requests are waiting for an answer; slow down")
        # Ordered by frequency: signals dominate a call's traffic.
        if isinstance(message, Signal):
            core = self.core
            seq = client.seq = client.seq + 1  # ``next_seq``, inline
            lossy = self._lossy
            rseq, rbase = core.room_order(client, message.room) if lossy else _UNORDERED
            command: Envelope = SignalCmd(
                client.session,
                client.conn,
                self.edge_id,
                seq,
                message.id,
                message.room,
                message.to,
                client.sender,
                bytes(message.data),
                rseq,
                rbase,
            )
            if lossy:
                core.await_answer(client, seq, command, time.monotonic())
            else:  # one process: nothing to resend (``await_answer``, inline)
                client.unanswered[seq] = command
            self.backplane.to_room_owner(message.room, command)
        elif isinstance(message, Join):
            if not client.identity.may_join(message.room):
                raise Forbidden(f"token does not grant room {message.room!r}")
            identity = client.identity
            meta = {**(identity.meta or {}), **(message.meta or {})}
            seq = client.next_seq()
            peer = peer_object(client.session, identity.user, meta, identity.name)
            command = JoinCmd(
                client.session,
                client.conn,
                self.edge_id,
                seq,
                message.id,
                message.room,
                peer,
                *self.core.room_order(client, message.room),
            )
            self.core.await_answer(client, seq, command, time.monotonic())
            if identity.home is not None:
                self.backplane.propose_home(message.room, identity.home)
            self.backplane.to_room_owner(message.room, command)
        elif isinstance(message, Leave):
            seq = client.next_seq()
            command = LeaveCmd(
                client.session,
                client.conn,
                self.edge_id,
                seq,
                message.id,
                message.room,
                *self.core.room_order(client, message.room),
            )
            self.core.await_answer(client, seq, command, time.monotonic())
            self.backplane.to_room_owner(message.room, command)
        elif isinstance(message, Ping):
            self._write([client], encode_frame(PongFrame(id=message.id)))
        elif isinstance(message, Watch):
            if len(client.watching | set(message.users)) > self.settings.max_watch:
                raise TooLarge(f"at most {self.settings.max_watch} users may be watched")
            client.watching.update(message.users)
            seq = client.next_seq()
            watch = WatchCmd(
                client.session, client.conn, self.edge_id, seq, message.id, list(message.users)
            )
            self.core.await_answer(client, seq, watch, time.monotonic())
            self.backplane.to_presence(client.identity.user, watch)
        elif isinstance(message, Unwatch):
            client.watching.difference_update(message.users)
            seq = client.next_seq()
            unwatch = UnwatchCmd(
                client.session, client.conn, self.edge_id, seq, message.id, list(message.users)
            )
            self.core.await_answer(client, seq, unwatch, time.monotonic())
            self.backplane.to_presence(client.identity.user, unwatch)
        elif isinstance(message, IceServersRequest):
            servers = self._ice_servers(client.identity.user, time.time())
            self._write([client], encode_frame(IceServersFrame(ice_servers=servers, id=message.id)))
        else:
            raise BadRequest("already authenticated: hello is only valid as the first frame")

    def _closed(self, client: ClientConnection) -> None:
        self.core.closed(client)
        if client.evicted:
            return  # the session lives on in another connection
        if self.sessions.get(client.session) is client:
            del self.sessions[client.session]
        # A client's own close 1000 ends the session; anything else may still resume.
        close_rcvd = client.link.protocol.close_rcvd
        ended = close_rcvd is not None and close_rcvd.code == CloseCode.NORMAL
        if client.guard.close_code is not None:
            ended = True  # closed for abuse: no resume
        detach = DetachCmd(client.session, client.conn, self.edge_id, ended)
        # (another region's brokers only for the rooms it used there)
        self.backplane.to_all_brokers(detach, client.room_seqs.keys() | client.rooms.keys())
        self.backplane.to_presence(
            client.identity.user, SessionDown(client.session, self.edge_id, client.conn, ended)
        )


_RATE_LIMITED = RateLimited("too many frames; slow down")
_ROOM_CLOSED: Final = b'{"type":"room-closed"'  # a server API close (``edge.server_api``)
#: ``(rseq, rbase)`` of requests in one process: nothing can overtake them (``room_order``).
_UNORDERED: Final = (0, 0)
_DROPPED = {None: "unknown_room", DUPLICATE: "duplicate", GAP: "gap", OTHER_EPOCH: "other_epoch"}
_INTERNAL = InternalError("internal error; the request was not served")


def _admission(settings: Settings) -> Admission:
    return Admission(
        max_per_ip=settings.max_connections_per_ip,
        max_per_user=settings.max_sessions_per_user,
        rate=settings.accept_rate,
        burst=settings.accept_burst,
        resume_share=settings.accept_resume_share,
        cap_retry_after=settings.cap_retry_after,
        exempt=exempt_addresses(settings.connection_cap_exempt),
    )


def _error(exc: ProtocolError, request_id: RequestId | None) -> bytes:
    return encode_frame(ErrorFrame(code=exc.code, message=exc.message, id=request_id))


def _frame_id(frame: bytes) -> RequestId | None:
    """The id of a frame refused before it was served, so the error can echo it."""
    try:
        return decode_client(frame).id
    except ProtocolError as exc:
        return request_id_of(exc)


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def _edges_response(status: HTTPStatus, body: bytes) -> Response:
    """A ``/v1/edges`` answer: public, cacheable briefly, readable from any origin."""
    cache = f"max-age={EDGES_MAX_AGE}" if status == HTTPStatus.OK else "no-store"
    headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", cache),
            ("Access-Control-Allow-Origin", "*"),
        ]
    )
    if status == HTTPStatus.TOO_MANY_REQUESTS:
        headers["Retry-After"] = "1"
    return Response(status.value, status.phrase, headers, body)


def _static(path: str) -> Response:
    name = "index.html" if path in ("/", "/index.html") else PurePosixPath(path).name
    if path not in ("/", "/index.html") and not path.startswith("/static/"):
        return _response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
    asset = resources.files("signalpost").joinpath("static", name)
    if not name or name.startswith(".") or not asset.is_file():
        return _response(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if content_type.startswith("text/") or content_type.endswith("javascript"):
        content_type += "; charset=utf-8"
    return _response(HTTPStatus.OK, asset.read_bytes(), content_type)
