"""The presence process: a ``PresenceTable`` behind a ZeroMQ ROUTER, one of N presence nodes.

A presence node's placement id is its endpoint as others dial it (what the edges hash).
Users are placed on the presence nodes by rendezvous hashing: with Consul, over the
members of the presence view (``signalpost/presence/view``, ``signalpost.ownership``);
without, over the configured nodes (``presence_endpoint``, comma separated) whose
heartbeats are current, counting every configured one alive for one heartbeat expiry
after start.

Each node opens a DEALER to every other presence node: its subscriptions to users owned
there (``StatusSubscribe``) and the copies of its leases (``LeaseCopy``, to each user's
runner-up) go out on it, and the owner's ``StatusNote``s and the runner-up's
``ReplicaAck``s of copies come back on it (through the other node's ROUTER, addressed to
this node's placement id). The links and the tier's view are ``OwnerNode``'s, shared with
the brokers.

Global presence (``regions`` lists two or more regions, with Consul): the node follows
each other region's presence nodes and view (``signalpost.remote_tier.RemoteTier``,
through its Consul agent, ``?dc=``), dials them at their ``wan_endpoint``, and the table
subscribes there to the regional status of the users it owns and are watched here
(``presence.regional``). Those nodes answer through their ROUTER, to this node's placement
id. With fewer than two regions none of this exists.

SIGTERM: the node leaves the view (Consul) and waits until it has read a view without
itself (bounded by ``drain_timeout``), so the edges re-sync its users to their new owners
while it still answers; then it deregisters and exits.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from presence.hooks import PresenceHooks
from presence.table import Outbound, PresenceTable
from signalpost import metrics
from signalpost.config import Settings
from signalpost.discovery import Discovery
from signalpost.lifecycle import until_stopped
from signalpost.node import OwnerNode
from signalpost.ownership import PRESENCE, View
from signalpost.placement import owner, ranking
from signalpost.remote_tier import RemoteTier
from signalpost.transport import DealerLink, refused_sender
from signalpost.webhook_sender import WebhookSender, webhooks_from
from signalpost.wire import HookCopy, LeaseCopy, StatusSubscribe, encode_envelope

log = logging.getLogger("signalpost.presence")

#: Envelopes that go to another presence node over this node's own link to it (status
#: notes go back through the ROUTER, to the subscriber's identity).
_TO_PEER_TYPES: frozenset[type] = frozenset({StatusSubscribe, LeaseCopy, HookCopy})


def wall_clock_ms() -> int:
    """The status version floor (``PresenceTable(version_floor=...)``): a node that does
    not know a user's status version starts above any an earlier owner gave (clocks agree
    within the time a takeover takes), as brokers start terms from the wall clock."""
    return time.time_ns() // 1_000_000


#: How long a draining node waits for the view that leaves it out, at most (seconds).
DRAIN_VIEW_TIMEOUT = 5.0


class PresenceNode(OwnerNode):
    """One presence node: the users it owns, and links to the other presence nodes."""

    tier = PRESENCE

    def __init__(self, settings: Settings) -> None:
        self.placement_id = settings.dialable(settings.presence_bind)
        self.table = PresenceTable(
            resume_window=settings.resume_window,
            node_id=self.placement_id,
            owner_of=self._owner_of,
            replica_of=self._replica_of,
            # Copy numbers go on from the wall clock (µs): a restarted node's copies are
            # newer than its previous incarnation's, which a runner-up may still hold.
            first_seq=time.time_ns() // 1000,
            version_floor=wall_clock_ms,
            region=settings.region,
            owner_in=self._owner_in,
            regions=settings.regions if settings.consul_addr else (),
        )
        super().__init__(settings, "presence", self.table, settings.presence_bind)
        self.table.refused = functools.partial(refused_sender, what="session")
        self.table.tickets = self.tickets
        self._placing: list[str] = [] if self._by_view else [self.placement_id]
        self._grace_until = float("inf")
        self._discovered = [e for e in settings.presence_endpoints if e != self.placement_id]
        self._draining = False
        self._left = asyncio.Event()  # draining: a view without this node was read
        self._dropped = metrics.CountExport(metrics.PRESENCE_DROPPED)
        self._late_acks = metrics.CountExport(metrics.REPLICA_ACKS_IGNORED.labels("presence"))
        # Global presence: the other regions' presence tiers (region -> followed tier).
        self._regions: dict[str, RemoteTier] = {}
        if settings.webhook_urls:
            self.webhooks = webhooks_from(
                settings, self.placement_id, lambda stream: self._replica_of(stream[5:])
            )
            self.table.hooks = PresenceHooks(self.webhooks, time.time() - self._clock())
            self.webhook_sender = WebhookSender.from_settings(
                self.webhooks, settings, send=self._send, clock=self._clock
            )

    @property
    def endpoint(self) -> str:
        return self.placement_id

    def _owner_of(self, user: str) -> str | None:
        return owner(user, self._placing) if self._placing else None

    def _owner_in(self, region: str, user: str) -> str | None:
        """``user``'s presence owner in another region (None: its view is not known)."""
        remote = self._regions.get(region)
        return None if remote is None else remote.owner_id(user)

    def _replica_of(self, user: str) -> str | None:
        """The runner-up for ``user``: it holds copies of the user's leases."""
        if len(self._placing) < 2:
            return None
        return ranking(user, self._placing)[1]

    # ----------------------------------------------------------------- placement

    def _set_placing(self, placing: list[str]) -> None:
        if placing == self._placing:
            return
        self._placing = placing
        log.info("presence placed on %s", ", ".join(placing) or "nobody")
        self._send(self.table.view_changed(self._clock()))
        if self.webhooks is not None:
            # Users taken over: deliver what their previous owner copied here and may
            # not have delivered; copy what is unacknowledged to the runner-ups now.
            now = self._clock()
            for stream in self.webhooks.shadowed_streams():
                if stream.startswith("user:") and self.table.owns(stream[5:]):
                    self.webhooks.promote(stream, now)
            self._send(self.webhooks.replicas_changed(now))

    def _view_changed(self, view: View) -> None:
        """A newer presence view was read from Consul: place users on its members."""
        self.table.term = view.number
        if self._draining and self.placement_id not in view:
            self._left.set()
        super()._view_changed(view)
        self._set_placing(list(view.members))

    def _peers_changed(self, *_link: object) -> None:
        if self._by_view:
            return  # liveness moves no user: only a new view does
        starting = self._clock() < self._grace_until
        self._set_placing(
            sorted(
                [
                    self.placement_id,
                    *(p for p, link in self.peers.items() if link.alive or starting),
                ]
            )
        )

    def _peer_up(self, link: DealerLink, fresh: bool) -> None:
        if fresh:  # it restarted and forgot everything: subscriptions, copies
            self._send(self.table.peer_restarted(link.endpoint, self._clock()))
        self._peers_changed()

    # ----------------------------------------------------------------- I/O

    def _send(self, outbound: list[Outbound]) -> None:
        if self.webhook_sender is not None:
            self.webhook_sender.poke()  # a command may have queued webhook events
        send_body = self.router.send_body
        for target, envelope in outbound:
            if type(envelope) in _TO_PEER_TYPES:
                link = self.peers.get(target) or self._remote_link(target)
                if link is not None:  # else sent again once the peer is known
                    link.send(envelope)
            else:
                send_body(target, encode_envelope(envelope))

    # ----------------------------------------------------------------- other regions

    def _remote_link(self, target: str) -> DealerLink | None:
        for remote in self._regions.values():
            link = remote.links.get(target)
            if link is not None:
                return link
        return None

    def discovering(self, discovery: Discovery) -> None:
        super().discovering(discovery)
        assert self.settings.consul_addr is not None
        for region in sorted(set(self.settings.regions)):
            if region and region != self.settings.region:
                remote = self._regions[region] = self._follow_region(region)
                remote.follow(discovery, self.settings.consul_addr, self.settings.consul_token)

    def _follow_region(self, region: str) -> RemoteTier:
        log.info("following region %s's presence nodes (global presence)", region)

        def link(node_id: str, address: str) -> DealerLink:
            created = DealerLink(
                self._context,
                node_id,
                self.placement_id,
                self._incarnation,
                on_envelope=self._from_peer,
                on_up=self._remote_up,
                on_down=self._remote_down,
                heartbeat_interval=self.settings.heartbeat_interval,
                peer_expiry=self.settings.peer_expiry,
                keys=self.keys,
                max_message=self.settings.max_node_message,
                dial=address,
            )
            created.start()
            return created

        def changed() -> None:
            self._send(self.table.region_placement_changed(region, self._clock()))

        return RemoteTier(region, "presence", PRESENCE, link, changed)

    def _remote_up(self, link: DealerLink, fresh: bool) -> None:
        log.info("presence %s of another region is up", link.endpoint)
        self._send(self.table.remote_up(link.endpoint, self._clock()))

    def _remote_down(self, link: DealerLink) -> None:
        log.warning("presence %s of another region is down", link.endpoint)
        self.table.remote_down(link.endpoint, self._clock())

    def expired(self) -> None:
        counters = self.table.counters
        self._dropped.update(counters.misrouted + counters.pending_dropped + counters.notes_ignored)
        self._late_acks.update(counters.late_acks)

    # ----------------------------------------------------------------- lifecycle

    async def started(self) -> None:
        self._grace_until = self._clock() + self.settings.peer_expiry
        asyncio.get_running_loop().call_later(self.settings.peer_expiry, self._peers_changed)
        await super().started()

    async def draining(self) -> None:
        """SIGTERM: leave the view and keep answering until the others took over."""
        if self._membership is None:
            return  # static endpoints: the edges' heartbeats move the users
        self._draining = True
        await self._membership.leave()
        try:
            async with asyncio.timeout(DRAIN_VIEW_TIMEOUT):
                await self._left.wait()
        except TimeoutError:
            log.warning("no view without %s read in %.0f s", self.placement_id, DRAIN_VIEW_TIMEOUT)
            return
        # The edges read the same view about when this node did: give their re-sync and
        # the new owners' subscriptions a moment to land before this node stops answering.
        await asyncio.sleep(0.5)

    async def stopping(self) -> None:
        await super().stopping()
        for remote in self._regions.values():
            await remote.close()


async def run_presence(settings: Settings) -> None:
    """Run one presence node until SIGTERM/SIGINT."""
    await PresenceNode(settings).run(until_stopped)
