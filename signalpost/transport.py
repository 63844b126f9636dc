"""Node links over ZeroMQ: one ROUTER per owner node, one DEALER per edge and owner.

Frame layout (defined once, ``frame``/``unframe``): a DEALER sends one frame,
``WIRE_VERSION + batch``; the ROUTER sees ``[peer identity, WIRE_VERSION + batch]`` and
answers the same way. ``batch`` is a msgpack array of encoded envelopes
(``signalpost.wire.batch_header`` + body 1 + ... + body n). A DEALER's identity is its
node id, so an owner addresses an edge by the id the edge put in its commands.

Envelopes are batched per peer per event loop iteration (``Outbox``): sends queue encoded
bodies, and one ``call_soon`` callback per endpoint sends each peer's queue as one frame
(split past ``BATCH_MAX_ENVELOPES`` or ``BATCH_MAX_BYTES``), so a burst costs one ZeroMQ
send, one receive and one msgpack decode call per peer instead of one per envelope. Every
envelope, heartbeats included, goes through the batch, so each peer sees them in the
order they were sent. A frame of another version or layout is dropped; a frame with one
undecodable envelope loses only that one.

Heartbeats go both ways every ``heartbeat_interval``; a peer silent for
``interval x liveness`` is dead (the Majordomo rule). Each node carries an
``incarnation`` that changes when it restarts, so the other side can tell "came back
empty" from "was briefly slow" and re-announce its soft state.

Security (``signalpost.node_keys``): with ``keys``, a ROUTER is a CurveZMQ server whose
context runs a ZAP authenticator admitting only the cluster's node keys, and a DEALER a
CurveZMQ client that dials only an endpoint whose server key the cluster keys directory
names; ``keys=None`` is plaintext (``insecure_node_links``). Every node socket has
``MAXMSGSIZE`` (``max_message``): libzmq drops the connection of a peer that sends a
larger message, before any of it reaches Python; the peer reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import zmq

from signalpost import metrics
from signalpost.lifecycle import cancel_all, spawn
from signalpost.node_keys import (
    HandshakeWatch,
    NodeAuthenticator,
    NodeKeys,
    dial_curve,
    kind_of,
    serve_curve,
    speaks_as,
)
from signalpost.wire import (
    WIRE_VERSION,
    Envelope,
    Heartbeat,
    batch_header,
    decode_batch,
    decode_batch_each,
    encode_envelope,
)

log = logging.getLogger("signalpost.transport")

HIGH_WATER_MARK = 200_000

#: Work units (envelopes) handled per wake-up before yielding to the event loop (fairness).
#: Whole frames only: a wake-up handles at least one frame, however many envelopes it holds.
DRAIN_BATCH = 512

#: Most envelopes, and most bytes of envelopes, in one frame; a longer queue for one peer
#: goes out as several frames, in order. An envelope over the byte cap travels alone.
BATCH_MAX_ENVELOPES: Final = 1024
BATCH_MAX_BYTES: Final = 1 << 20

# Plain ints: pyzmq's enum flags cost more per call than the send itself.
_NOBLOCK: Final = int(zmq.NOBLOCK)
_MORE_NOBLOCK: Final = int(zmq.SNDMORE | zmq.NOBLOCK)
_EVENTS: Final = int(zmq.EVENTS)
_RCVMORE: Final = int(zmq.RCVMORE)
_POLLIN: Final = int(zmq.POLLIN)
_POLLOUT: Final = int(zmq.POLLOUT)
_VERSION_LENGTH: Final = len(WIRE_VERSION)
_PREFIXES: Final = [WIRE_VERSION + batch_header(n) for n in range(BATCH_MAX_ENVELOPES + 1)]


def frame(bodies: Sequence[bytes]) -> bytes:
    """The one ZeroMQ frame that carries the encoded envelopes ``bodies``, in order."""
    count = len(bodies)
    prefix = (
        _PREFIXES[count] if count <= BATCH_MAX_ENVELOPES else WIRE_VERSION + batch_header(count)
    )
    return b"".join([prefix, *bodies])


def frames_of(bodies: list[bytes]) -> list[bytes]:
    """``bodies`` in as few frames as ``BATCH_MAX_ENVELOPES``/``BATCH_MAX_BYTES`` allow."""
    if len(bodies) <= BATCH_MAX_ENVELOPES:
        payload = frame(bodies)
        if len(payload) <= BATCH_MAX_BYTES or len(bodies) == 1:
            return [payload]
    out: list[bytes] = []
    start = size = 0
    for i, body in enumerate(bodies):
        if i > start and (i - start == BATCH_MAX_ENVELOPES or size + len(body) > BATCH_MAX_BYTES):
            out.append(frame(bodies[start:i]))
            start, size = i, 0
        size += len(body)
    out.append(frame(bodies[start:]))
    return out


def unframe(payload: bytes) -> memoryview | None:
    """The batch (a msgpack array) inside a frame; None when not of this wire version."""
    if not payload.startswith(WIRE_VERSION):
        return None
    return memoryview(payload)[_VERSION_LENGTH:]


def decode_frame(batch: bytes | memoryview, source: str) -> list[Envelope]:
    """The envelopes of a batch, in order; undecodable ones are logged and dropped.

    One decode call for the whole batch; only if it fails, each envelope on its own.
    """
    try:
        return decode_batch(batch)
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        decoded = decode_batch_each(batch)
    except (msgspec.DecodeError, RecursionError) as exc:
        metrics.NODE_FRAMES_DROPPED.labels("frame").inc()
        log.warning("dropping an undecodable frame from %s: %s", source, exc)
        return []
    envelopes: list[Envelope] = []
    for item in decoded:
        if isinstance(item, Exception):
            metrics.NODE_FRAMES_DROPPED.labels("envelope").inc()
            log.warning("dropping an undecodable envelope from %s: %s", source, item)
        else:
            envelopes.append(item)
    return envelopes


class FastSocket:
    """A ZeroMQ socket driven by the event loop without a future per message.

    The loop watches the socket's file descriptor. On each wake-up the socket is drained
    with NOBLOCK until ``zmq.Again`` (at most ``DRAIN_BATCH`` per loop turn, for fairness).
    ZeroMQ's descriptor is edge-triggered and any send can consume the edge, so after each
    send ``ZMQ_EVENTS`` is checked and a drain scheduled if messages wait. Sends go straight
    out; at the high-water mark they wait in a backlog, in order, until the socket takes
    them again. ``on_message`` may return how many work units (envelopes) a message was;
    ``DRAIN_BATCH`` counts those.
    """

    def __init__(self, socket: zmq.Socket[bytes], *, authenticated: bool = False) -> None:
        self._socket = socket
        self._routed = socket.type == zmq.ROUTER  # its messages have an identity part first
        #: A CurveZMQ ROUTER behind ZAP: a message is taken only if its routing id is a name
        #: the sender's key may use (``speaks_as``); identity -> the User-Id that may.
        self._authenticated = authenticated and self._routed
        self._speakers: dict[bytes, str] = {}
        self._backlog: deque[tuple[bytes, ...]] = deque()
        self._on_message: Callable[[list[bytes]], int | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._scheduled = False
        self._servicing = False
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []

    def send(self, frames: tuple[bytes, ...]) -> None:
        if self._backlog or not self._send_now(frames):
            self._backlog.append(frames)
        if not self._servicing:  # a drain in progress looks at the end
            self._look()

    def send_many(self, messages: list[tuple[bytes, ...]]) -> None:
        """``send`` each of ``messages`` in order, checking ``ZMQ_EVENTS`` once at the end."""
        backlog = self._backlog
        for i, frames in enumerate(messages):
            if backlog or not self._send_now(frames):
                backlog.extend(messages[i:])
                break
        if not self._servicing:
            self._look()

    @property
    def usable(self) -> bool:
        """Whether the ZeroMQ socket is still open."""
        return not self._socket.closed

    def _send_now(self, frames: tuple[bytes, ...]) -> bool:
        send = self._socket.send
        try:
            # Multipart messages are atomic: only the first part can meet the HWM.
            for part in frames[:-1]:
                send(part, _MORE_NOBLOCK)
            send(frames[-1], _NOBLOCK)
        except zmq.Again:
            if self._routed:
                # A ROUTER (ROUTER_MANDATORY) says this one peer's pipe is full: waiting
                # would stall every other peer behind it. Dropped and counted; the
                # delivery streams resend what the peer does not confirm.
                _dropped(frames, "full")
                return True
            return False
        except zmq.ZMQError as exc:
            if self._routed and exc.errno == zmq.EHOSTUNREACH:
                _dropped(frames, "unknown_peer")  # not connected (now): counted, resent later
                return True
            raise
        return True

    def start(
        self,
        name: str,
        on_message: Callable[[list[bytes]], int | None],
        heartbeat: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        """Feed every received message to ``on_message``; run ``heartbeat`` beside it."""
        self._loop = asyncio.get_running_loop()
        self._on_message = on_message
        fd = self._fd = int(self._socket.getsockopt(zmq.FD))
        self._loop.add_reader(fd, self._service)
        self._schedule()  # messages may already be waiting
        self._tasks = [spawn(heartbeat(), f"{name} heartbeat")]

    async def close(self) -> None:
        """Stop and close the socket."""
        self._closed = True
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
        await cancel_all(self._tasks)
        self._socket.close(linger=0)

    def _look(self) -> None:
        if self._on_message is None or self._scheduled or self._closed:
            return
        events = int(self._socket.getsockopt(_EVENTS))
        if events & _POLLIN or (self._backlog and events & _POLLOUT):
            self._schedule()

    def _speaks_as(self, identity: bytes, body: zmq.Frame) -> bool:
        """Whether the node that sent ``body`` (its key's ZAP User-Id) may use the routing
        id ``identity``: a node admitted to the cluster still cannot send as another."""
        try:
            user_id = body.get("User-Id")
        except zmq.ZMQError:
            user_id = ""
        if self._speakers.get(identity) == user_id:
            return True
        if isinstance(user_id, str) and speaks_as(user_id, identity.decode(errors="replace")):
            if len(self._speakers) >= MAX_SPEAKERS:
                self._speakers.clear()
            self._speakers[identity] = user_id
            return True
        _dropped_from(identity, "identity", f"its key is {user_id or 'unnamed'}")
        return False

    def kind_of(self, identity: bytes) -> str | None:
        """The kind of node (its key's) that sent the message being handled from
        ``identity``; None without authentication (plaintext links: not known)."""
        if not self._authenticated:
            return None
        return kind_of(self._speakers.get(identity, ""))

    def _schedule(self) -> None:
        assert self._loop is not None
        self._scheduled = True
        self._loop.call_soon(self._service)

    def _service(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        backlog = self._backlog
        while backlog and self._send_now(backlog[0]):
            backlog.popleft()
        on_message = self._on_message
        assert on_message is not None
        # Not recv_multipart: its RCVMORE check after every part costs more than a recv
        # (pyzmq looks the option up as an enum). A ROUTER's message always has an identity
        # and a body, so only the parts after those need the check.
        recv, get, routed = self._socket.recv, self._socket.get, self._routed
        self._servicing = True
        budget = DRAIN_BATCH
        try:
            while budget > 0:
                try:
                    first = recv(_NOBLOCK)
                except zmq.Again:
                    break
                # The rest of a message is there once its first part is.
                if self._authenticated:
                    body = recv(_NOBLOCK, copy=False)
                    frames = [first, body.bytes]
                    if not self._speaks_as(first, body):
                        while get(_RCVMORE):
                            recv(_NOBLOCK)
                        continue
                else:
                    frames = [first, recv(_NOBLOCK)] if routed else [first]
                while get(_RCVMORE):
                    frames.append(recv(_NOBLOCK))
                budget -= on_message(frames) or 1
            else:
                self._schedule()  # more may wait: go on after other callbacks had a turn
                return
        finally:
            self._servicing = False
        self._look()


#: Routing ids a ROUTER remembers as checked against their sender's key (then cleared).
MAX_SPEAKERS: Final = 10_000

#: (peer, what) -> when a refused frame was last logged: one line per peer per interval.
_refusals_logged: dict[tuple[bytes, str, str], float] = {}


def refused_sender(peer: str, why: str, what: str = "sender") -> None:
    """An envelope from ``peer`` names another node as its sender (``what``: or its kind of
    node may not send it here, or it is about a session or room its sender does not hold):
    refused (counted in ``signalpost_node_frames_dropped_total{what=...}``, logged once per
    peer, ``what`` and envelope type per 5 s). ``why`` starts with the envelope type."""
    _dropped_from(peer.encode(), what, why)


def _dropped_from(peer: bytes, what: str, why: str) -> None:
    """A frame from ``peer`` refused for its sender (counted; logged once per 5 s per
    peer, ``what`` and first word of ``why``: the envelope type, when it names one)."""
    metrics.NODE_FRAMES_DROPPED.labels(what).inc()
    key, now = (peer, what, why.partition(" ")[0]), time.monotonic()
    if now - _refusals_logged.get(key, -_DROP_LOG_INTERVAL) >= _DROP_LOG_INTERVAL:
        if len(_refusals_logged) >= 10_000:
            _refusals_logged.clear()
        _refusals_logged[key] = now
        log.warning(
            "refused frames from node %s (%s): %s (counted in "
            "signalpost_node_frames_dropped_total)",
            peer.decode(errors="replace"),
            what,
            why,
        )


#: (peer, reason) -> when a drop was last logged: one line per peer per interval.
_drops_logged: dict[tuple[bytes, str], float] = {}
_DROP_LOG_INTERVAL: Final = 5.0


def _dropped(frames: tuple[bytes, ...], reason: str) -> None:
    metrics.NODE_SEND_DROPS.labels(reason).inc()
    key, now = (frames[0], reason), time.monotonic()
    if now - _drops_logged.get(key, -_DROP_LOG_INTERVAL) >= _DROP_LOG_INTERVAL:
        if len(_drops_logged) >= 10_000:
            _drops_logged.clear()
        _drops_logged[key] = now
        log.warning(
            "dropping frames for %s: %s (counted in signalpost_node_send_drops_total)",
            frames[0].decode(errors="replace"),
            reason.replace("_", " "),
        )


class Outbox:
    """Encoded envelopes queued per peer until the end of this event loop iteration.

    The first ``put`` of an iteration schedules one ``flush`` (``loop.call_soon``) for
    all peers; it sends each peer's queue as one frame (more past the caps), oldest first,
    through ``FastSocket.send_many``, whose backlog keeps that order at the high-water
    mark. ``routed`` (a ROUTER) puts the peer identity before each frame; a DEALER has one
    peer, and its key is ignored.
    """

    def __init__(self, socket: FastSocket, *, routed: bool) -> None:
        self._socket = socket
        self._routed = routed
        self._pending: dict[str, list[bytes]] = {}
        self._scheduled = False
        self._closed = False

    def put(self, peer: str, body: bytes) -> None:
        """Queue the encoded envelope ``body`` for ``peer``."""
        if self._closed:
            log.debug("dropping an envelope for %s: the link is closed", peer)
            return
        bodies = self._pending.get(peer)
        if bodies is None:
            self._pending[peer] = [body]
        else:
            bodies.append(body)
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop yet: flushed at start, by a later put, or close()
                return
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send everything queued now, one frame per peer (more past the caps)."""
        self._scheduled = False
        pending = self._pending
        if not pending:
            return
        self._pending = {}
        if not self._socket.usable:
            log.debug("dropping envelopes for %d peers: the socket is closed", len(pending))
            return
        messages: list[tuple[bytes, ...]] = []
        append = messages.append
        if self._routed:
            for peer, bodies in pending.items():
                identity = peer.encode()
                for payload in frames_of(bodies):
                    append((identity, payload))
        else:
            for bodies in pending.values():
                for payload in frames_of(bodies):
                    append((payload,))
        self._socket.send_many(messages)

    def close(self) -> None:
        """Send what is queued now (while the socket is open); drop later puts."""
        self.flush()
        self._closed = True


def new_incarnation() -> str:
    """A fresh id for this run of a node."""
    return secrets.token_hex(6)


@dataclass(slots=True)
class PeerState:
    """What a link knows of the node at its other end."""

    node: str
    incarnation: str
    last_seen: float
    #: The incarnation of this node its last heartbeat named ("": none it had heard).
    named: str = ""


class RouterEndpoint:
    """The owner side: binds, receives from many edges, answers each by identity."""

    def __init__(
        self,
        context: zmq.Context[Any],
        bind: str,
        node_id: str,
        *,
        on_envelope: Callable[[str, Envelope], None],
        on_peer_lost: Callable[[str], None],
        on_peer_restarted: Callable[[str], None],
        heartbeat_interval: float,
        peer_expiry: float,
        keys: NodeKeys | None,
        max_message: int,
        accepts: dict[type, frozenset[str]] | None = None,
        addressed: frozenset[type] = frozenset(),
    ) -> None:
        self.node_id = node_id
        self.incarnation = new_incarnation()
        #: Envelope types taken only from a peer whose last heartbeat named this
        #: incarnation or none (``wire.ADDRESSED``).
        self._addressed = addressed
        #: Envelope type -> the kinds of node it is taken from (``wire.SENDER_KINDS``);
        #: None: any (and with plaintext links kinds are unknown: any).
        self._accepts = accepts
        self.peers: dict[str, PeerState] = {}
        # The ZAP handler must be up before the bind: without one, libzmq admits any
        # CurveZMQ client that knows the server key.
        self._authenticator: NodeAuthenticator | None = None
        if keys is not None:
            self._authenticator = NodeAuthenticator(context, keys.cluster_dir)
            self._authenticator.start()
        socket = context.socket(zmq.ROUTER)
        if keys is not None:
            serve_curve(socket, keys)
        socket.setsockopt(zmq.MAXMSGSIZE, max_message)
        socket.setsockopt(zmq.LINGER, 0)
        # Report a message for a peer that is not connected (EHOSTUNREACH) or whose pipe
        # is full (EAGAIN) instead of dropping it silently: FastSocket counts and logs it.
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        socket.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        socket.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        try:
            socket.bind(bind)
        except zmq.ZMQError:  # (the address is taken): nothing left open behind
            socket.close(linger=0)
            if self._authenticator is not None:
                self._authenticator.stop()
            raise
        self.endpoint: str = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._watch = None if keys is None else HandshakeWatch(socket, self.endpoint, server=True)
        self._socket = FastSocket(socket, authenticated=keys is not None)
        self._outbox = Outbox(self._socket, routed=True)
        #: Queue an already-encoded envelope for a peer (sent at the end of this iteration).
        self.send_body: Callable[[str, bytes], None] = self._outbox.put
        self._on_envelope = on_envelope
        self._on_peer_lost = on_peer_lost
        self._on_peer_restarted = on_peer_restarted
        self._interval = heartbeat_interval
        self._expiry = peer_expiry
        self._heartbeat = encode_envelope(Heartbeat(node_id, self.incarnation))

    def send(self, peer: str, envelope: Envelope) -> None:
        """Queue ``envelope`` for ``peer``; dropped if the peer is unknown to ZeroMQ."""
        self.send_body(peer, encode_envelope(envelope))

    async def __aenter__(self) -> RouterEndpoint:
        self._socket.start("router", self._receive, self._heartbeat_loop)
        if self._watch is not None:
            self._watch.start()
        self._outbox.flush()  # anything queued before there was a loop
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._outbox.close()
        if self._watch is not None:
            self._watch.close()
        await self._socket.close()
        if self._authenticator is not None:
            self._authenticator.stop()

    def _receive(self, frames: list[bytes]) -> int:
        batch = unframe(frames[1]) if len(frames) == 2 else None
        if batch is None:
            log.warning("dropping a message with a bad frame layout")
            return 0
        peer = frames[0].decode(errors="replace")
        envelopes = decode_frame(batch, peer)
        now = time.monotonic()
        on_envelope = self._on_envelope
        accepts = self._accepts
        kind = None if accepts is None else self._socket.kind_of(frames[0])
        addressed = self._addressed
        by_peer: bool | None = None  # whether ``peer`` addressed this run (asked once)
        for envelope in envelopes:
            if isinstance(envelope, Heartbeat):
                self._heartbeat_from(peer, envelope, now)
                by_peer = None
                continue
            if kind is not None:
                assert accepts is not None
                allowed = accepts.get(type(envelope))
                if allowed is None or kind not in allowed:
                    refused_sender(
                        peer,
                        f"{type(envelope).__name__} from a node of kind {kind!r}: taken "
                        f"here only from {' or '.join(sorted(allowed or ('nobody',)))}",
                        "kind",
                    )
                    continue
            if addressed and type(envelope) in addressed:
                if by_peer is None:
                    by_peer = self._addressed_by(peer)
                if not by_peer:
                    _dropped_from(
                        frames[0],
                        "stale_incarnation",
                        f"{type(envelope).__name__} from a node not heard since this one "
                        "started (or took it for lost), or that names an earlier run of "
                        "this one (it resends it)",
                    )
                    continue
            try:
                on_envelope(peer, envelope)
            except Exception:  # one bad command must not stop the node
                log.exception("handling an envelope from %s failed", peer)
        state = self.peers.get(peer)  # once per frame: every envelope is a sign of life
        if state is not None:
            state.last_seen = now
        return len(envelopes)

    def _addressed_by(self, peer: str) -> bool:
        """Whether ``peer`` heartbeated since this node started, naming this run of it or
        none (a peer that never heard of it has nothing queued for an earlier run)."""
        state = self.peers.get(peer)
        return state is not None and state.named in ("", self.incarnation)

    def _heartbeat_from(self, peer: str, heartbeat: Heartbeat, now: float) -> None:
        state = self.peers.get(peer)
        if state is not None:
            state.named = heartbeat.peer
        if state is not None and state.incarnation != heartbeat.incarnation:
            log.info("peer %s restarted", peer)
            try:
                self._on_peer_restarted(peer)
            except Exception:  # the rest of the batch must still be read
                log.exception("handling %s restarting failed", peer)
        if state is None or state.incarnation != heartbeat.incarnation:
            self.peers[peer] = PeerState(heartbeat.node, heartbeat.incarnation, now, heartbeat.peer)
            self.send_body(peer, self._heartbeat)  # answer at once: faster discovery

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            now = time.monotonic()
            for peer, state in list(self.peers.items()):
                if now - state.last_seen > self._expiry:
                    del self.peers[peer]
                    log.warning("peer %s missed its heartbeats; declaring it lost", peer)
                    try:
                        self._on_peer_lost(peer)
                    except Exception:  # an escaped error would end this loop, silently,
                        # and every peer would see this node go quiet
                        log.exception("handling %s lost failed", peer)
                else:
                    self.send_body(peer, self._heartbeat)


class DealerLink:
    """The edge side of one link: connects to an owner node and watches its heartbeats."""

    def __init__(
        self,
        context: zmq.Context[Any],
        endpoint: str,
        node_id: str,
        incarnation: str,
        *,
        on_envelope: Callable[[Envelope], None],
        on_up: Callable[[DealerLink, bool], None],
        on_down: Callable[[DealerLink], None],
        heartbeat_interval: float,
        peer_expiry: float,
        keys: NodeKeys | None,
        max_message: int,
        dial: str | None = None,
        server_kind: str | None = None,
    ) -> None:
        # ``endpoint`` names the node (its placement id, its server key); ``dial`` is where
        # to connect when that differs (another region's node behind its WAN address).
        self.endpoint = endpoint
        self.remote: PeerState | None = None
        self.alive = False
        socket = context.socket(zmq.DEALER)
        #: False when no trusted key names ``endpoint`` (or, with ``server_kind``, the key
        #: that does is another kind of node's): the link is never opened (logged).
        self.dialled = keys is None or dial_curve(socket, keys, endpoint, server_kind)
        socket.setsockopt(zmq.MAXMSGSIZE, max_message)
        socket.setsockopt(zmq.IDENTITY, node_id.encode())
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        socket.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        socket.setsockopt(zmq.RECONNECT_IVL, 100)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self._watch = (
            HandshakeWatch(socket, endpoint, server=False)
            if keys is not None and self.dialled
            else None
        )
        if self.dialled:
            socket.connect(dial or endpoint)
        self._socket = FastSocket(socket)
        self._outbox = Outbox(self._socket, routed=False)
        self._on_envelope = on_envelope
        self._on_up = on_up
        self._on_down = on_down
        self._interval = heartbeat_interval
        self._expiry = peer_expiry
        self._node_id, self._incarnation = node_id, incarnation
        self._heartbeat = encode_envelope(Heartbeat(node_id, incarnation))

    def send(self, envelope: Envelope) -> None:
        """Queue ``envelope`` for the owner (ZeroMQ buffers it while reconnecting).

        Sent at the end of this event loop iteration, batched with the others. Dropped
        when the link was not dialled (no trusted server key): nothing would take it.
        """
        if self.dialled:
            self._outbox.put("", encode_envelope(envelope))

    def start(self) -> None:
        """Start receiving and heartbeating (a link that was not dialled stays idle)."""
        if not self.dialled:
            return
        self._outbox.put("", self._heartbeat)
        self._socket.start(f"dealer {self.endpoint}", self._receive, self._heartbeat_loop)
        if self._watch is not None:
            self._watch.start()

    async def close(self) -> None:
        """Send what is queued, then stop and close the socket."""
        self._outbox.close()
        if self._watch is not None:
            self._watch.close()
        await self._socket.close()

    def _receive(self, frames: list[bytes]) -> int:
        batch = unframe(frames[0]) if len(frames) == 1 else None
        if batch is None:
            log.warning("dropping a message with a bad frame layout from %s", self.endpoint)
            return 0
        envelopes = decode_frame(batch, self.endpoint)
        now = time.monotonic()
        on_envelope = self._on_envelope
        for envelope in envelopes:
            if isinstance(envelope, Heartbeat):
                self._heartbeat_from(envelope, now)
                continue
            try:
                on_envelope(envelope)
            except Exception:  # one bad envelope must not stop the edge
                log.exception("handling an envelope from %s failed", self.endpoint)
        if self.remote is not None:  # once per frame: every envelope is a sign of life
            self.remote.last_seen = now
        return len(envelopes)

    def _heartbeat_from(self, heartbeat: Heartbeat, now: float) -> None:
        previous = self.remote
        self.remote = PeerState(heartbeat.node, heartbeat.incarnation, now)
        if previous is None or previous.incarnation != heartbeat.incarnation:
            # Name this run of the node at once, ahead of what ``on_up`` sends it (the
            # re-announcements, then the resends): it takes requests only after that.
            self._heartbeat = encode_envelope(
                Heartbeat(self._node_id, self._incarnation, heartbeat.incarnation)
            )
            self._outbox.put("", self._heartbeat)
        if not self.alive or previous is None or previous.incarnation != heartbeat.incarnation:
            restarted = previous is not None and previous.incarnation != heartbeat.incarnation
            self.alive = True
            try:
                self._on_up(self, restarted or previous is None)
            except Exception:  # the link must go on: the rest of the batch, the next beats
                log.exception("handling %s coming up failed", self.endpoint)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self._outbox.put("", self._heartbeat)
            remote = self.remote
            if (
                self.alive
                and remote is not None
                and time.monotonic() - remote.last_seen > (self._expiry)
            ):
                self.alive = False
                log.warning("%s missed its heartbeats; marking it down", self.endpoint)
                try:
                    self._on_down(self)
                except Exception:  # an escaped error would end this loop, silently:
                    # no more heartbeats, and the link never seen down again
                    log.exception("handling %s going down failed", self.endpoint)
