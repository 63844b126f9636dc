"""The broker process: a ``RoomTable`` behind a ZeroMQ ROUTER, linked to its peer brokers.

A broker's placement id is its endpoint as others dial it (the same string the edges
hash; a wildcard bind host is replaced by ``advertise_host``). It opens a DEALER
to every other broker to replicate room history to each room's runner-up; the runner-up
answers ``ReplicaAck`` through its ROUTER.

Which broker owns a room: with Consul, rendezvous hashing over the brokers of the newest
view read from Consul's consistent KV (``signalpost.ownership``), and a room's term is at
least the number of the view its owner took it in. Without Consul (static endpoints: one
machine, tests), over the brokers whose heartbeats are current, and terms start from the
wall clock: nothing then stops two brokers that cannot hear each other from both serving
a room (the runner-up's term check still refuses the one with the lower term).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from broker.hooks import RoomHooks
from broker.rooms import Outbound, RoomTable
from signalpost import metrics
from signalpost.config import Settings
from signalpost.lifecycle import until_stopped
from signalpost.node import OwnerNode
from signalpost.ownership import BROKERS, View
from signalpost.placement import owner, ranking
from signalpost.transport import refused_sender
from signalpost.webhook_sender import WebhookSender, webhooks_from
from signalpost.wire import (
    Envelope,
    Handoff,
    HandoffRequest,
    HookCopy,
    ReplicateCmd,
    encode_envelope,
)

log = logging.getLogger("signalpost.broker")

#: Envelopes that go to a peer broker over this broker's own link to it.
_TO_PEERS = (ReplicateCmd, HandoffRequest, Handoff, HookCopy)
#: The same as a set of exact types: a set lookup per outbound envelope costs less than an
#: isinstance against a tuple (these classes have no subclasses).
_TO_PEER_TYPES: frozenset[type] = frozenset(_TO_PEERS)


def wall_clock_term() -> int:
    """Without Consul, a room taken afresh starts above any term an earlier incarnation of
    it reached by takeovers (+1 each): milliseconds of the wall clock."""
    return int(time.time() * 1000)


def room_table(settings: Settings, **options: object) -> RoomTable:
    """A RoomTable configured from ``settings``."""
    options.setdefault("new_term", wall_clock_term)
    options.setdefault("rebuild_grace", settings.peer_expiry)
    return RoomTable(
        capacity=settings.room_capacity,
        resume_window=settings.resume_window,
        history_max_events=settings.history_max_events,
        history_max_age=settings.history_max_age,
        new_epoch=lambda: secrets.token_urlsafe(6),
        **options,  # type: ignore[arg-type]
    )


#: Rooms whose runner-up is remembered at once; past that the memo starts over.
_MAX_CACHED_PLACEMENTS = 100_000


class BrokerNode(OwnerNode):
    """A broker: rooms it owns, and links to the brokers that replicate them."""

    tier = BROKERS

    def __init__(self, settings: Settings) -> None:
        # Edges hash what they dial, so the id is the dialable form of the bind address.
        self.placement_id = settings.dialable(settings.broker_bind)
        self.table = room_table(
            settings,
            node_id=self.placement_id,
            replica_for=self._replica_for,
            owns=self._owns,
            handoff_from=self._handoff_from,
            in_view=lambda broker: broker in self._placing(),
            new_term=self._new_term,
            handoff_fences=settings.consul_addr is not None,
            owner_of=self._owner_of if settings.consul_addr is not None else None,
        )
        super().__init__(settings, "broker", self.table, settings.broker_bind)
        # A broker starts with nothing: what it serves is rebuilt from re-announcements.
        self.table.began_serving(self._clock())
        self._deferred = metrics.CountExport(metrics.REQUESTS_DEFERRED)
        self._late_acks = metrics.CountExport(metrics.REPLICA_ACKS_IGNORED.labels("broker"))
        self.table.refused = refused_sender
        self.table.tickets = self.tickets
        self._replicas: dict[str, str | None] = {}  # room -> runner-up, until peers change
        self._live: list[str] = [self.placement_id]  # the brokers this one sees alive
        self._draining = False
        self._grace_until = float("inf")  # until then, peers not heard from count as alive
        # With Consul: the newest view read there decides ownership (None: not read yet,
        # this broker owns nothing); without, ``_live`` does.
        self._discovered = list(settings.broker_endpoints)  # configured, or found in Consul
        if settings.webhook_urls:
            self.webhooks = webhooks_from(
                settings, self.placement_id, lambda stream: self._replica_for(stream[5:])
            )
            self.table.hooks = RoomHooks(self.webhooks, time.time() - self._clock())
            self.webhook_sender = WebhookSender.from_settings(
                self.webhooks, settings, send=self._send, clock=self._clock
            )

    def expired(self) -> None:
        self._deferred.update(self.table.deferred)
        self._late_acks.update(self.table.late_acks)

    def _replica_for(self, room: str) -> str | None:
        # Asked for every batch of room events: hashing the peer set each time showed in
        # profiles, so the answer is kept until a peer comes, goes or changes liveness.
        try:
            return self._replicas[room]
        except KeyError:
            pass
        if self._by_view:
            # The view's runner-up, alive or not: only a view change moves the replica.
            live = list(self._view.members) if self._view is not None else []
        else:
            live = [self.placement_id, *(p for p, link in self.peers.items() if link.alive)]
        replica = next((b for b in ranking(room, live) if b != self.placement_id), None)
        if len(self._replicas) >= _MAX_CACHED_PLACEMENTS:
            self._replicas.clear()
        self._replicas[room] = replica
        return replica

    def _placing(self) -> list[str]:
        """The brokers rooms are placed on, as this broker knows them."""
        if self._by_view:
            return list(self._view.members) if self._view is not None else []
        return self._live

    def _owns(self, room: str) -> bool:
        """Whether this broker owns ``room`` in its own view (never while draining)."""
        placing = self._placing()
        return (
            not self._draining
            and self.placement_id in placing
            and owner(room, placing) == self.placement_id
        )

    def _owner_of(self, room: str) -> str | None:
        """The owner of ``room`` in this broker's view (None: no view yet)."""
        placing = self._placing()
        return owner(room, placing) if placing else None

    def _handoff_from(self, room: str) -> str | None:
        """The broker that owned ``room`` before this one (the owner without it)."""
        others = [b for b in self._placing() if b != self.placement_id]
        return owner(room, others) if others else None

    def _new_term(self) -> int:
        """The lowest term an ownership starting now may have."""
        if self._by_view:
            return self._view.number if self._view is not None else 0
        return wall_clock_term()

    def _view_changed(self, view: View) -> None:
        """A newer view was read from Consul: place rooms on its brokers from now on."""
        was_member = self._view is not None and self.placement_id in self._view
        self._view = view
        if not was_member and self.placement_id in view:
            self.table.began_serving(self._clock())  # rooms with no handoff are rebuilt
        if was_member and self.placement_id not in view:
            # Removed (paused or cut off from Consul past its check): the runner-ups
            # serve these rooms now, from their replicas; what is here is stale.
            for name in [n for n, room in self.table.rooms.items() if room.active]:
                self._send(self.table.demote(name))
        super()._view_changed(view)

    def _send(self, outbound: list[Outbound]) -> None:
        if self.webhook_sender is not None:
            self.webhook_sender.poke()  # a command may have queued webhook events
        send_body = self.router.send_body
        for target, envelope in outbound:
            if type(envelope) in _TO_PEER_TYPES:
                link = self.peers.get(target)
                if link is not None:  # else resent (or asked again) once the peer is known
                    link.send(envelope)
            else:
                send_body(target, encode_envelope(envelope))

    def _on_envelope(self, peer: str, envelope: Envelope) -> None:
        if self._draining and not isinstance(envelope, _TO_PEERS):
            return  # handing over: edges resend to the rooms' next owners
        super()._on_envelope(peer, envelope)

    def _peers_changed(self, *_link: object) -> None:
        self._replicas.clear()
        if self._by_view:  # liveness moves no room: only a new view does
            self._send(self.table.replicas_changed(self._clock()))
            self._hooks_placement_changed()
            return
        # Just started, a broker has not heard its peers yet: until one heartbeat expiry
        # has passed it counts them alive, so it asks them for the rooms they serve
        # instead of taking every room afresh (a restarted broker's empty view).
        starting = self._clock() < self._grace_until
        self._live = sorted(
            [
                self.placement_id,
                *(p for p, link in self.peers.items() if link.alive or starting),
            ]
        )
        self._send(self.table.replicas_changed(self._clock()))
        self._hooks_placement_changed()

    def _hooks_placement_changed(self) -> None:
        """Take over the webhook streams of rooms this broker owns now that it holds
        copies of (their owner died, maybe after the rooms ended), and copy what is not
        acknowledged yet to the runner-ups as they are now."""
        if self.webhooks is None:
            return
        now = self._clock()
        for stream in self.webhooks.shadowed_streams():
            if stream.startswith("room:") and self._owns(stream[5:]):
                self.webhooks.promote(stream, now)
        self._send(self.webhooks.replicas_changed(now))

    async def draining(self) -> None:
        """SIGTERM: hand every room served here to its next owner, then stop serving."""
        self._draining = True
        others = [b for b in self._placing() if b != self.placement_id]
        now = self._clock()
        handed = 0
        for name in [n for n, room in self.table.rooms.items() if room.active]:
            if others:
                handoff = self.table.hand_over(name, now)
                self._send([(owner(name, others), handoff)])
                handed += 1
        log.info("broker %s handed %d rooms over before stopping", self.placement_id, handed)
        if self._membership is not None:
            await self._membership.leave()  # the next view leaves this broker out
        if handed:
            await asyncio.sleep(0.2)  # the links send what is queued before they close

    @property
    def endpoint(self) -> str:
        return self.placement_id

    async def started(self) -> None:
        grace = self.settings.peer_expiry
        self._grace_until = self._clock() + grace
        asyncio.get_running_loop().call_later(grace, self._peers_changed)
        await super().started()


async def run_broker(settings: Settings) -> None:
    """Run one broker until SIGTERM/SIGINT."""
    await BrokerNode(settings).run(until_stopped)
