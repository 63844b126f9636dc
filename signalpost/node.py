"""The shell shared by owner nodes (broker, presence): a ROUTER, a core, a timer, a lifecycle,
and the links to the other nodes of the same tier.

An owner core is sans-I/O: ``handle(command, now)``, ``expire(now)`` and
``edge_lost(edge, now)`` each return ``(edge id, envelope)`` pairs; this shell feeds it
from the ROUTER and writes what it returns back out, in order.

Peers: every owner node opens a DEALER to every other node of its tier (``update_peers``):
the nodes configured or registered in Consul (``discovering``) and, with Consul, every
member of the tier's newest view (``TierMembership``). What goes to a peer over that link
(replication, subscriptions) is the subclass's; so is what a peer's coming, going or
restart means (``_peer_up``, ``_peers_changed``).
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
from signalpost.lifecycle import spawn
from signalpost.node_keys import node_keys
from signalpost.ownership import Tier, TierMembership, View
from signalpost.tickets import seat_tickets
from signalpost.transport import DealerLink, RouterEndpoint, new_incarnation, refused_sender
from signalpost.webhook_sender import WebhookSender
from signalpost.webhooks import Webhooks
from signalpost.wire import (
    ADDRESSED,
    SENDER_KINDS,
    Envelope,
    HookAck,
    HookCopy,
    encode_envelope,
    sender_of,
)

log = logging.getLogger("signalpost.node")

Outbound = tuple[str, Envelope]

#: How often an owner checks suspensions and history age.
EXPIRY_TICK = 0.25


class OwnerCore(Protocol):
    def handle(self, command: Envelope, now: float) -> list[Outbound]: ...

    def expire(self, now: float) -> list[Outbound]: ...

    def edge_lost(self, edge: str, now: float) -> list[Outbound]: ...


class OwnerNode:
    """Runs one owner core behind a ROUTER socket, linked to the other nodes of its tier."""

    #: The tier whose view and members this node keeps in Consul (set by subclasses).
    tier: Tier
    #: Its identity among its peers: its endpoint as others dial it.
    placement_id: str

    def __init__(self, settings: Settings, kind: str, core: OwnerCore, bind: str) -> None:
        self.kind = kind
        self.node_id = settings.node_id or f"{kind}-{secrets.token_hex(4)}"
        self.core = core
        self.keys = node_keys(settings)  # raises ConfigError before any socket exists
        #: Seat tickets: presence issues them with a resume's grant, brokers check them.
        self.tickets = seat_tickets(settings, self.keys is not None)
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
            accepts=SENDER_KINDS[kind],
            addressed=ADDRESSED.get(kind, frozenset()),
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
        # Peers: placement id -> link; the ones configured or found in Consul; with Consul,
        # the tier's newest view (None: none read yet) and this node's part in it.
        self.peers: dict[str, DealerLink] = {}
        self._discovered: list[str] = []
        self._by_view = settings.consul_addr is not None
        self._view: View | None = None
        self._membership: TierMembership | None = None
        self._incarnation = new_incarnation()
        self._running = False  # links are started once the router is up
        #: Webhooks (``webhook_urls`` set): the subclass makes the core and its sender.
        self.webhooks: Webhooks | None = None
        self.webhook_sender: WebhookSender | None = None

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
        if type(envelope) is HookCopy:  # a peer's webhook events, kept for a takeover
            if self.webhooks is not None:
                self._send(self.webhooks.copied(envelope))
            return
        self._send(self.core.handle(envelope, self._clock()))

    def _on_edge_lost(self, edge: str) -> None:
        metrics.PEERS_LOST.inc()
        self._send(self.core.edge_lost(edge, self._clock()))

    # ----------------------------------------------------------------- peers

    def _from_peer(self, envelope: Envelope) -> None:
        """An envelope from a peer over this node's own link to it."""
        if type(envelope) is HookAck:
            if self.webhooks is not None and self.webhook_sender is not None:
                self._send(self.webhooks.acked(envelope))  # what waited for the copy
                self.webhook_sender.poke()
            return
        self._send(self.core.handle(envelope, self._clock()))

    def _peers_changed(self, *_link: object) -> None:
        """Hook: a peer came, went, or changed liveness."""

    def _peer_up(self, link: DealerLink, fresh: bool) -> None:
        """Hook: a peer is heard (``fresh``: first heard, or it restarted)."""
        self._peers_changed()

    def _view_changed(self, view: View) -> None:
        """Hook: a newer view of the tier was read from Consul (subclasses act, then call
        ``update_peers``)."""
        self._view = view
        self.update_peers(self._discovered)

    def update_peers(self, endpoints: list[str]) -> None:
        """Make the peer set ``endpoints`` (other nodes' placement ids; with Consul, also
        every member of the view): open links to new ones, close those gone."""
        wanted = {e for e in endpoints if e != self.placement_id}
        if self._view is not None:
            wanted |= {m for m in self._view.members if m != self.placement_id}
        for endpoint in list(self.peers):
            if endpoint not in wanted:
                link = self.peers.pop(endpoint)
                asyncio.get_running_loop().create_task(link.close())
        for endpoint in sorted(wanted - self.peers.keys()):
            link = DealerLink(
                self._context,
                endpoint,
                self.placement_id,
                self._incarnation,
                on_envelope=self._from_peer,
                on_up=self._peer_up,
                on_down=self._peers_changed,
                heartbeat_interval=self.settings.heartbeat_interval,
                peer_expiry=self.settings.peer_expiry,
                keys=self.keys,
                max_message=self.settings.max_node_message,
                server_kind=self.kind,
            )
            self.peers[endpoint] = link
            if self._running:
                link.start()
        self._peers_changed()

    async def started(self) -> None:
        """Hook: the router is up: link to the configured peers (subclasses extend)."""
        self._running = True
        if self.webhook_sender is not None:
            await self.webhook_sender.start()
        self.update_peers(self._discovered)

    def discovering(self, discovery: Discovery) -> None:
        """Consul is configured: watch the tier's registered nodes, keep its view."""

        def discovered(members: dict[str, str]) -> None:
            self._discovered = list(members.values())
            self.update_peers(self._discovered)

        discovery.watch(self.kind, discovered)
        assert self.settings.consul_addr is not None
        self._membership = TierMembership(
            self.settings.consul_addr,
            self.tier,
            self.placement_id,
            self.node_id,
            self._view_changed,
            registered=lambda: self._discovered,
            token=self.settings.consul_token,
        )
        self._membership.start()

    async def draining(self) -> None:
        """Hook: asked to stop (SIGTERM); hand over what this node serves."""

    async def stopping(self) -> None:
        """The node is about to close its router: leave Consul's view keeping, close links."""
        if self._membership is not None:
            await self._membership.close()
        if self.webhook_sender is not None:
            await self.webhook_sender.close()
        for link in self.peers.values():
            await link.close()

    def expired(self) -> None:
        """Hook: called after every expiry tick (export a core's counters here)."""

    async def _register(self) -> None:
        address = self.settings.consul_addr
        if not address:
            return
        self.health = HealthServer(self.settings.host, self.settings.health_port)
        await self.health.start()
        check_url = f"http://{self.settings.advertised_host}:{self.health.port}/healthz"
        registration = Registration(
            self.kind,
            self.node_id,
            self.endpoint,
            check_url,
            region=self.settings.region,
            wan_endpoint=self.settings.wan_advertise or "",
        )
        self.discovery = Discovery(address, registration, self.settings.consul_token)
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
            ticker = spawn(self._expiry_loop(), f"{self.kind}-expiry")
            await self.started()
            await self._register()
            # The launcher reads the metrics address here (the health port may be picked).
            metrics_at = "" if self.health is None else f", metrics {self.health.metrics_url}"
            print(
                f"signalpost {self.kind} {self.node_id} ready on {self.endpoint}{metrics_at}",
                flush=True,
            )
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
            try:
                self._send(self.core.expire(self._clock()))
                self.expired()
            except Exception:  # the next tick must still come
                log.exception("%s expiry tick failed", self.kind)
