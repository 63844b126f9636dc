"""ZmqBackplane: the edge's links to every broker and to every presence node.

Rooms are placed on brokers by rendezvous hashing (``signalpost.placement``); every edge
computes the same owner from the same broker set. With Consul, the set is the newest view
read from Consul's KV (``signalpost.ownership``), the one the brokers act on; without, the
configured brokers (``broker_endpoints``) whose heartbeats are current.

Users are placed on presence nodes the same way, over the presence view (with Consul) or
the configured presence nodes whose heartbeats are current (``presence_endpoint``, comma
separated). A session's lease and watch commands go to the owner of its user. When the
placement changes, or a presence node (re)appears, the edge sends each presence node the
part of its soft state that node owns (``EdgeSync``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Collection

import msgspec
import zmq

from edge.backplane import Inbox
from edge.remote_brokers import RemoteBrokers
from signalpost import metrics
from signalpost.config import Settings
from signalpost.discovery import Discovery
from signalpost.homes import HomeDirectory
from signalpost.lifecycle import cancel_all, spawn
from signalpost.node_keys import node_keys
from signalpost.ownership import BROKERS, PRESENCE, View, follow_view
from signalpost.placement import owner, ranking
from signalpost.regions import parse_home_rules, pinned_home
from signalpost.transport import DealerLink, new_incarnation
from signalpost.wire import (
    AttachCmd,
    ClaimReply,
    Confirm,
    DetachCmd,
    EdgeSync,
    Envelope,
    JoinCmd,
    RestoreCmd,
    RoomPosition,
    SignalCmd,
)

log = logging.getLogger("signalpost.edge")

#: How long an edge waits at start for Consul to name the first brokers.
FIRST_DISCOVERY_TIMEOUT = 15.0

#: Rooms whose owner is remembered at once; past that the memo starts over (room names
#: come from clients, so an unbounded memo would grow with every name ever tried).
MAX_CACHED_OWNERS = 100_000

#: Presence commands held while no presence node is known (an edge just started, its
#: presence view not read yet); past it the oldest is dropped (counted).
MAX_PRESENCE_HELD = 10_000

#: Seat tickets held at once (one per session resumed or started here); past that the
#: oldest is forgotten (that session's seats then move here only on a newer grant).
MAX_TICKETS = 200_000


class ZmqBackplane:
    """Backplane over ZeroMQ DEALER links."""

    lossy = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.incarnation = new_incarnation()
        self.keys = node_keys(settings)  # raises ConfigError before any socket exists
        self._context = zmq.Context()
        self.brokers: dict[str, DealerLink] = {}  # broker id -> link
        self.presence: dict[str, DealerLink] = {}  # presence placement id -> link
        self._presence_view: View | None = None  # with Consul: the presence nodes
        self._presence_ids: list[str] = []  # users are placed on these
        self._edge_id = ""
        self._inbox: Inbox | None = None
        self._snapshot: Callable[[], EdgeSync] | None = None
        self._owners_changed: Callable[[], None] = lambda: None
        self._owners: dict[str, DealerLink] = {}  # room -> owner link, until membership changes
        self._live_ids: list[str] = []
        self._started = False
        self._heard = False  # some broker has answered since start-up
        self._discovery: Discovery | None = None
        self._view: View | None = None  # with Consul: the brokers rooms are placed on
        self._discovered: dict[str, str] = {}
        self._presence_discovered: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Rooms homed in other regions (``room_homes``): those regions' brokers.
        self._home_rules = parse_home_rules(settings.room_homes)
        self._remote: dict[str, RemoteBrokers] = {}
        # With several regions, homes no rule pins are agreed in Consul (first member's).
        self._homes = (
            HomeDirectory(
                settings.consul_addr,
                settings.regions,
                settings.region,
                settings.consul_token,
                settings.region_loss_after,
                self._region_changed,
                self._home_moved,
            )
            if len(settings.regions) > 1 and settings.consul_addr
            else None
        )
        self._forget_term: Callable[[str], object] = lambda _room: None
        #: (user, command) for presence while no presence node is known: sent once one is
        #: (a session resumed on its token announces itself so, and its seat ticket comes
        #: back with the answer: without it its seats could never move here).
        self._presence_held: deque[tuple[str, Envelope]] = deque()
        #: session -> (conn, presence's seat ticket for it on this edge), from the grants
        #: presence sends (``ClaimReply``); sent with the commands that move seats here.
        self._tickets: OrderedDict[str, tuple[str, bytes]] = OrderedDict()

    # ----------------------------------------------------------------- seat tickets

    def _from_presence(self, envelope: Envelope) -> None:
        if type(envelope) is ClaimReply and envelope.live and envelope.ticket:
            self._tickets[envelope.session] = (envelope.conn, envelope.ticket)
            self._tickets.move_to_end(envelope.session)
            if len(self._tickets) > MAX_TICKETS:
                self._tickets.popitem(last=False)
        assert self._inbox is not None
        self._inbox(envelope)

    def _ticketed(self, command: Envelope) -> Envelope:
        """``command`` with its session's seat ticket if it may move a seat (a join, a
        re-announcement, an attach) and this edge holds one for its connection."""
        if type(command) is JoinCmd or type(command) is RestoreCmd or type(command) is AttachCmd:
            held = self._tickets.get(command.session)
            if held is not None and held[0] == command.conn and not command.ticket:
                return msgspec.structs.replace(command, ticket=held[1])
        elif type(command) is DetachCmd and command.ended:
            held = self._tickets.get(command.session)
            if held is not None and held[0] == command.conn:
                del self._tickets[command.session]
        return command

    # ----------------------------------------------------------------- membership

    def connect(
        self,
        edge_id: str,
        inbox: Inbox,
        snapshot: Callable[[], EdgeSync],
        owners_changed: Callable[[], None],
    ) -> None:
        self._edge_id, self._inbox, self._snapshot = edge_id, inbox, snapshot
        self._owners_changed = owners_changed

    def on_home_moved(self, forget: Callable[[str], object]) -> None:
        self._forget_term = forget

    def _home_moved(self, room: str) -> None:
        self._forget_term(room)
        self._owners.pop(room, None)

    def _fenced(self, region: str, envelope: Envelope) -> bool:
        """Whether ``envelope`` is about a room that region's brokers no longer serve for
        this edge: its home moved (re-homed after a loss) to another region. Dropped (a
        former home back from the dead must reach nobody)."""
        room = getattr(envelope, "room", "")
        if not room or self._homes is None:
            return False
        home = self._homes.believed(room)
        if home is None or home == region:
            return False
        metrics.DELIVERIES_DROPPED.labels("former_home").inc()
        return True

    def _link(
        self, endpoint: str, kind: str, dial: str | None = None, region: str | None = None
    ) -> DealerLink:
        assert self._inbox is not None, "connect() an edge first"
        s = self.settings
        inbox = self._inbox
        if region is not None:  # another region's broker: what comes over the WAN is counted
            arrived = metrics.CROSS_REGION_ENVELOPES.labels(region, "in")

            def inbox(envelope: Envelope, deliver: Inbox = self._inbox) -> None:
                arrived.inc()
                if not self._fenced(region, envelope):
                    deliver(envelope)
        elif self._homes is not None and kind == "broker":
            here = self.settings.region

            def inbox(envelope: Envelope, deliver: Inbox = self._inbox) -> None:
                if not self._fenced(here, envelope):
                    deliver(envelope)

        link = DealerLink(
            self._context,
            endpoint,
            self._edge_id,
            self.incarnation,
            on_envelope=inbox if kind == "broker" else self._from_presence,
            on_up=self._on_up,
            on_down=self._on_down,
            heartbeat_interval=s.heartbeat_interval,
            peer_expiry=s.peer_expiry,
            keys=self.keys,
            max_message=s.max_node_message,
            dial=dial,
            server_kind=kind,
        )
        if self._started:
            link.start()
        return link

    def update_brokers(self, endpoints: dict[str, str]) -> None:
        """Make the broker set ``{broker id: endpoint}`` (with every broker of the view):
        open new links, close gone ones."""
        self._discovered = dict(endpoints)
        if self._view is not None:
            endpoints = {**endpoints, **{b: b for b in self._view.members}}
        for broker_id in list(self.brokers):
            link = self.brokers[broker_id]
            if endpoints.get(broker_id) != link.endpoint:
                del self.brokers[broker_id]
                asyncio.get_running_loop().create_task(link.close())
        for broker_id, endpoint in endpoints.items():
            if broker_id not in self.brokers:
                self.brokers[broker_id] = self._link(endpoint, "broker")
        self._membership_changed()

    def update_presence(self, endpoints: list[str]) -> None:
        """Make the presence node set ``endpoints`` (placement ids; with Consul, also every
        member of the presence view): open new links, close gone ones."""
        self._presence_discovered = list(endpoints)
        wanted = set(endpoints)
        if self._presence_view is not None:
            wanted |= set(self._presence_view.members)
        for node in list(self.presence):
            if node not in wanted:
                link = self.presence.pop(node)
                asyncio.get_running_loop().create_task(link.close())
        for node in sorted(wanted - self.presence.keys()):
            self.presence[node] = self._link(node, "presence")
        self._presence_changed()

    def update_presence_view(self, view: View) -> None:
        """A newer presence view was read from Consul: place users on its members."""
        self._presence_view = view
        log.info("presence view %d: %s", view.number, ", ".join(view.members))
        self.update_presence(self._presence_discovered)

    def _presence_changed(self) -> None:
        if self._presence_view is not None:
            placing = list(self._presence_view.members)
        else:
            live = sorted(p for p, link in self.presence.items() if link.alive)
            placing = live or sorted(self.presence)  # none heard yet: ZeroMQ queues
        if placing == self._presence_ids:
            return
        self._presence_ids = placing
        for node in placing:  # each node gets the sessions it owns now
            link = self.presence.get(node)
            if link is not None:
                self._sync_presence(link)
        if placing and self._presence_held:
            held, self._presence_held = self._presence_held, deque()
            for user, command in held:
                self.to_presence(user, command)

    @property
    def presence_term(self) -> int:
        return self._presence_view.number if self._presence_view is not None else 0

    def presence_owner(self, user: str) -> DealerLink | None:
        """The link to the presence node that owns ``user`` now (None: none known)."""
        if not self._presence_ids:
            return None
        return self.presence.get(owner(user, self._presence_ids))

    def _sync_presence(self, link: DealerLink) -> None:
        """Send ``link``'s node the sessions (and their watches) whose users it owns."""
        if self._snapshot is None or not self._presence_ids:
            return
        snapshot = self._snapshot()
        mine = [
            up for up in snapshot.sessions if owner(up.user, self._presence_ids) == link.endpoint
        ]
        sessions = {up.session for up in mine}
        watches = {s: users for s, users in snapshot.watches.items() if s in sessions}
        link.send(EdgeSync(snapshot.edge, mine, watches))

    def update_view(self, view: View) -> None:
        """A newer view was read from Consul: place rooms on its brokers."""
        self._view = view
        log.info("view %d: %s", view.number, ", ".join(view.members))
        self.update_brokers(self._discovered)

    def _membership_changed(self) -> None:
        if self._view is not None:
            self._live_ids = list(self._view.members)
            self._owners.clear()
            self._owners_changed()
            return
        live = sorted(b for b, link in self.brokers.items() if link.alive)
        # With no broker heard from yet (start-up), place on all configured ones: ZeroMQ
        # queues until they answer.
        self._live_ids = live or sorted(self.brokers)
        self._owners.clear()
        self._owners_changed()

    def _is_presence(self, link: DealerLink) -> bool:
        return self.presence.get(link.endpoint) is link

    def _on_up(self, link: DealerLink, fresh: bool) -> None:
        if self._is_presence(link):
            if fresh:
                self._sync_presence(link)
            self._presence_changed()
            return
        remote = self._remote_of(link)
        if remote is not None:
            log.info("region %s: broker %s is up", remote.region, link.endpoint)
            remote.placement_changed()
            return
        self._heard = True
        log.info("broker %s is up%s", link.endpoint, " (fresh)" if fresh else "")
        # A broker that restarted came back empty: re-announcing rebuilds its rooms.
        self._membership_changed()

    def _on_down(self, link: DealerLink) -> None:
        if self._is_presence(link):
            log.warning("presence %s is down", link.endpoint)
            self._presence_changed()
            return
        remote = self._remote_of(link)
        if remote is not None:
            log.warning("region %s: broker %s is down", remote.region, link.endpoint)
            remote.placement_changed()
            return
        log.warning("broker %s is down", link.endpoint)
        self._membership_changed()

    @property
    def ready(self) -> bool:
        """A broker answers heartbeats (or none was heard from yet since start-up)."""
        return any(link.alive for link in self.brokers.values()) or (
            bool(self.brokers) and not self._heard
        )

    def _home_region(self, room: str) -> str | None:
        """``room``'s home region: pinned by a rule, agreed (None while it is being read),
        or, in a single region, this one."""
        if self._home_rules:
            pinned = pinned_home(room, self._home_rules)
            if pinned is not None:
                return pinned
        if self._homes is None:
            return self.settings.region
        return self._homes.home(room)

    def _home(self, room: str) -> RemoteBrokers | None:
        """The brokers of ``room``'s home region when that is another region, else None
        (this region, or a home not known yet: ``_home_region``)."""
        if not self._home_rules and self._homes is None:
            return None
        home = self._home_region(room)
        if home is None or home == self.settings.region:
            return None
        remote = self._remote.get(home)
        if remote is None:
            remote = self._remote[home] = self._follow_region(home)
        return remote

    def _region_changed(self, region: str, change: str) -> None:
        """Another region was lost (its rooms are re-homed) or is back (homes are read
        again): what waits for its brokers is dropped (the edge resends every request, to
        the room's home as it is then), and every session's rooms are re-announced."""
        remote = self._remote.get(region)
        if remote is not None and change == "lost":
            remote.drop_pending()
            remote.renew_links()  # what is queued for its brokers must never reach them
        self._owners.clear()
        self._owners_changed()

    def _follow_region(self, region: str) -> RemoteBrokers:
        log.info("following region %s's brokers for the rooms homed there", region)

        def link(broker_id: str, address: str) -> DealerLink:
            return self._link(broker_id, "broker", dial=address, region=region)

        def changed() -> None:
            self._owners.clear()
            self._owners_changed()

        remote = RemoteBrokers(region, link, changed)
        if self._discovery is not None and self.settings.consul_addr:
            remote.follow(self._discovery, self.settings.consul_addr, self.settings.consul_token)
        else:
            log.error("room homed in region %s, but without Consul no region is found", region)
        return remote

    def owner_of(self, room: str) -> DealerLink | None:
        """The link to the broker that owns ``room`` now (None: its home is not known yet,
        or is another region whose brokers are not known yet)."""
        link = self._owners.get(room)
        if link is None:
            if self._homes is not None and self._home_region(room) is None:
                return None
            remote = self._home(room)
            if remote is None:
                link = self.brokers[owner(room, self._live_ids)]
            else:
                link = remote.owner_of(room)
                if link is None:
                    return None
            if len(self._owners) >= MAX_CACHED_OWNERS:
                self._owners.clear()
            self._owners[room] = link
        return link

    def replica_of(self, room: str) -> DealerLink | None:
        """The runner-up for ``room``: it takes over if the owner dies."""
        if self._homes is not None and self._home_region(room) is None:
            return None
        remote = self._home(room)
        if remote is not None:
            return remote.replica_of(room)
        order = ranking(room, self._live_ids)
        return self.brokers[order[1]] if len(order) > 1 else None

    def _send(self, link: DealerLink, envelope: Envelope) -> None:
        remote = self._remote_of(link)
        if remote is not None:
            remote.sent.inc()
        link.send(envelope)

    def _remote_of(self, link: DealerLink) -> RemoteBrokers | None:
        """The other region's brokers ``link`` leads to (None: this region's)."""
        if not self._remote or self.brokers.get(link.endpoint) is link:
            return None
        for remote in self._remote.values():
            if remote.links.get(link.endpoint) is link:
                return remote
        return None

    # ----------------------------------------------------------------- Backplane

    def propose_home(self, room: str, region: str) -> None:
        if self._homes is None or region not in self.settings.regions:
            return
        if self._home_rules and pinned_home(room, self._home_rules) is not None:
            return  # a rule decides
        self._homes.propose(room, region)

    def to_room_owner(self, room: str, command: Envelope) -> None:
        if type(command) is not SignalCmd:  # (a signal never moves a seat)
            command = self._ticketed(command)
        link = self._owners.get(room)  # the usual case, one lookup
        if link is None:
            link = self.owner_of(room)
        if link is None:
            if self._homes is not None and self._home_region(room) is None:
                # The home is being agreed: sent on once it is known.
                self._homes.resolve(room, lambda _home: self.to_room_owner(room, command))
                return
            remote = self._home(room)
            assert remote is not None  # only another region's owner can be unknown
            remote.send(room, command)  # held until that region's brokers are known
            remote.sent.inc()
            return
        if self._remote:
            self._send(link, command)
        else:
            link.send(command)

    def to_room_replica(self, room: str, command: Envelope) -> None:
        replica = self.replica_of(room)
        if replica is not None:
            self._send(replica, self._ticketed(command))

    def reannounce(self, room: str, restore: RestoreCmd) -> None:
        # The former owner hands the room to the new one when asked (broker/rooms.py).
        self.to_room_owner(room, restore)  # ticketed there
        replica = self.replica_of(room)
        if replica is not None:
            copy = RestoreCmd(restore.session, restore.conn, restore.edge, room, restore.peer, True)
            self._send(replica, self._ticketed(copy))

    def confirm(self, positions: list[tuple[str, str, str, int, bool]]) -> None:
        by_owner: dict[DealerLink, list[tuple[str, str, str, int, bool]]] = {}
        for position in positions:
            link = self.owner_of(position[0])
            if link is not None:  # else unknown yet: confirmed at a later tick
                by_owner.setdefault(link, []).append(position)
        for link, owned in by_owner.items():
            self._send(link, Confirm(self._edge_id, owned))

    def _all_broker_links(self) -> dict[str, DealerLink]:
        links = dict(self.brokers)
        for remote in self._remote.values():
            links.update(remote.links)
        return links

    def to_all_brokers(self, command: Envelope, rooms: Collection[str] = ()) -> None:
        command = self._ticketed(command)
        for link in self.brokers.values():
            link.send(command)
        if self._remote:
            homes = {remote for room in rooms if (remote := self._home(room)) is not None}
            for remote in homes:
                for link in remote.links.values():
                    self._send(link, command)

    def attach(self, session: str, conn: str, positions: dict[str, RoomPosition]) -> None:
        links = self._all_broker_links()
        mine: dict[str, dict[str, RoomPosition]] = {b: {} for b in links}
        for room, position in positions.items():
            link = self.owner_of(room)
            if link is not None:  # else: the attach is resent until every room answered
                mine[link.endpoint][room] = position
            elif self._homes is not None and self._home_region(room) is None:
                self._homes.resolve(room, lambda _home: None)  # known by the resend
        held = self._tickets.get(session)
        ticket = held[1] if held is not None and held[0] == conn else b""
        for broker_id, link in links.items():
            self._send(link, AttachCmd(session, conn, self._edge_id, mine[broker_id], ticket))

    def to_presence(self, user: str, command: Envelope) -> None:
        link = self.presence_owner(user)
        if link is not None:
            link.send(command)
            return
        if len(self._presence_held) >= MAX_PRESENCE_HELD:
            self._presence_held.popleft()
            metrics.PRESENCE_HELD_DROPPED.inc()
        self._presence_held.append((user, command))

    def broker_ids(self) -> list[str]:
        return list(self._live_ids)

    def to_broker(self, broker: str, command: Envelope) -> None:
        link = self.brokers.get(broker)
        if link is not None:  # else gone from the view meanwhile: asked again, or 503
            link.send(command)

    async def start(self) -> None:
        if not self.brokers and self.settings.broker_endpoints:
            self.update_brokers({e: e for e in self.settings.broker_endpoints})
        if not self.presence and self.settings.presence_endpoints:
            self.update_presence(self.settings.presence_endpoints)
        self._started = True
        for link in [*self.brokers.values(), *self.presence.values()]:
            link.start()
        if self.settings.consul_addr:
            await self._discover(self.settings.consul_addr)
        if self._homes is not None:
            self._homes.start()

    async def _discover(self, address: str) -> None:
        """Follow brokers and presence in Consul; wait (bounded) for the first brokers."""
        self._discovery = Discovery(address, token=self.settings.consul_token)
        found = asyncio.Event()

        def brokers(members: dict[str, str]) -> None:
            # A broker's placement id is its endpoint: every edge hashes the same strings.
            self.update_brokers({endpoint: endpoint for endpoint in members.values()})
            found.set()

        def view(view: View) -> None:
            self.update_view(view)
            found.set()

        self._discovery.watch("broker", brokers)
        self._discovery.watch(
            "presence", lambda members: self.update_presence(list(members.values()))
        )
        token = self.settings.consul_token
        self._tasks.append(spawn(follow_view(address, BROKERS, view, token=token), "view-broker"))
        self._tasks.append(
            spawn(
                follow_view(address, PRESENCE, self.update_presence_view, token=token),
                "view-presence",
            )
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(found.wait(), FIRST_DISCOVERY_TIMEOUT)
        if not found.is_set() and not self.brokers:
            log.warning("no broker found in Consul at %s yet; still watching", address)

    async def close(self) -> None:
        await cancel_all(self._tasks)
        if self._homes is not None:
            await self._homes.close()
        for remote in self._remote.values():
            await remote.close()
        if self._discovery is not None:
            await self._discovery.close()
        for link in [*self.brokers.values(), *self.presence.values()]:
            await link.close()
        self._context.term()
