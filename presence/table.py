"""PresenceTable: the sans-I/O core of the presence service.

Theory of operation
-------------------
Each session holds a ``SessionLease``: the user, the edge and connection that hold it, and,
once the connection dropped, the deadline of its resume window. A user is online while at
least one of its sessions holds a lease. Watchers are sessions: each change of a user's
status becomes a ``presence`` frame delivered to the edges of the sessions watching them.

Leases are soft state: edges announce their sessions (``SessionUp``) and re-announce all of
them (``EdgeSync``) when a presence node (re)appears, so a restarted presence service
rebuilds itself. An edge that stops heartbeating has its sessions suspended at once, so
they go offline one resume window later, as if each connection had dropped.

The table is also the session directory for resume: ``claim`` says whether a session may
continue (it still holds a lease) and moves it to the claiming connection, evicting a stale
one still open elsewhere. A new session's lease is made by a claim too (``claim_fresh``,
``ClaimCmd.fresh``): its edge welcomes it only once the grant came back, which waits for
the copy (see "Replication and handoff"), or after two request timeouts without one (then
it announces the session with ``SessionUp``, unconfirmed).

A lease belongs to the newest connection of its session (``conn_generation``: a resume gets
a higher generation). A ``SessionUp`` or ``ClaimCmd`` naming an older connection than the
lease's (a late or forged one) changes nothing: the SessionUp is ignored, the claim is
refused (its edge then welcomes the client into a fresh session), and the newer connection
is not evicted. Of one generation the last word wins, as in the broker's ``_newer``: a
client that retries a resume with the same token (its first attempt never welcomed, yet
holding the lease here) must get its session back.

Cost follows changes, not sessions held: resume deadlines wait in a heap that ``expire``
pops only as far as ``now``, and ``edge_lost`` reaches the edge's connected sessions through
an index (see ``PresenceTable``).

Several presence nodes (sharding)
---------------------------------
Users are placed on the presence nodes by rendezvous hashing over the presence view
(``owner_of``; ``signalpost.ownership``). A node holds the leases of the users it owns, and
the watches of the sessions it holds a lease for: everything a session's resume needs
(``claim``: live or not, what it watches, what changed) is on one node. Edges send a
session's lease and watch commands to the owner of its user.

A watched user owned by another node is known through a subscription: the watcher's node
sends the owner ``StatusSubscribe``; the owner answers ``StatusNote`` with the status now
and again at every change; the watcher's node keeps the last one (``_remote``) and notifies
its watchers from it as it would from a lease. A watch reply waits until every user it
names has a status (``_pending``). Subscriptions not answered are sent again every
``RESUBSCRIBE_INTERVAL`` (a lost message, an owner that did not own the user yet, one that
restarted and forgot its subscribers).

When the view changes (``view_changed``), a node forgets, without telling anyone, the
leases and watches of users it no longer owns (the edges send them to the new owner:
``EdgeSync``) and its subscribers for them, and subscribes where owners changed. For
``SYNC_GRACE`` after a change it answers no subscription and tells its own watchers nothing
of the users it took over: the edges' re-sync arrives first, so a user who stayed connected
is not reported offline by its new owner (warm move); then each watcher hears of a user
taken over only if its status settled otherwise than its previous owner last said (a user
who left while their owner was dead: once, offline).

Nodes and edges read a new view one after the other, so a lease may reach a node that
does not own its user (yet, or any more). It is kept: the node may be about to own the
user (an edge that read the view first re-syncs to it before it read the view itself);
if not, the next view change forgets it, and the edge has re-synced it to the owner. A
claim for a user a node does not own and holds no lease of is dropped and counted
(``misrouted``): the edge, which did not hear back, resumes on its signed token and
announces the session to the owner it knows.

Replication and handoff
-----------------------
After every change of a session's lease or watches, the owner sends the whole state of
the session (``LeaseCopy``) to the runner-up of its user (``replica_of``); ``gone`` when
the lease ended. The runner-up keeps the last copy of each (``_copies``) and does nothing
else with it. When a view makes it the owner (the owner died or left), it adopts the
copies as leases, suspended ones with the time left of their windows: resumes go on
(``resumed: true``) and watches are kept. When a view moves a user to a node that is not
its runner-up (a node joined), the old owner hands each session over (``handoff``)
instead of forgetting it. The edges' re-sync restores every connected session; an adopted
connection no edge names again within ``SYNC_GRACE`` had its goodbye lost with the dead
owner, and is suspended then (``_unconfirmed``): it may resume, or goes offline one window
later.

Copies are confirmed, as a broker's room events are (``signalpost.replication``): each is
numbered (``seq``, from ``first_seq``, which the shell takes from the wall clock so that a
restarted node's copies are newer) and the receiver answers ``ReplicaAck(session, seq)``
(naming itself: the owner takes it only from the node it last sent the copy to).
What a call caused (answers, presence frames, status notes, evictions) is held
(``_changes``) until every copy the call sent is acknowledged, or a later copy of the same
session is; an answer to a session whose earlier copy is unacknowledged waits for that one
too. So nothing an edge or a watcher was told is unknown to the runner-up when the owner
dies (a new session's grant included: ``claim_fresh``). A goodbye (``SessionDown``) is
answered to nobody: if it dies with the owner, the settling above suspends the connection
(its window starts a failover late; an ended session lingers one window).

``_copying`` keeps the newest unacknowledged copy of each session: sent again after
``copy_resend_after``, at once to a runner-up that restarted, to the new runner-up at a
view change (or confirmed when there is none). The runner-up ignores a copy not newer than
the one it holds from the same owner, and refuses one whose ``term`` is below it (a deposed
owner: nothing is let out on it). At most ``MAX_HELD_CHANGES`` changes wait; past that the
oldest is let out unacknowledged (``copies_unconfirmed``).

Status versions: every status told carries the user's version (odd online, even offline,
higher at each change: ``version``), copied with the user's leases (``LeaseCopy.version``)
and noted to subscribers, so a new owner goes on from it. What each watcher was last told
(``_told``) travels with a copy of its session but is not copied when only that changes
(every status change would copy every watcher): after a failover a resumed watcher may be
told a status it already knew, with the version it knows, and the SDKs drop it.

Several regions (global presence)
---------------------------------
With ``regions`` naming other regions and ``owner_in(region, user)`` (the user's owner
there, by that region's view), a user is online while a session holds a lease in *any*
region. The owner of a user watched here (by a session of its own, or a node of this
region subscribed to it) subscribes to the user's owner in every other region
(``StatusSubscribe.region``) to its *regional* status there, and is noted it at every
change (``StatusNote.region``, with a regional version: ``region_subscribe``,
``_tell_regions``); ``presence.regional.RegionalStatuses`` merges those (newest version
per user and region). ``status`` and the version of an owned user are the global ones,
and ``_notify`` tells watchers and subscribers only a change of the global status. A
watch reply (or a subscription answer) naming a user newly subscribed elsewhere waits for
the regions whose link is up (``remote_up``) to answer, ``CROSS_WAIT`` at most
(``_cross_deferred``). Subscriptions unanswered are sent again every
``RESUBSCRIBE_INTERVAL``, and every one every ``CROSS_REFRESH_INTERVAL`` (notes are not
acknowledged: the answers repair one lost on a link that reset); all of them again at a
node whose link came back
(``remote_up``), where the other region's view moved the user
(``region_placement_changed``), and for the users this node takes over
(``view_changed``). What a node noted counts as offline once its link has been down
``stale_after`` (``remote_down``, ``_cross_tick``). Without other regions none of this
runs.

One live connection per session
-------------------------------
A claim that moves a lease away from a connection still open elsewhere sends that edge
``Evict`` and holds the ``ClaimReply`` (``_held``) until the edge answers ``Evicted`` (it
closed the connection, 4409), the edge is lost, or ``EVICT_WAIT`` passed: the new
connection is welcomed only after the old one is closed. Every claim answer names this
node's ``term`` (the presence view's number, set by the shell); an edge that read a newer
view ignores the grant of a node deposed since.

Without ``owner_of`` (one presence node, dev mode) the node owns every user.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

from presence.hooks import PresenceHooks
from presence.regional import STALE_AFTER, RegionalStatuses
from signalpost.replication import Unacked, resend_late, retarget
from signalpost.tickets import SeatTickets
from signalpost.wire import (
    ApiAnswer,
    ClaimCmd,
    ClaimReply,
    Deliver,
    EdgeSync,
    Envelope,
    Evict,
    Evicted,
    Kick,
    KickCmd,
    LeaseCopy,
    PresenceFrame,
    PresenceQuery,
    ReplicaAck,
    Reply,
    SessionDown,
    SessionUp,
    StatusNote,
    StatusSubscribe,
    UnwatchCmd,
    UnwatchedFrame,
    WatchCmd,
    WatchingFrame,
    conn_supersedes,
    encode_frame,
    encode_json,
)

Outbound = tuple[str, Envelope]
Status = Literal["online", "offline"]

#: How often unanswered subscriptions to other presence nodes are sent again (seconds).
RESUBSCRIBE_INTERVAL: Final = 1.0
#: After a view change, how long a node answers no subscription: edges re-sync their
#: sessions to the new owners within it (they read the view as the nodes do).
SYNC_GRACE: Final = 1.0
#: How long a watch reply waits for the status of users owned elsewhere; then it is
#: dropped (the edge resends the watch).
PENDING_TIMEOUT: Final = 5.0
#: Watch replies waiting at once; more are dropped (counted) and resent by their edges.
MAX_PENDING: Final = 10_000
#: How long a granted resume waits for the edge of the connection it replaces to confirm
#: that connection closed (``Evicted``); then it is answered all the same (counted). Less
#: than the two request timeouts an edge keeps claiming for, so it does not give up first.
EVICT_WAIT: Final = 1.5
#: Seconds after which a lease copy the runner-up has not acknowledged is sent again (it
#: or its ack was lost on a reset link).
COPY_RESEND_AFTER: Final = 1.0
#: Changes whose effects (replies, notes, evictions) wait for their copies' acks at once;
#: past that the oldest is let out unacknowledged (counted: ``copies_unconfirmed``), as
#: if it had no runner-up.
MAX_HELD_CHANGES: Final = 10_000
#: Status versions kept for offline users owned here; past that the least recently changed
#: is forgotten (its next version starts from the version floor: a watcher may be told
#: once more a status it knew, never miss a change).
MAX_OFFLINE_VERSIONS: Final = 100_000


def _next_version(after: int, online: bool, floor: int) -> int:
    """The first status version above ``after`` and not below ``floor`` that says
    ``online`` (odd) or offline (even)."""
    version = max(after + 1, floor)
    if (version % 2 == 1) != online:
        version += 1
    return version


def _no_floor() -> int:
    return 0


#: How often subscriptions to other regions held for users no longer watched here are
#: swept (seconds; those are dropped at once where the table sees it, this catches the rest).
CROSS_SWEEP_INTERVAL: Final = 10.0
#: How long a watch of a user newly watched in this region (or a subscription of another
#: node of the region to it) waits for the user's status in the other regions whose link
#: is up; then it is answered with what is known (seconds).
CROSS_WAIT: Final = 1.0
#: How often every subscription to other regions is sent again, answered or not (seconds):
#: a note lost on a link that reset without going down is repaired by the answer.
CROSS_REFRESH_INTERVAL: Final = 30.0
#: Users named in one subscription to another region's node at most (a resend after a
#: WAN cut names every user watched here: it goes in pieces, each well below
#: ``max_node_message``).
CROSS_BATCH: Final = 1000
#: Users whose regional status other regions subscribed to here at once; past that new
#: subscriptions are not answered (counted ``misrouted``): that region sees those users
#: as offline here.
MAX_REGION_SUBSCRIBED: Final = 200_000


@dataclass(slots=True)
class PendingWatch:
    """A watch reply waiting for the status of users owned by other nodes."""

    command: WatchCmd
    missing: set[str]
    deadline: float


@dataclass(slots=True)
class HeldReply:
    """A granted resume claim, answered once the connection it replaces is closed."""

    edge: str
    reply: ClaimReply
    old_edge: str
    old_conn: str
    deadline: float


@dataclass(slots=True, kw_only=True)
class _Copying(Unacked):
    """The newest copy of a session sent (to its runner-up, or to a new owner: a handoff)
    and not acknowledged yet."""

    user: str
    seq: int


@dataclass(slots=True)
class _HeldChange:
    """What one change caused, held until its copies are acknowledged."""

    waits: dict[str, int]  # session -> the copy (seq) its runner-up must acknowledge
    out: list[Outbound]


#: What a change causes that is not held for its copies' acks: the copies themselves,
#: acks of copies received, subscriptions (they change nothing at their owner).
_NEVER_HELD: Final[frozenset[type]] = frozenset({LeaseCopy, ReplicaAck, StatusSubscribe})


@dataclass(slots=True)
class Counters:
    """Frames a node dropped, by cause (exported as metrics by the shell)."""

    misrouted: int = 0  # a command for a user this node does not own
    pending_dropped: int = 0  # a watch reply that waited too long or found no room
    notes_ignored: int = 0  # a status note from a node that does not own the user here
    evict_unconfirmed: int = 0  # a resume answered without the old connection's close
    copies_unconfirmed: int = 0  # a change let out before its copies were acknowledged
    copies_refused: int = 0  # a copy a runner-up refused (it knows a newer owner)
    late_acks: int = 0  # a copy's ack from a node it was not (last) sent to


@dataclass(slots=True)
class SessionLease:
    user: str
    edge: str
    conn: str
    suspended_until: float | None = None
    #: Names this lease's live entry in the deadline heap; 0 while it has none.
    deadline_token: int = 0


def _ignore_refusal(edge: str, why: str) -> None:
    return None


class PresenceTable:
    """Who is online, and who wants to know.

    Resume deadlines: each suspension pushes ``(deadline, session, token)`` on a heap and
    stamps the lease with the token. Entries are never removed in place: an entry is stale
    once its lease is gone, resumed or suspended again (the lease's token differs), and is
    dropped when ``expire`` pops it. ``_stale`` counts the stale entries; whenever they
    outnumber the live ones (more than half the heap), the heap is rebuilt from the live
    ones, so it never holds more than twice the suspended leases, and each rebuild costs no
    more than the changes that made it stale.

    ``_connected_at`` indexes the sessions connected (leased, not suspended) by edge, so
    ``edge_lost`` touches that edge's sessions only. Every map drops a key once its set is
    empty.
    """

    def __init__(
        self,
        *,
        resume_window: float,
        node_id: str = "",
        owner_of: Callable[[str], str | None] | None = None,
        replica_of: Callable[[str], str | None] | None = None,
        first_seq: int = 0,
        copy_resend_after: float = COPY_RESEND_AFTER,
        version_floor: Callable[[], int] = _no_floor,
        region: str = "",
        owner_in: Callable[[str, str], str | None] | None = None,
        regions: Iterable[str] = (),
        stale_after: float = STALE_AFTER,
    ) -> None:
        self.resume_window = resume_window
        #: This node's placement id, and the owner of a user in this node's view (None:
        #: no view yet). Without ``owner_of`` this node owns every user.
        self.node_id = node_id
        self._owner_of = owner_of
        #: The runner-up of a user (None: no other node), whom its owner copies leases to.
        self._replica_of = replica_of
        self.counters = Counters()
        #: Called with (edge, why) for a command refused because it names a session whose
        #: lease another edge holds (the shell counts and logs it).
        self.refused: Callable[[str, str], None] = _ignore_refusal
        #: Seat tickets (``signalpost.tickets``) granted with each lease; None: none.
        self.tickets: SeatTickets | None = None
        #: The presence view's number this node acts in (0 without Consul), set by the
        #: shell; every grant names it (``ClaimReply.term``).
        self.term = 0
        # session -> its granted claim, held until the replaced connection closed. One per
        # session at most; released by ``Evicted``, the old edge's loss, or EVICT_WAIT.
        self._held: dict[str, HeldReply] = {}
        self.leases: dict[str, SessionLease] = {}
        self._sessions_of: dict[str, set[str]] = {}  # user -> sessions with a lease
        self._connected_at: dict[str, set[str]] = {}  # edge -> its unsuspended sessions
        self._deadlines: list[tuple[float, str, int]] = []  # (deadline, session, token)
        self._stale = 0  # entries of _deadlines whose lease no longer has that token
        self._last_token = 0
        self._watchers_of: dict[str, set[str]] = {}  # user -> watching sessions
        self._watched_by: dict[str, set[str]] = {}  # watching session -> users
        # watching session -> what it was last told of each user; a resumed watcher is
        # told what changed while it was away.
        self._told: dict[str, dict[str, Status]] = {}
        # Sharding. Each map holds users watched here or owned here, and drops a key once
        # nobody watches it (or this node stops owning it).
        self._subscribers: dict[str, set[str]] = {}  # owned user -> subscribed nodes
        self._subscribed: dict[str, str] = {}  # remote watched user -> owner subscribed at
        self._remote: dict[str, Status] = {}  # remote watched user -> status last noted
        self._unanswered: set[str] = set()  # subscribed, no note yet from that owner
        self._pending: dict[tuple[str, str, int], PendingWatch] = {}  # (session, conn, seq)
        self._awaiting: dict[str, set[tuple[str, str, int]]] = {}  # user -> pending keys
        self._settled_at = float("-inf")  # answers subscriptions from then on
        # Users watched here that this node took over in the last view change -> the
        # status last noted by their previous owner. Until ``_settled_at`` their watchers
        # are told nothing; then once, if the status settled otherwise (``_settle``).
        self._settling: dict[str, Status] = {}
        # Replication: sessions changed by the call under way (session -> user), copied
        # at its end; the copies this node holds as runner-up -> (copy, when received).
        # Copies hold the sessions of users this node is the runner-up of: a view change
        # drops the others, an owner's ``gone`` each ended one.
        self._dirty: dict[str, str] = {}
        self._copies: dict[str, tuple[LeaseCopy, float]] = {}
        # Connected sessions adopted from copies -> their edge, until that edge's re-sync
        # names them; those it does not name were gone when their goodbye was lost with
        # the old owner, and are suspended once settled. Cleared at every settling.
        self._unconfirmed: dict[str, str] = {}
        self._resubscribe_at = float("-inf")
        # Confirmed copies. ``_seq``: the number of the last copy sent (the shell starts it
        # from the wall clock, so a restarted node's copies are newer). ``_copying``: per
        # session, the newest copy not acknowledged yet (one at most: a newer copy of the
        # whole state supersedes it). ``_changes``: what changes caused, held until the
        # copies they wait for are acknowledged (numbered, oldest first; at most
        # MAX_HELD_CHANGES); ``_waiting``: session -> the numbers of the changes waiting
        # for one of its copies.
        self._seq = first_seq
        self.copy_resend_after = copy_resend_after
        self._copying: dict[str, _Copying] = {}
        self._changes: dict[int, _HeldChange] = {}
        self._next_change = 0
        self._waiting: dict[str, set[int]] = {}
        # Status versions (``PresenceFrame.version``): of users owned here (oldest change
        # first; offline ones bounded by MAX_OFFLINE_VERSIONS), and of remote watched users
        # as their owners noted them. A user whose version is not known here gets one from
        # ``version_floor`` (the shell passes the wall clock in ms: above what a previous
        # owner gave it).
        self._version_floor = version_floor
        self._versions: OrderedDict[str, int] = OrderedDict()
        self._remote_versions: dict[str, int] = {}
        # Global presence (``presence.regional``; idle with fewer than two regions). This
        # node's region and the others; ``owner_in(region, user)``: the user's owner there.
        self.region = region
        self._other_regions = sorted({r for r in regions if r and r != region})
        self._owner_in = owner_in
        self._global = bool(self._other_regions) and owner_in is not None
        self.stale_after = stale_after
        #: Owned users watched here -> region -> the node there subscribed at; what those
        #: nodes noted; (user, region) subscriptions not answered yet.
        self._cross: dict[str, dict[str, str]] = {}
        self.regional = RegionalStatuses()
        self._cross_unanswered: set[tuple[str, str]] = set()
        self._cross_swept_at = float("-inf")
        self._cross_resend_at = float("-inf")
        self._cross_refresh_at = float("-inf")
        #: Other regions' nodes subscribed to owned users' regional status -> and what
        #: each user's regional status and version last told were.
        self._region_subscribers: dict[str, set[str]] = {}
        self._regional_told: dict[str, tuple[bool, int]] = {}
        #: Other regions' nodes whose link is down -> since when (stale after
        #: ``stale_after``: ``_stale_marked``).
        self._down_since: dict[str, float] = {}
        self._stale_marked: set[str] = set()
        #: Other regions' nodes whose link is up (the shell says so).
        self._up: set[str] = set()
        #: Users newly subscribed in other regions -> until when the watch replies and
        #: subscription answers naming them wait for those regions' notes.
        self._cross_deferred: dict[str, float] = {}
        self._now = 0.0  # the time of the call under way
        #: Webhooks (``presence.hooks``): told every status version of users owned here.
        self.hooks: PresenceHooks | None = None

    def owns(self, user: str) -> bool:
        """Whether this node owns ``user`` in its view (always, without a view function)."""
        return self._owner_of is None or self._owner_of(user) == self.node_id

    def status(self, user: str) -> Status:
        """``online`` while any session of ``user`` holds a lease (on the node that owns
        it), or, with other regions, any of them says so; for a user owned elsewhere, what
        its owner noted last."""
        if self._owner_of is not None and not self.owns(user):
            return self._remote.get(user, "offline")
        if self._sessions_of.get(user) or (self._global and self.regional.online(user)):
            return "online"
        return "offline"

    def version(self, user: str) -> int:
        """The version of ``user``'s status (``PresenceFrame.version``): odd while online,
        even while offline, higher at every change, carried with the user's leases to the
        node that takes it over. 0: a remote user no note has versioned yet."""
        if self._owner_of is not None and not self.owns(user):
            return self._remote_versions.get(user, 0)
        return self._note_status(user)

    def _note_status(self, user: str) -> int:
        """``user`` (owned here) may have changed status: its version, moved past the one
        it had if the status is not what that one says."""
        online = bool(self._sessions_of.get(user)) or (self._global and self.regional.online(user))
        version = self._versions.get(user)
        if version is not None and (version % 2 == 1) == online:
            return version
        version = _next_version(version or 0, online, self._version_floor())
        self._versions[user] = version
        self._versions.move_to_end(user)
        if len(self._versions) > MAX_OFFLINE_VERSIONS + len(self._sessions_of):
            for _ in range(len(self._versions)):  # bounded: the oldest offline one goes
                oldest = next(iter(self._versions))
                if not self._sessions_of.get(oldest):
                    del self._versions[oldest]
                    break
                self._versions.move_to_end(oldest)
        return version

    def _merge_version(self, user: str, version: int) -> None:
        """A previous owner of ``user`` gave its status ``version``: never go below it."""
        if version > self._versions.get(user, 0):
            self._versions[user] = version
            self._versions.move_to_end(user)

    def handle(self, command: Envelope, now: float) -> list[Outbound]:
        """Apply one command from an edge or another presence node; return what to send."""
        if type(command) is ReplicaAck:  # (what it lets out waited already: not again)
            return self.copy_acked(command)
        self._now = now
        return self._finish(self._apply(command, now), now)

    def _ticket(self, session: str, edge: str, conn: str) -> bytes:
        return b"" if self.tickets is None else self.tickets.issue(session, edge, conn)

    def _not_theirs(self, command: SessionDown | WatchCmd | UnwatchCmd) -> bool:
        """Whether ``command`` names a session whose lease another edge holds: refused
        (reported). Only a ``SessionUp`` or a ``ClaimCmd`` moves a lease to its sender (a
        resume; its grant evicts the connection holding the session)."""
        lease = self.leases.get(command.session)
        if lease is None or lease.edge == command.edge:
            return False
        self.refused(
            command.edge,
            f"{type(command).__name__} for session {command.session!r}, "
            f"whose lease is on {lease.edge!r}",
        )
        return True

    def _apply(self, command: Envelope, now: float) -> list[Outbound]:
        if isinstance(command, SessionDown | WatchCmd | UnwatchCmd) and self._not_theirs(command):
            return []
        if isinstance(command, SessionUp):
            out = self.session_up(command)
            lease = self.leases.get(command.session)
            if self.tickets is not None and lease is not None and lease.conn == command.conn:
                # A new session (or one resumed on its token): its edge gets the seat
                # ticket too, so no other edge can hold its seats against it. (The edge
                # keeps it; it awaits no answer to a ``SessionUp``.)
                ticket = self._ticket(command.session, command.edge, command.conn)
                grant = ClaimReply(
                    command.session, command.conn, True, term=self.term, ticket=ticket
                )
                out.append((command.edge, grant))
            return out
        if isinstance(command, SessionDown):
            return self.session_down(command, now)
        if isinstance(command, ClaimCmd):
            if not self.owns(command.user) and command.session not in self.leases:
                self.counters.misrouted += 1  # its owner answers once the edge knows it
                return []
            if command.fresh:
                return self.claim_fresh(command)
            return self.claim(command, now)
        if isinstance(command, WatchCmd):
            return self.watch(command, now)
        if isinstance(command, UnwatchCmd):
            return self.unwatch(command)
        if isinstance(command, EdgeSync):
            return self.edge_sync(command)
        if isinstance(command, StatusSubscribe):
            if command.region:
                return self.region_subscribe(command, now)
            return self.subscribe(command, now)
        if isinstance(command, StatusNote):
            if command.region:
                return self.region_noted(command)
            return self.noted(command)
        if isinstance(command, LeaseCopy):
            return self.copied(command, now)
        if isinstance(command, Evicted):
            return self.evicted(command)
        if isinstance(command, PresenceQuery):
            return self.presence_of(command, now)
        if isinstance(command, KickCmd):
            return self.kick(command, now)
        return []

    # ----------------------------------------------------------------- server API

    def _answers_for(self, user: str) -> bool:
        """Whether this node answers the server API about ``user``: it owns the user, or
        holds leases of it (a view in flux); else the edge asks the owner it learns of."""
        return self.owns(user) or bool(self._sessions_of.get(user))

    def presence_of(self, command: PresenceQuery, now: float) -> list[Outbound]:
        """``user``'s status, version and sessions (the server API's presence)."""
        user = command.user
        if not self._answers_for(user):
            self.counters.misrouted += 1
            return []
        sessions = []
        for session in sorted(self._sessions_of.get(user, ())):
            lease = self.leases[session]
            connected = lease.suspended_until is None
            if not connected and lease.suspended_until is not None and lease.suspended_until <= now:
                continue  # lapsed: ``expire`` ends it at its next tick
            sessions.append({"session": session, "edge": lease.edge, "connected": connected})
        body = encode_json(
            {
                "user": user,
                "status": self.status(user),
                "version": self.version(user),
                "sessions": sessions,
            }
        )
        return [(command.edge, ApiAnswer(command.qid, 200, body))]

    def kick(self, command: KickCmd, now: float) -> list[Outbound]:
        """End a session of ``user`` (or all of them): the lease ends here (and at the
        runner-up: its copy goes), so no edge can resume it; the edge holding it
        connected is told to close it (``Kick``: close 4410)."""
        user = command.user
        if not self._answers_for(user):
            self.counters.misrouted += 1
            return []
        out: list[Outbound] = []
        held = self._sessions_of.get(user, set())
        if command.session is not None:
            lease = self.leases.get(command.session)
            if lease is None or lease.user != user:
                message = f"user {user!r} has no session {command.session!r}"
                body = encode_json({"code": "not_found", "message": message})
                return [(command.edge, ApiAnswer(command.qid, 404, body))]
            targets = [command.session]
        else:
            targets = sorted(held)
        for session in targets:
            lease = self.leases[session]
            if lease.suspended_until is None:
                out.append((lease.edge, Kick(session, lease.conn, command.reason)))
            waiting = self._held.pop(session, None)
            if waiting is not None:  # a resume of it waits for an eviction: refused now
                refusal = ClaimReply(session, waiting.reply.conn, False, term=self.term)
                out.append((waiting.edge, refusal))
            out.extend(self._end(session))
        body = encode_json({"user": user, "kicked": targets})
        out.append((command.edge, ApiAnswer(command.qid, 200, body)))
        return out

    # ----------------------------------------------------------------- leases

    def session_up(self, command: SessionUp) -> list[Outbound]:
        """A connection now holds ``command.session``."""
        out: list[Outbound] = []
        lease = self.leases.get(command.session)
        if lease is not None:
            if not conn_supersedes(command.conn, lease.conn):
                return out  # an older connection's late word: the newer one keeps the lease
            if lease.conn != command.conn:
                # A suspended lease's connection should be gone, but its edge may still hold
                # it (a copy or sync that suspended a connection still open there, a
                # half-open socket): it is closed all the same. Only a live lease's
                # eviction holds a claim's answer (``claim``).
                out.append((lease.edge, Evict(command.session, lease.conn, lease.user)))
            self._unlink(command.session, lease)
            if lease.user != command.user:
                # (Sessions belong to one user; a node that says otherwise must at least
                # not leave the previous user online for good.)
                self._release(command.session, lease.user, out)
        was = self.status(command.user)
        self._dirty[command.session] = command.user
        self.leases[command.session] = SessionLease(command.user, command.edge, command.conn)
        self._sessions_of.setdefault(command.user, set()).add(command.session)
        self._connected_at.setdefault(command.edge, set()).add(command.session)
        self._notify(command.user, was, out)
        return out

    def session_down(self, command: SessionDown, now: float) -> list[Outbound]:
        """The connection ended (the session ends) or dropped (its resume window starts)."""
        lease = self.leases.get(command.session)
        if lease is None or lease.conn != command.conn:
            return []  # stale: the session already moved to another connection
        if command.ended:
            return self._end(command.session)
        self._suspend(command.session, lease, now + self.resume_window)
        return []

    def claim(self, command: ClaimCmd, now: float) -> list[Outbound]:
        """May ``session`` resume? Yes while it holds a lease for the same user and the
        claiming connection is not older than the lease's.

        A lease whose resume window lapsed is over even if ``expire`` has not run yet.
        """
        out: list[Outbound] = []
        held = self._held.get(command.session)
        if held is not None:
            if held.reply.conn == command.conn:
                return out  # the edge asks again: still waiting for the old one to close
            del self._held[command.session]  # a newer connection claims: that one waits
        lease = self.leases.get(command.session)
        if lease is not None and lease.suspended_until is not None and lease.suspended_until <= now:
            out.extend(self._end(command.session))
            lease = None
        if (
            lease is None
            or lease.user != command.user
            or not conn_supersedes(command.conn, lease.conn)
        ):
            reply = ClaimReply(command.session, command.conn, False, term=self.term)
            out.append((command.edge, reply))
            return out
        self._unconfirmed.pop(command.session, None)  # its edge named it: it is live
        granted = self.session_up(
            SessionUp(command.session, command.user, command.edge, command.conn)
        )
        out.extend(granted)
        watching: dict[str, Status] = {
            user: self.status(user) for user in sorted(self._watched_by.get(command.session, ()))
        }
        told = self._told.setdefault(command.session, {})
        changed = [user for user, status in watching.items() if told.get(user) != status]
        told.update(watching)
        versions = {user: self.version(user) for user in watching}
        reply = ClaimReply(
            command.session,
            command.conn,
            True,
            watching,
            changed,
            self.term,
            versions,
            self._ticket(command.session, command.edge, command.conn),
        )
        replaced_live = lease.suspended_until is None
        for edge, envelope in granted:
            if (
                replaced_live
                and isinstance(envelope, Evict)
                and envelope.session == command.session
            ):
                # The connection it replaces is live: answered once that one is closed.
                self._held[command.session] = HeldReply(
                    command.edge, reply, edge, envelope.conn, now + EVICT_WAIT
                )
                return out
        out.append((command.edge, reply))
        return out

    def claim_fresh(self, command: ClaimCmd) -> list[Outbound]:
        """A new session asks for its lease (``ClaimCmd.fresh``): it is made here, as by
        ``SessionUp``, and granted (``ClaimReply`` live) once the user's runner-up has its
        copy (``_finish`` holds the grant for the ack), so a welcomed session is never
        unknown to the node that takes its user over.

        A resend (the same connection holds the lease) changes nothing but a suspension
        (as a resume claim, the claiming connection is connected after a grant): it is
        answered again, once the copy in flight, if any, is acknowledged. A lease held by
        another connection or user (the session id is in use) is refused, ``live: False``,
        and not moved.
        """
        out: list[Outbound] = []
        lease = self.leases.get(command.session)
        live = lease is None or (lease.conn == command.conn and lease.user == command.user)
        if lease is None or (live and lease.suspended_until is not None):
            up = SessionUp(command.session, command.user, command.edge, command.conn)
            out.extend(self.session_up(up))
        elif live:
            self._unconfirmed.pop(command.session, None)  # its edge named it: live
        out.append((command.edge, ClaimReply(command.session, command.conn, live, term=self.term)))
        return out

    def evicted(self, command: Evicted) -> list[Outbound]:
        """The edge of a replaced connection closed it: the resume may be welcomed."""
        held = self._held.get(command.session)
        if held is None or held.old_conn != command.conn:
            return []
        del self._held[command.session]
        return [(held.edge, held.reply)]

    def _release_held(self, out: list[Outbound], now: float, lost_edge: str = "") -> None:
        """Answer the held resumes whose old edge is gone, or that waited EVICT_WAIT."""
        for session, held in list(self._held.items()):
            if held.old_edge == lost_edge:
                pass  # it cannot answer, and its connections are closed with it
            elif held.deadline <= now:
                self.counters.evict_unconfirmed += 1
            else:
                continue
            del self._held[session]
            out.append((held.edge, held.reply))

    def edge_lost(self, edge: str, now: float) -> list[Outbound]:
        """``edge`` stopped heartbeating: its sessions start their resume windows now."""
        deadline = now + self.resume_window
        for session in list(self._connected_at.get(edge, ())):
            self._suspend(session, self.leases[session], deadline)
        self._unsubscribe_node(edge)  # a presence node that subscribed here: it re-subscribes
        out: list[Outbound] = []
        if self._held:
            self._release_held(out, now, lost_edge=edge)
        return self._finish(out, now)

    def edge_sync(self, command: EdgeSync) -> list[Outbound]:
        """Rebuild from an edge's announcement of all it holds."""
        out: list[Outbound] = []
        for up in command.sessions:
            if up.edge != command.edge:
                self.refused(command.edge, f"EdgeSync names {up.edge!r} for {up.session!r}")
                continue
            self._unconfirmed.pop(up.session, None)
            lease = self.leases.get(up.session)
            if lease is None or lease.conn != up.conn or lease.suspended_until is not None:
                out.extend(self.session_up(up))
        for session, users in command.watches.items():
            if session not in self.leases:
                continue  # (its lease is on another node, which gets these watches)
            self._add_watches(session, users)
            # The edge told its clients what it knew; it drops repeats of that itself.
            self._told.setdefault(session, {}).update({u: self.status(u) for u in users})
            self._subscribe_remote(users, out)
        return out

    def expire(self, now: float) -> list[Outbound]:
        """End the sessions whose resume window lapsed, earliest deadline first."""
        self._now = now
        out: list[Outbound] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, session, token = heapq.heappop(self._deadlines)
            lease = self.leases.get(session)
            if lease is None or lease.deadline_token != token:
                self._stale -= 1
                continue
            lease.deadline_token = 0  # popped: _end must not count it stale
            out.extend(self._end(session))
        self._compact_deadlines()
        if self._held:
            self._release_held(out, now)
        if self._copying:
            resend_late(self._copying.values(), now, self.copy_resend_after, out)
        if (self._settling or self._unconfirmed) and now >= self._settled_at:
            self._settle(out, now)
        if self._global:
            self._cross_tick(out, now)
        if self._owner_of is not None and now >= self._resubscribe_at:
            self._resubscribe_at = now + RESUBSCRIBE_INTERVAL
            self._resubscribe(out, only_unanswered=True)
            for key, pending in list(self._pending.items()):
                if pending.deadline <= now:
                    self._drop_pending(key)
                    self.counters.pending_dropped += 1
        return self._finish(out, now)

    def _suspend(self, session: str, lease: SessionLease, deadline: float) -> None:
        """Start (or restart) ``session``'s resume window: it is offline after ``deadline``."""
        self._dirty[session] = lease.user
        if lease.suspended_until is None:
            self._disconnect(session, lease.edge)
        elif lease.deadline_token:
            self._stale += 1  # superseded by the entry pushed below
        self._last_token += 1
        lease.suspended_until = deadline
        lease.deadline_token = self._last_token
        heapq.heappush(self._deadlines, (deadline, session, self._last_token))
        self._compact_deadlines()

    def _release(self, session: str, user: str, out: list[Outbound]) -> None:
        """``session`` no longer counts for ``user`` (offline if it was the last)."""
        sessions = self._sessions_of.get(user)
        if sessions is not None and session in sessions:
            sessions.discard(session)
            if not sessions:
                del self._sessions_of[user]
                self._notify(user, "online", out)

    def _unlink(self, session: str, lease: SessionLease) -> None:
        """``lease`` stops being ``session``'s: out of the edge index and the deadline heap."""
        if lease.suspended_until is None:
            self._disconnect(session, lease.edge)
        elif lease.deadline_token:
            self._stale += 1
            lease.deadline_token = 0
            self._compact_deadlines()

    def _disconnect(self, session: str, edge: str) -> None:
        connected = self._connected_at.get(edge)
        if connected is not None:
            connected.discard(session)
            if not connected:
                del self._connected_at[edge]

    def _compact_deadlines(self) -> None:
        """Rebuild the heap from its live entries once stale ones are more than half."""
        if 2 * self._stale <= len(self._deadlines):
            return
        leases = self.leases
        live = []
        for entry in self._deadlines:
            lease = leases.get(entry[1])
            if lease is not None and lease.deadline_token == entry[2]:
                live.append(entry)
        heapq.heapify(live)
        self._deadlines = live
        self._stale = 0

    def _end(self, session: str) -> list[Outbound]:
        out: list[Outbound] = []
        lease = self.leases.pop(session)
        self._dirty[session] = lease.user
        self._unlink(session, lease)
        self._release(session, lease.user, out)
        self._forget_watches(session, out)
        return out

    def _forget_watches(self, session: str, out: list[Outbound]) -> None:
        """``session`` watches nobody any more (its lease ended or left this node)."""
        self._told.pop(session, None)
        users = self._watched_by.pop(session, ())
        for user in users:
            watchers = self._watchers_of.get(user)
            if watchers is not None:
                watchers.discard(session)
                if not watchers:
                    del self._watchers_of[user]
        self._unsubscribe_unwatched(users, out)
        if self._pending:
            for key in [k for k in self._pending if k[0] == session]:
                self._drop_pending(key)

    # ----------------------------------------------------------------- watches

    def watch(self, command: WatchCmd, now: float = 0.0) -> list[Outbound]:
        """Start watching users; reply with their current status (once every user owned
        by another node has one here)."""
        out: list[Outbound] = []
        self._add_watches(command.session, command.users)
        if self._owner_of is not None:
            self._subscribe_remote(command.users, out)
            missing = {u for u in command.users if not self.owns(u) and u not in self._remote}
            if self._cross_deferred:
                missing.update(u for u in command.users if u in self._cross_deferred)
            if missing:
                key = (command.session, command.conn, command.seq)
                self._drop_pending(key)  # a resend replaces the first
                if len(self._pending) >= MAX_PENDING:
                    self.counters.pending_dropped += 1
                    return out
                self._pending[key] = PendingWatch(command, missing, now + PENDING_TIMEOUT)
                for user in missing:
                    self._awaiting.setdefault(user, set()).add(key)
                return out
        out.append(self._watch_reply(command))
        return out

    def _watch_reply(self, command: WatchCmd) -> Outbound:
        snapshot: dict[str, Status] = {user: self.status(user) for user in command.users}
        self._told.setdefault(command.session, {}).update(snapshot)
        versions = {user: self.version(user) for user in command.users}
        payload = encode_frame(
            WatchingFrame(presence=dict(snapshot), versions=versions, id=command.req)
        )
        return (command.edge, Reply(command.session, command.conn, command.seq, payload, True))

    def _drop_pending(self, key: tuple[str, str, int]) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        for user in pending.missing:
            keys = self._awaiting.get(user)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._awaiting[user]

    def unwatch(self, command: UnwatchCmd) -> list[Outbound]:
        """Stop watching users."""
        out: list[Outbound] = []
        lease = self.leases.get(command.session)
        if lease is not None:
            self._dirty[command.session] = lease.user
        watched = self._watched_by.get(command.session, set())
        told = self._told.get(command.session, {})
        for user in command.users:
            watched.discard(user)
            told.pop(user, None)
            watchers = self._watchers_of.get(user)
            if watchers is not None:
                watchers.discard(command.session)
                if not watchers:
                    del self._watchers_of[user]
        if not watched:
            self._watched_by.pop(command.session, None)
            self._told.pop(command.session, None)
        self._unsubscribe_unwatched(command.users, out)
        payload = encode_frame(UnwatchedFrame(id=command.req))
        out.append((command.edge, Reply(command.session, command.conn, command.seq, payload, True)))
        return out

    def watched_by(self, session: str) -> set[str]:
        """Users ``session`` watches."""
        return set(self._watched_by.get(session, ()))

    def _add_watches(self, session: str, users: list[str]) -> None:
        lease = self.leases.get(session)
        if lease is not None:
            self._dirty[session] = lease.user
        self._watched_by.setdefault(session, set()).update(users)
        for user in users:
            self._watchers_of.setdefault(user, set()).add(session)

    def _notify(self, user: str, was: Status, out: list[Outbound]) -> None:
        if user in self._region_subscribers:
            self._tell_regions(user, out)
        if self.hooks is not None and self.owns(user):
            self.hooks.status(user, self._note_status(user), self._now)
        now_status = self.status(user)
        if now_status == was or user in self._settling:
            if self.owns(user):
                self._note_status(user)
            return
        version = self.version(user)
        payload = encode_frame(PresenceFrame(user=user, status=now_status, version=version))
        by_edge: dict[str, list[str]] = {}
        for watcher in self._watchers_of.get(user, ()):
            lease = self.leases.get(watcher)
            if lease is not None and lease.suspended_until is None:
                by_edge.setdefault(lease.edge, []).append(watcher)
                self._told.setdefault(watcher, {})[user] = now_status
        for edge, sessions in by_edge.items():
            out.append((edge, Deliver(sessions, payload)))
        subscribers = self._subscribers.get(user)
        if subscribers:
            note = StatusNote(self.node_id, {user: now_status}, {user: version})
            for node in subscribers:
                out.append((node, note))

    # ----------------------------------------------------------------- sharding

    def view_changed(self, now: float) -> list[Outbound]:
        """``owner_of`` answers from a new view: forget what moved away, subscribe where
        owners changed, and answer no subscription for ``SYNC_GRACE``."""
        self._now = now
        out: list[Outbound] = []
        self._settled_at = now + SYNC_GRACE
        for session, lease in list(self.leases.items()):
            if not self.owns(lease.user):
                new_owner = self._owner_of(lease.user) if self._owner_of is not None else None
                if new_owner is not None and new_owner != self.node_id:
                    # Acknowledged as copies are: what waits for this session waits for it.
                    self._send_copy(session, lease.user, lease, new_owner, now, out, handoff=True)
                self._forget(session, lease, out)
        for session in [s for s in self._watched_by if s not in self.leases]:
            self._forget_watches(session, out)
        for user in [u for u in self._subscribers if not self.owns(u)]:
            del self._subscribers[user]  # its subscribers subscribe at its new owner
        for user in [u for u in self._versions if not self.owns(u)]:
            del self._versions[user]  # its new owner versions it (from the copies)
        if self._global:
            self._cross_view_changed(out)
        for user in [u for u in self._remote if self.owns(u)]:
            # Known from leases now, once the edges re-synced them.
            self._settling.setdefault(user, self._remote.pop(user))
            self._merge_version(user, self._remote_versions.pop(user, 0))
            self._unanswered.discard(user)
        for user in [u for u in self._awaiting if self.owns(u)]:
            self._status_known(user, out)
        for session, (copy, received) in list(self._copies.items()):
            if self.owns(copy.user):
                del self._copies[session]
                self._adopt(copy, received, now, out)
            elif self._replica_of is None or self._replica_of(copy.user) != self.node_id:
                del self._copies[session]  # another node is its runner-up now
        self._resubscribe(out, only_unanswered=False)
        # Every lease to its (maybe new) runner-up: a view change is rare, leases many,
        # so this costs one copy per lease per view change.
        self._dirty = {session: lease.user for session, lease in self.leases.items()}
        # Copies still unacknowledged that no new copy replaces: an ended session's to the
        # new runner-up, a handoff to the user's owner now; confirmed where nobody is left
        # to have them (the user moved away: its new owner has it from the edges).
        for session, copying in list(self._copying.items()):
            user = copying.user
            target: str | None = None
            if self.owns(user):
                target = self._replica_of(user) if self._replica_of is not None else None
                if target is not None and target != self.node_id and session in self.leases:
                    continue  # copied anew below
            elif isinstance(copying.message, LeaseCopy) and copying.message.handoff:
                target = self._owner_of(user) if self._owner_of is not None else None
            if target == self.node_id:
                target = None
            retarget(copying, target, now, out)
            if copying.confirmed:
                del self._copying[session]
                out.extend(self._acked_through(session, copying.seq))
        return self._finish(out, now)

    # ----------------------------------------------------------------- replication

    def _copy_of(
        self, session: str, user: str, lease: SessionLease | None, now: float, handoff: bool
    ) -> LeaseCopy:
        self._seq += 1
        version = self._versions.get(user) or self.version(user)
        if lease is None:
            return LeaseCopy(
                self.node_id,
                session,
                user,
                gone=True,
                seq=self._seq,
                term=self.term,
                version=version,
            )
        left = -1.0
        if lease.suspended_until is not None:
            left = max(0.0, lease.suspended_until - now)
        return LeaseCopy(
            self.node_id,
            session,
            lease.user,
            lease.edge,
            lease.conn,
            left,
            sorted(self._watched_by.get(session, ())),
            dict(self._told.get(session, {})),
            handoff=handoff,
            seq=self._seq,
            term=self.term,
            version=version,
        )

    def _send_copy(
        self,
        session: str,
        user: str,
        lease: SessionLease | None,
        target: str,
        now: float,
        out: list[Outbound],
        handoff: bool = False,
    ) -> int:
        """Send ``target`` the state of ``session``, to be acknowledged; its number."""
        copy = self._copy_of(session, user, lease, now, handoff)
        self._copying[session] = _Copying(copy, target, sent_at=now, user=user, seq=copy.seq)
        out.append((target, copy))
        return copy.seq

    def _copy_dirty(self, out: list[Outbound], now: float) -> dict[str, int]:
        """Copy each session changed by this call to its user's runner-up; what the call
        caused waits for these copies (session -> copy number)."""
        dirty, self._dirty = self._dirty, {}
        waits: dict[str, int] = {}
        if self._replica_of is None:
            return waits
        for session, user in dirty.items():
            if not self.owns(user):
                continue  # a lease held ahead of a view: its owner replicates it
            replica = self._replica_of(user)
            if replica is None or replica == self.node_id:
                continue
            lease = self.leases.get(session)
            waits[session] = self._send_copy(session, user, lease, replica, now, out)
        return waits

    def _finish(self, out: list[Outbound], now: float) -> list[Outbound]:
        """End a call: copy what it changed, and hold what it caused (answers, status
        notes, evictions) until the runner-ups acknowledged those copies. Answers to a
        session whose earlier copy is still unacknowledged wait for it too."""
        waits = self._copy_dirty(out, now) if self._dirty else {}
        if self._copying:
            for _, envelope in out:
                if isinstance(envelope, ClaimReply | Reply):
                    session = envelope.session
                    copying = self._copying.get(session)
                    if copying is not None and session not in waits:
                        waits[session] = copying.seq
        if not waits:
            return out
        held = [item for item in out if type(item[1]) not in _NEVER_HELD]
        if not held:
            return out
        sent = [item for item in out if type(item[1]) in _NEVER_HELD]
        if len(self._changes) >= MAX_HELD_CHANGES:
            # Full: the oldest goes out unacknowledged (as if its user had no runner-up).
            oldest = next(iter(self._changes))
            self.counters.copies_unconfirmed += 1
            sent.extend(self._let_out(oldest))
        number = self._next_change
        self._next_change += 1
        self._changes[number] = _HeldChange(waits, held)
        for session in waits:
            self._waiting.setdefault(session, set()).add(number)
        return sent

    def _let_out(self, number: int) -> list[Outbound]:
        change = self._changes.pop(number)
        for session in change.waits:
            numbers = self._waiting.get(session)
            if numbers is not None:
                numbers.discard(number)
                if not numbers:
                    del self._waiting[session]
        return change.out

    def copy_acked(self, ack: ReplicaAck) -> list[Outbound]:
        """A runner-up (or new owner) has copy ``ack.batch`` of session ``ack.room``: let
        out what waited for it (and for the copies before it)."""
        session, seq = ack.room, ack.batch
        if ack.refused:
            # It knows a newer owner: this node was deposed and reads so in a view soon;
            # nothing is let out on the strength of this copy.
            self.counters.copies_refused += 1
            return []
        copying = self._copying.get(session)
        if copying is not None and ack.replica and copying.target != ack.replica:
            # From a node the copy was not (last) sent to: a runner-up replaced since
            # vouches for nothing the new one may lack. (One naming no node comes from a
            # node of an earlier version, during a rolling upgrade: taken as before.)
            self.counters.late_acks += 1
            return []
        if copying is not None and copying.seq <= seq:
            del self._copying[session]
        return self._acked_through(session, seq)

    def _acked_through(self, session: str, seq: int) -> list[Outbound]:
        """The copies of ``session`` through ``seq`` are acknowledged (or need not be)."""
        out: list[Outbound] = []
        numbers = self._waiting.get(session)
        if not numbers:
            return out
        for number in sorted(numbers):
            change = self._changes.get(number)
            if change is None or change.waits.get(session, seq + 1) > seq:
                continue
            del change.waits[session]
            numbers.discard(number)
            if not change.waits:
                out.extend(self._let_out(number))
        if not numbers:
            self._waiting.pop(session, None)
        return out

    def copied(self, copy: LeaseCopy, now: float) -> list[Outbound]:
        """A copy of a session from its user's owner (or, ``handoff``, its old owner)."""
        out: list[Outbound] = [
            (copy.owner, ReplicaAck(copy.session, copy.seq, replica=self.node_id))
        ]
        if copy.handoff or (self.owns(copy.user) and self._owner_of is not None):
            if not copy.gone:
                self._adopt(copy, now, now, out)
            return out
        held = self._copies.get(copy.session)
        if held is not None:
            known = held[0]
            if known.owner == copy.owner and copy.seq <= known.seq:
                return out  # sent again (its ack was lost): what is held is as new
            if copy.term < known.term:
                # A node deposed since the held copy's owner took the user: refused, so
                # it lets nothing out on the strength of it.
                refusal = ReplicaAck(copy.session, copy.seq, True, known.term, self.node_id)
                return [(copy.owner, refusal)]
        if copy.gone:
            self._copies.pop(copy.session, None)
        else:
            self._copies[copy.session] = (copy, now)
        return out

    def _adopt(self, copy: LeaseCopy, received: float, now: float, out: list[Outbound]) -> None:
        """Take a copied session as a lease of this node's own (it owns the user now)."""
        self._merge_version(copy.user, copy.version)
        lease = self.leases.get(copy.session)
        if lease is not None and conn_supersedes(lease.conn, copy.conn):
            self._note_status(copy.user)
            return  # what an edge re-synced here is as new or newer
        deadline = None
        if copy.suspended_for >= 0:
            deadline = received + copy.suspended_for
            if deadline <= now:
                self._note_status(copy.user)
                return  # its resume window lapsed while it was a copy
        out.extend(self.session_up(SessionUp(copy.session, copy.user, copy.edge, copy.conn)))
        if deadline is not None:
            self._suspend(copy.session, self.leases[copy.session], deadline)
        else:
            self._unconfirmed[copy.session] = copy.edge
            self._settled_at = max(self._settled_at, now + SYNC_GRACE)
        if copy.watches:
            self._add_watches(copy.session, copy.watches)
            self._told.setdefault(copy.session, {}).update(copy.told)
            self._subscribe_remote(copy.watches, out)

    def _settle(self, out: list[Outbound], now: float) -> None:
        """The edges re-synced the users taken over: suspend the adopted connections no
        edge named, then tell watchers what differs."""
        unconfirmed, self._unconfirmed = self._unconfirmed, {}
        for session, edge in unconfirmed.items():
            lease = self.leases.get(session)
            if lease is not None and lease.suspended_until is None and lease.edge == edge:
                self._suspend(session, lease, now + self.resume_window)
        settling, self._settling = self._settling, {}
        for user, was in settling.items():
            if (
                self._cross_unanswered
                and now < self._settled_at + PENDING_TIMEOUT
                and self._cross_waits(user)
            ):
                # Its status in another region (link up) is not known yet (its new owner
                # here subscribed there): settled once noted, or PENDING_TIMEOUT at most.
                self._settling[user] = was
                continue
            if user in self._watchers_of and self.owns(user):
                self._notify(user, was, out)

    def _forget(self, session: str, lease: SessionLease, out: list[Outbound]) -> None:
        """Drop ``session``'s lease and watches without telling anyone: another node owns
        its user now, and the edges re-sync the session there."""
        del self.leases[session]
        self._unlink(session, lease)
        sessions = self._sessions_of.get(lease.user)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._sessions_of[lease.user]
        self._forget_watches(session, out)

    def subscribe(self, command: StatusSubscribe, now: float) -> list[Outbound]:
        """Another node wants the status of users this node owns (now and on change)."""
        for user in command.drop:
            subscribers = self._subscribers.get(user)
            if subscribers is not None:
                subscribers.discard(command.node)
                if not subscribers:
                    del self._subscribers[user]
        if now < self._settled_at:
            return []  # edges are still re-syncing: the subscriber asks again
        out: list[Outbound] = []
        owned: list[str] = []
        for user in command.users:
            if not self.owns(user):
                self.counters.misrouted += 1
                continue
            self._subscribers.setdefault(user, set()).add(command.node)
            owned.append(user)
        if self._global:
            self._cross_subscribe(owned, out)
            if self._cross_deferred:  # answered once the other regions noted them
                owned = [u for u in owned if u not in self._cross_deferred]
        if owned:
            statuses = {user: self.status(user) for user in owned}
            versions = {user: self.version(user) for user in owned}
            out.append((command.node, StatusNote(self.node_id, statuses, versions)))
        return out

    def noted(self, note: StatusNote) -> list[Outbound]:
        """An owner told this node the status of users watched here."""
        out: list[Outbound] = []
        for user, status in note.statuses.items():
            if self._subscribed.get(user) != note.owner or self.owns(user):
                self.counters.notes_ignored += 1
                continue
            version = note.versions.get(user, 0)
            known = self._remote_versions.get(user, 0)
            if version and version < known:
                self.counters.notes_ignored += 1  # older than one noted already
                continue
            self._unanswered.discard(user)
            was = self._remote.get(user)
            self._remote[user] = status
            self._remote_versions[user] = version
            if was is None:
                self._status_known(user, out)
            elif was != status:
                self._notify(user, was, out)
        return out

    def _status_known(self, user: str, out: list[Outbound]) -> None:
        """``user`` has a status here now: answer the watches that waited only for it
        (cost: the watches waiting for this user, not every waiting watch)."""
        for key in self._awaiting.pop(user, ()):
            pending = self._pending.get(key)
            if pending is None:
                continue
            pending.missing.discard(user)
            if not pending.missing:
                del self._pending[key]
                out.append(self._watch_reply(pending.command))

    def _subscribe_remote(self, users: list[str], out: list[Outbound]) -> None:
        """Subscribe at their owners to the watched ``users`` this node does not own (and,
        global presence, at their owners in the other regions to those it owns)."""
        if self._global:
            self._cross_subscribe(users, out)
        if self._owner_of is None:
            return
        by_owner: dict[str, list[str]] = {}
        for user in users:
            if self.owns(user) or user in self._subscribed:
                continue
            owner = self._owner_of(user)
            if owner is None:
                continue
            self._subscribed[user] = owner
            self._unanswered.add(user)
            by_owner.setdefault(owner, []).append(user)
        for owner, owned in by_owner.items():
            out.append((owner, StatusSubscribe(self.node_id, owned)))

    def _unsubscribe_unwatched(self, users: Iterable[str], out: list[Outbound]) -> None:
        """Stop the subscriptions of ``users`` nobody here watches any more."""
        if self._cross:
            self._cross_drop(users, out)
        if not self._subscribed:
            return
        by_owner: dict[str, list[str]] = {}
        for user in users:
            if user in self._watchers_of:
                continue
            owner = self._subscribed.pop(user, None)
            self._remote.pop(user, None)
            self._remote_versions.pop(user, None)
            self._unanswered.discard(user)
            if owner is not None:
                by_owner.setdefault(owner, []).append(user)
        for owner, dropped in by_owner.items():
            out.append((owner, StatusSubscribe(self.node_id, [], dropped)))

    def _resubscribe(self, out: list[Outbound], *, only_unanswered: bool) -> None:
        """Subscribe again: where no note came yet, or (view change) where owners moved."""
        assert self._owner_of is not None
        by_owner: dict[str, list[str]] = {}
        candidates = self._unanswered if only_unanswered else self._watchers_of
        for user in list(candidates):
            owner = None if self.owns(user) else self._owner_of(user)
            if owner is None:  # owned here now, or no view
                self._subscribed.pop(user, None)
                self._unanswered.discard(user)
                continue
            if self._subscribed.get(user) == owner and user not in self._unanswered:
                continue  # answered by its owner: changes come by themselves
            self._subscribed[user] = owner
            self._unanswered.add(user)
            by_owner.setdefault(owner, []).append(user)
        for owner, users in by_owner.items():
            out.append((owner, StatusSubscribe(self.node_id, users)))

    def peer_restarted(self, node: str, now: float) -> list[Outbound]:
        """``node`` restarted and forgot everything: subscribe there again, and copy it
        every lease it is the runner-up of."""
        out: list[Outbound] = []
        users = [u for u, owner in self._subscribed.items() if owner == node]
        if users:
            out.append((node, StatusSubscribe(self.node_id, users)))
        if self._replica_of is not None:
            self._dirty = {
                session: lease.user
                for session, lease in self.leases.items()
                if self._replica_of(lease.user) == node
            }
            # Copies of ended sessions it has not acknowledged: sent again, at once.
            for session, copying in self._copying.items():
                if copying.target == node and session not in self._dirty:
                    copying.sent_at = now
                    if copying.message is not None:
                        out.append((node, copying.message))
        return self._finish(out, now)

    def _unsubscribe_node(self, node: str) -> None:
        if self._region_subscribers:
            for user in [u for u, nodes in self._region_subscribers.items() if node in nodes]:
                nodes = self._region_subscribers[user]
                nodes.discard(node)
                if not nodes:
                    del self._region_subscribers[user]
                    self._regional_told.pop(user, None)
        for user in [u for u, nodes in self._subscribers.items() if node in nodes]:
            nodes = self._subscribers[user]
            nodes.discard(node)
            if not nodes:
                del self._subscribers[user]

    # ----------------------------------------------------------------- global presence

    def _wants_cross(self, user: str) -> bool:
        """Whether this node needs ``user``'s status in the other regions: it owns the
        user, and a session here or a subscribed node of this region watches it."""
        return self.owns(user) and (user in self._watchers_of or user in self._subscribers)

    def _cross_subscribe(self, users: Iterable[str], out: list[Outbound]) -> None:
        """Subscribe at their owners in the other regions to the regional status of the
        ``users`` this node newly needs it for."""
        assert self._owner_in is not None
        by_node: dict[str, list[str]] = {}
        for user in users:
            if user in self._cross or not self._wants_cross(user):
                continue
            at = self._cross[user] = {}
            for region in self._other_regions:
                node = self._owner_in(region, user)
                if node is None:
                    continue  # that region's view is not known (yet): subscribed with it
                at[region] = node
                self._cross_unanswered.add((user, region))
                by_node.setdefault(node, []).append(user)
                if node in self._up:
                    self._cross_deferred[user] = self._now + CROSS_WAIT
        self._cross_send(by_node, out)

    def _cross_drop(self, users: Iterable[str], out: list[Outbound]) -> None:
        """Stop the other regions' notes of ``users`` this node no longer needs."""
        by_node: dict[str, list[str]] = {}
        for user in users:
            if user not in self._cross or self._wants_cross(user):
                continue
            for region, node in self._cross.pop(user).items():
                self._cross_unanswered.discard((user, region))
                by_node.setdefault(node, []).append(user)
            self.regional.forget(user)
            self._cross_deferred.pop(user, None)
        for node, dropped in by_node.items():
            out.append((node, StatusSubscribe(self.node_id, [], dropped, region=self.region)))

    def _cross_send(self, by_node: dict[str, list[str]], out: list[Outbound]) -> None:
        for node, users in by_node.items():
            for start in range(0, len(users), CROSS_BATCH):
                batch = users[start : start + CROSS_BATCH]
                out.append((node, StatusSubscribe(self.node_id, batch, region=self.region)))

    def _cross_resubscribe(self, out: list[Outbound], pairs: Iterable[tuple[str, str]]) -> None:
        """Subscribe again for each (user, region) at the user's owner there now."""
        assert self._owner_in is not None
        by_node: dict[str, list[str]] = {}
        for user, region in pairs:
            at = self._cross.get(user)
            if at is None:
                continue
            node = self._owner_in(region, user)
            if node is None:
                continue
            at[region] = node
            self._cross_unanswered.add((user, region))
            by_node.setdefault(node, []).append(user)
        self._cross_send(by_node, out)

    def region_placement_changed(self, region: str, now: float) -> list[Outbound]:
        """Another region's presence view (or its nodes) changed: subscribe where its owners
        of the users watched here moved. The last status noted stays until the new owner
        notes one (it answers once its own edges re-synced)."""
        if not self._global:
            return []
        assert self._owner_in is not None
        moved = [
            (user, region)
            for user, at in self._cross.items()
            if at.get(region) != self._owner_in(region, user)
        ]
        out: list[Outbound] = []
        self._cross_resubscribe(out, moved)
        return self._finish(out, now)

    def remote_down(self, node: str, now: float) -> None:
        """The link to ``node`` (another region's presence node) stopped heartbeating: what
        it noted is stale ``stale_after`` from now unless the link comes back."""
        self._down_since.setdefault(node, now)
        self._up.discard(node)

    def remote_up(self, node: str, now: float) -> list[Outbound]:
        """The link to ``node`` (another region's presence node) is up: subscribe there
        again to everything subscribed at it (it answers with the status now)."""
        self._down_since.pop(node, None)
        self._stale_marked.discard(node)
        self._up.add(node)
        if not self._global:
            return []
        out: list[Outbound] = []
        pairs = [(u, r) for u, at in self._cross.items() for r, n in at.items() if n == node]
        self._cross_resubscribe(out, pairs)
        return self._finish(out, now)

    def _cross_tick(self, out: list[Outbound], now: float) -> None:
        """Resend unanswered subscriptions (with the resubscription interval), mark what
        nodes down for ``stale_after`` noted as offline, sweep unneeded subscriptions."""
        if now >= self._cross_refresh_at:
            # Everything, now and then: the answers repair notes lost on the way.
            if self._cross_refresh_at > float("-inf"):
                self._cross_unanswered.update(
                    (user, region) for user, at in self._cross.items() for region in at
                )
            self._cross_refresh_at = now + CROSS_REFRESH_INTERVAL
            self._cross_resend_at = now
        if self._cross_unanswered and now >= self._cross_resend_at:
            # Not to a node whose link is down: ``remote_up`` subscribes there again.
            self._cross_resend_at = now + RESUBSCRIBE_INTERVAL
            self._cross_resubscribe(
                out,
                [
                    (user, region)
                    for user, region in self._cross_unanswered
                    if self._cross.get(user, {}).get(region) not in self._down_since
                ],
            )
        for node, since in self._down_since.items():
            if node in self._stale_marked or now - since < self.stale_after:
                continue
            self._stale_marked.add(node)
            for user in self.regional.node_stale(node):
                self._notify(user, "online", out)
        if self._cross_deferred:
            for user in [u for u, until in self._cross_deferred.items() if until <= now]:
                self._cross_resolved(user, out)
        if now >= self._cross_swept_at:
            self._cross_swept_at = now + CROSS_SWEEP_INTERVAL
            self._cross_drop(list(self._cross), out)

    def _cross_view_changed(self, out: list[Outbound]) -> None:
        """This region's view changed: drop the other regions' notes of users owned
        elsewhere now, subscribe for the watched users owned here now."""
        self._cross_drop([u for u in self._cross if not self.owns(u)], out)
        for user in [u for u in self._region_subscribers if not self.owns(u)]:
            del self._region_subscribers[user]  # its subscribers move to its new owner
            self._regional_told.pop(user, None)
        self._cross_subscribe([*self._watchers_of, *self._subscribers], out)

    def region_subscribe(self, command: StatusSubscribe, now: float) -> list[Outbound]:
        """A node of another region (the users' owner there) wants their regional status
        here, now and on every change."""
        for user in command.drop:
            nodes = self._region_subscribers.get(user)
            if nodes is not None:
                nodes.discard(command.node)
                if not nodes:
                    del self._region_subscribers[user]
                    self._regional_told.pop(user, None)
        if now < self._settled_at:
            return []  # edges are still re-syncing: the subscriber asks again
        statuses: dict[str, Status] = {}
        versions: dict[str, int] = {}
        for user in command.users:
            if not self.owns(user) or (
                user not in self._region_subscribers
                and len(self._region_subscribers) >= MAX_REGION_SUBSCRIBED
            ):
                self.counters.misrouted += 1
                continue
            self._region_subscribers.setdefault(user, set()).add(command.node)
            online, version = self._regional_state(user)
            statuses[user] = "online" if online else "offline"
            versions[user] = version
        if not statuses:
            return []
        return [(command.node, StatusNote(self.node_id, statuses, versions, self.region))]

    def _regional_state(self, user: str) -> tuple[bool, int]:
        """Owned ``user``'s status in this region (leases here only) and its regional
        version, moved on if the status changed since last told."""
        online = bool(self._sessions_of.get(user))
        told = self._regional_told.get(user)
        if told is not None and told[0] == online:
            return told
        state = (online, _next_version(told[1] if told else 0, online, self._version_floor()))
        self._regional_told[user] = state
        return state

    def _tell_regions(self, user: str, out: list[Outbound]) -> None:
        """Note ``user``'s regional status to the other regions' subscribers if it changed."""
        told = self._regional_told.get(user)
        if told is not None and told[0] == bool(self._sessions_of.get(user)):
            return
        online, version = self._regional_state(user)
        note = StatusNote(
            self.node_id, {user: "online" if online else "offline"}, {user: version}, self.region
        )
        for node in self._region_subscribers.get(user, ()):
            out.append((node, note))

    def region_noted(self, note: StatusNote) -> list[Outbound]:
        """A user's owner in another region noted its regional status there."""
        out: list[Outbound] = []
        for user, status in note.statuses.items():
            at = self._cross.get(user)
            if at is None or at.get(note.region) != note.owner or not self.owns(user):
                self.counters.notes_ignored += 1
                continue
            self._cross_unanswered.discard((user, note.region))
            was = self.status(user)
            version = note.versions.get(user, 0)
            if not self.regional.note(user, note.region, note.owner, status, version):
                self.counters.notes_ignored += 1
            elif user not in self._cross_deferred:
                self._notify(user, was, out)
            if user in self._cross_deferred and not self._cross_waits(user):
                self._cross_resolved(user, out)
        return out

    def _cross_waits(self, user: str) -> bool:
        """Whether a region whose link is up has not answered ``user``'s subscription."""
        at = self._cross.get(user, {})
        return any((user, r) in self._cross_unanswered and n in self._up for r, n in at.items())

    def _cross_resolved(self, user: str, out: list[Outbound]) -> None:
        """The other regions answered for newly watched ``user`` (or ``CROSS_WAIT``
        passed): answer the watches and subscriptions that waited, and tell any other
        watcher whose last status differs."""
        if self._cross_deferred.pop(user, None) is None or not self.owns(user):
            return
        self._status_known(user, out)
        status, version = self.status(user), self.version(user)
        subscribers = self._subscribers.get(user)
        if subscribers:
            note = StatusNote(self.node_id, {user: status}, {user: version})
            for node in subscribers:
                out.append((node, note))
        by_edge: dict[str, list[str]] = {}
        for watcher in () if user in self._settling else self._watchers_of.get(user, ()):
            told = self._told.get(watcher)
            lease = self.leases.get(watcher)
            if told is None or told.get(user, status) == status:
                continue
            if lease is not None and lease.suspended_until is None:
                by_edge.setdefault(lease.edge, []).append(watcher)
                told[user] = status
        if by_edge:
            payload = encode_frame(PresenceFrame(user=user, status=status, version=version))
            for edge, sessions in by_edge.items():
                out.append((edge, Deliver(sessions, payload)))
