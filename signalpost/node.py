"""The shell shared by owner nodes (broker, presence): a ROUTER, a core, a timer, a lifecycle.

An owner core is sans-I/O: ``handle(command, now)``, ``expire(now)`` and
``edge_lost(edge, now)`` each return ``(edge id, envelope)`` pairs; this shell feeds it
from the ROUTER and writes what it returns back out, in order.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import zmq

from signalpost import metrics
from signalpost.config import Settings
from signalpost.discovery import Discovery, Registration
from signalpost.health import HealthServer
from signalpost.node_keys import node_keys
from signalpost.transport import RouterEndpoint, refused_sender
from signalpost.wire import Envelope, encode_envelope, sender_of

log = logging.getLogger("signalpost.node")

Outbound = tuple[str, Envelope]

#: How often an owner checks suspensions and history age.
EXPIRY_TICK = 0.25


class OwnerCore(Protocol):
    def handle(self, command: Envelope, now: float) -> list[Outbound]: ...

    def expire(self, now: float) -> list[Outbound]: ...

    def edge_lost(self, edge: str, now: float) -> list[Outbound]: ...


class OwnerNode:
    """Runs one owner core behind a ROUTER socket."""

    def __init__(self, settings: Settings, kind: str, core: OwnerCore, bind: str) -> None:
        self.kind = kind
        self.node_id = settings.node_id or f"{kind}-{secrets.token_hex(4)}"
        self.core = core
        self.keys = node_keys(settings)  # raises ConfigError before any socket exists
        self._context = zmq.Context()
        self._clock = time.monotonic
        self.settings = settings
        self.router = RouterEndpoint(
            self._context,
            bind,
            self.node_id,
            on_envelope=self._on_envelope,
            on_peer_lost=self._on_edge_lost,
            on_peer_restarted=self._on_edge_lost,
            heartbeat_interval=settings.heartbeat_interval,
            peer_expiry=settings.peer_expiry,
            keys=self.keys,
            max_message=settings.max_node_message,
        )
        self._kind = kind
        dialled = settings.dialable(bind)
        if dialled != bind and not settings.advertise_host:
            log.warning(
                "%s binds %s but advertise_host is not set: other nodes are told to dial %s",
                kind,
                bind,
                dialled,
            )
        metrics.HOT.envelopes.setdefault(kind, 0)
        self.discovery: Discovery | None = None
        self.health: HealthServer | None = None

    @property
    def endpoint(self) -> str:
        """The ZeroMQ endpoint other nodes dial (registered in Consul)."""
        return self.settings.dialable(self.router.endpoint)

    def _send(self, outbound: list[Outbound]) -> None:
        send_body = self.router.send_body
        for edge, envelope in outbound:
            send_body(edge, encode_envelope(envelope))

    def _on_envelope(self, peer: str, envelope: Envelope) -> None:
        metrics.HOT.envelopes[self._kind] += 1
        sender = sender_of(envelope)
        if sender is not None and sender != peer:
            # Another node's name: with CurveZMQ the link's routing id is the sender's
            # own (its key says so), so this is a forgery or a bug, never served.
            refused_sender(peer, f"{type(envelope).__name__} names {sender!r}")
            return
        self._send(self.core.handle(envelope, self._clock()))

    def _on_edge_lost(self, edge: str) -> None:
        metrics.PEERS_LOST.inc()
        self._send(self.core.edge_lost(edge, self._clock()))

    async def started(self) -> None:
        """Hook: the router is up (subclasses open more links here)."""

    def discovering(self, discovery: Discovery) -> None:
        """Hook: Consul is configured; subclasses add the watchers they need."""

    async def draining(self) -> None:
        """Hook: asked to stop (SIGTERM); hand over what this node serves."""

    async def stopping(self) -> None:
        """Hook: the node is about to close its router."""

    def expired(self) -> None:
        """Hook: called after every expiry tick (export a core's counters here)."""

    async def _register(self) -> None:
        address = self.settings.consul_addr
        if not address:
            return
        self.health = HealthServer(self.settings.host, self.settings.health_port)
        await self.health.start()
        check_url = f"http://{self.settings.advertised_host}:{self.health.port}/healthz"
        self.discovery = Discovery(
            address,
            Registration(self.kind, self.node_id, self.endpoint, check_url),
            self.settings.consul_token,
        )
        self.discovering(self.discovery)
        await self.discovery.start()

    async def _deregister(self) -> None:
        if self.health is not None:
            self.health.healthy = False
        if self.discovery is not None:
            await self.discovery.close()
        if self.health is not None:
            await self.health.close()

    async def run(self, until: Callable[[], Awaitable[None]]) -> None:
        """Serve until ``until()`` returns."""
        async with self.router:
            ticker = asyncio.create_task(self._expiry_loop(), name=f"{self.kind}-expiry")
            await self.started()
            await self._register()
            print(f"signalpost {self.kind} {self.node_id} ready on {self.endpoint}", flush=True)
            try:
                await until()
                await self.draining()
            finally:
                ticker.cancel()
                await self._deregister()
                await self.stopping()
        self._context.term()

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_TICK)
            self._send(self.core.expire(self._clock()))
            self.expired()
