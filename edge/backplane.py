"""How an edge reaches the room owners and the presence service.

``Backplane`` is the interface the edge shell is written against. ``LocalBackplane`` runs
a ``RoomTable`` and a ``PresenceTable`` in the same process (``signalpost dev``): commands
are applied synchronously and their output handed straight back, with no sockets between.
The ZeroMQ implementation for the cluster is ``edge.zmq_backplane.ZmqBackplane``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Protocol

from broker.hooks import RoomHooks
from broker.service import room_table
from presence.hooks import PresenceHooks
from presence.service import wall_clock_ms
from presence.table import PresenceTable
from signalpost.config import Settings
from signalpost.lifecycle import spawn
from signalpost.webhook_sender import WebhookSender, webhooks_from
from signalpost.wire import AttachCmd, EdgeSync, Envelope, RestoreCmd, RoomPosition

if TYPE_CHECKING:
    from signalpost.dev_webhooks import DevInbox

#: Where an edge receives what the owners send back.
Inbox = Callable[[Envelope], None]


class Backplane(Protocol):
    """The edge's view of the rest of the system."""

    #: Whether envelopes to and from the owners can be lost on the way (a reset link):
    #: then the edge confirms deliveries and resends unanswered requests.
    lossy: bool

    @property
    def ready(self) -> bool:
        """Whether a room owner can be reached (else the edge takes no session)."""

    def connect(
        self,
        edge_id: str,
        inbox: Inbox,
        snapshot: Callable[[], EdgeSync],
        owners_changed: Callable[[], None],
    ) -> None:
        """Register the edge: where replies go, how to read its soft state, and whom to
        tell when rooms may have changed owner."""

    def on_home_moved(self, forget: Callable[[str], object]) -> None:
        """Whom to tell that a room's home moved to another region (the edge forgets the
        room's owner term: the new home's terms are its own)."""

    def to_room_owner(self, room: str, command: Envelope) -> None:
        """Send a room command to the broker that owns ``room``."""

    def propose_home(self, room: str, region: str) -> None:
        """If ``room`` has no home yet (and no rule pins it), propose ``region`` when its
        first member's join makes one (a token's ``home`` claim)."""

    def to_room_replica(self, room: str, command: Envelope) -> None:
        """Send a command to the runner-up of ``room`` (its successor if the owner dies)."""

    def reannounce(self, room: str, restore: RestoreCmd) -> None:
        """Re-announce a member to the owner and the runner-up of ``room``."""

    def to_all_brokers(self, command: Envelope, rooms: Collection[str] = ()) -> None:
        """Send a session-wide command (detach) to every broker of this region, and to
        another region's brokers when one of the session's ``rooms`` is homed there."""

    def confirm(self, positions: list[tuple[str, str, str, int, bool]]) -> None:
        """Confirm ``(room, session, offset, gap)`` positions to the rooms' owners."""

    def attach(self, session: str, conn: str, positions: dict[str, RoomPosition]) -> None:
        """Tell every broker that ``session`` resumed here, each with its rooms' positions."""

    def to_presence(self, user: str, command: Envelope) -> None:
        """Send a command about a session of ``user`` to the presence node that owns
        ``user``."""

    def broker_ids(self) -> list[str]:
        """The brokers rooms are placed on now, in this region (the server API's listing
        asks each)."""

    def to_broker(self, broker: str, command: Envelope) -> None:
        """Send ``command`` to one broker of ``broker_ids``."""

    @property
    def presence_term(self) -> int:
        """The newest presence view's number this edge read (0: none, or no Consul)."""

    async def start(self) -> None:
        """Open links and start timers."""

    async def close(self) -> None:
        """Stop timers and close links."""


#: Seconds after dev mode's panel last asked for webhook events that the cores go on making
#: them (the demo app asks every second).
DEV_PANEL_WATCH = 30.0


class LocalBackplane:
    """Broker and presence cores in this process: the ``dev`` topology."""

    lossy = False
    ready = True
    presence_term = 0

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
        dev_inbox: DevInbox | None = None,
    ) -> None:
        # One process: nothing between the table and the edge can lose a delivery.
        self.rooms = room_table(settings, confirming=False)
        self.presence = PresenceTable(
            resume_window=settings.resume_window, version_floor=wall_clock_ms
        )
        self._clock = clock
        self._edge_id = ""
        self._inbox: Inbox | None = None
        self._timer: asyncio.Task[None] | None = None
        self.webhook_sender: WebhookSender | None = None
        if settings.webhook_urls:  # one process: no runner-up to copy to
            hooks = webhooks_from(settings)
            self.webhook_sender = WebhookSender.from_settings(hooks, settings, clock=clock)
        elif dev_inbox is not None:  # dev mode's own receiver, in this process
            hooks = webhooks_from(settings, urls=[dev_inbox.url])
            self.webhook_sender = WebhookSender(
                hooks,
                dev_inbox.secret,
                timeout=settings.webhook_timeout,
                clock=clock,
                local=dev_inbox.receive,
            )
        self._dev_inbox = dev_inbox
        self._dev_watched_until = 0.0
        self._hooks: tuple[RoomHooks, PresenceHooks] | None = None
        if self.webhook_sender is not None:
            self._hooks = (
                RoomHooks(hooks, time.time() - clock()),
                PresenceHooks(hooks, time.time() - clock()),
            )
            if dev_inbox is None:  # real receivers: every event, always
                self.rooms.hooks, self.presence.hooks = self._hooks

    def dev_webhooks(self, query: str) -> bytes:
        """Dev mode's panel asks for its events (``/v1/dev-webhooks``): while it asks, at
        least every ``DEV_PANEL_WATCH`` seconds, the cores make webhook events; otherwise
        they make none (nobody would see them, and they would cost more than the
        signalling that makes them: docs/performance.md)."""
        assert self._dev_inbox is not None, "dev mode's own receiver only"
        now = self._clock()
        self._dev_watched_until = now + DEV_PANEL_WATCH
        self._watch_dev_panel(now)
        return self._dev_inbox.since(query)

    def _watch_dev_panel(self, now: float) -> None:
        # Between two commands (never within one): the tables' hooks on or off.
        if self._dev_inbox is None or self._hooks is None:
            return
        watched = now < self._dev_watched_until
        if watched != (self.rooms.hooks is not None):
            self.rooms.hooks, self.presence.hooks = self._hooks if watched else (None, None)

    def _poke(self) -> None:
        # Only while the cores make events (hooks set: a sender exists): with none made,
        # what is queued still goes out on the sender's own tick.
        if self.rooms.hooks is not None and self.webhook_sender is not None:
            self.webhook_sender.poke()

    def connect(
        self,
        edge_id: str,
        inbox: Inbox,
        snapshot: Callable[[], EdgeSync],
        owners_changed: Callable[[], None],
    ) -> None:
        self._edge_id, self._inbox = edge_id, inbox

    def on_home_moved(self, forget: Callable[[str], object]) -> None:
        """One process, one region: no home moves."""

    def _dispatch(self, outbound: list[tuple[str, Envelope]]) -> None:
        assert self._inbox is not None, "connect() an edge first"
        self._poke()
        for _edge, envelope in outbound:
            self._inbox(envelope)

    def propose_home(self, room: str, region: str) -> None:
        pass  # one process: one region

    def to_room_owner(self, room: str, command: Envelope) -> None:
        assert self._inbox is not None, "connect() an edge first"
        inbox = self._inbox  # the loop of _dispatch, inline: once per client request
        for _edge, envelope in self.rooms.handle(command, self._clock()):
            inbox(envelope)
        self._poke()

    def to_all_brokers(self, command: Envelope, rooms: Collection[str] = ()) -> None:
        self._dispatch(self.rooms.handle(command, self._clock()))

    def to_room_replica(self, room: str, command: Envelope) -> None:
        pass  # one process, one room table: nothing to fail over to

    def confirm(self, positions: list[tuple[str, str, str, int, bool]]) -> None:
        pass  # nothing is lost between the table and the edge

    def reannounce(self, room: str, restore: RestoreCmd) -> None:
        pass  # the room table never changes owner in dev mode

    def attach(self, session: str, conn: str, positions: dict[str, RoomPosition]) -> None:
        self._dispatch(self.rooms.attach(AttachCmd(session, conn, self._edge_id, positions)))

    def to_presence(self, user: str, command: Envelope) -> None:
        self._dispatch(self.presence.handle(command, self._clock()))

    def broker_ids(self) -> list[str]:
        return ["local"]

    def to_broker(self, broker: str, command: Envelope) -> None:
        self._dispatch(self.rooms.handle(command, self._clock()))

    async def start(self) -> None:
        self._timer = spawn(self._expire_loop(), "dev-expiry")
        if self.webhook_sender is not None:
            await self.webhook_sender.start()

    async def close(self) -> None:
        if self.webhook_sender is not None:
            await self.webhook_sender.close()
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer

    async def _expire_loop(self) -> None:
        # Resume windows are seconds long; a quarter-second tick keeps timeouts prompt.
        while True:
            await asyncio.sleep(0.25)
            now = self._clock()
            self._watch_dev_panel(now)
            self._dispatch(self.rooms.expire(now))
            self._dispatch(self.presence.expire(now))
