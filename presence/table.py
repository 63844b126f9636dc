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
one still open elsewhere.

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
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Literal

from signalpost.wire import (
    ClaimCmd,
    ClaimReply,
    Deliver,
    EdgeSync,
    Envelope,
    Evict,
    PresenceFrame,
    Reply,
    SessionDown,
    SessionUp,
    UnwatchCmd,
    UnwatchedFrame,
    WatchCmd,
    WatchingFrame,
    conn_supersedes,
    encode_frame,
)

Outbound = tuple[str, Envelope]
Status = Literal["online", "offline"]


@dataclass(slots=True)
class SessionLease:
    user: str
    edge: str
    conn: str
    suspended_until: float | None = None
    #: Names this lease's live entry in the deadline heap; 0 while it has none.
    deadline_token: int = 0


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

    def __init__(self, *, resume_window: float) -> None:
        self.resume_window = resume_window
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

    def status(self, user: str) -> Status:
        """``online`` while any session of ``user`` holds a lease."""
        return "online" if self._sessions_of.get(user) else "offline"

    def handle(self, command: Envelope, now: float) -> list[Outbound]:
        """Apply one command from an edge; return what to send."""
        if isinstance(command, SessionUp):
            return self.session_up(command)
        if isinstance(command, SessionDown):
            return self.session_down(command, now)
        if isinstance(command, ClaimCmd):
            return self.claim(command, now)
        if isinstance(command, WatchCmd):
            return self.watch(command)
        if isinstance(command, UnwatchCmd):
            return self.unwatch(command)
        if isinstance(command, EdgeSync):
            return self.edge_sync(command)
        return []

    # ----------------------------------------------------------------- leases

    def session_up(self, command: SessionUp) -> list[Outbound]:
        """A connection now holds ``command.session``."""
        out: list[Outbound] = []
        lease = self.leases.get(command.session)
        if lease is not None:
            if not conn_supersedes(command.conn, lease.conn):
                return out  # an older connection's late word: the newer one keeps the lease
            if lease.conn != command.conn and lease.suspended_until is None:
                out.append((lease.edge, Evict(command.session, lease.conn)))
            self._unlink(command.session, lease)
            if lease.user != command.user:
                # (Sessions belong to one user; a node that says otherwise must at least
                # not leave the previous user online for good.)
                self._release(command.session, lease.user, out)
        was = self.status(command.user)
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
        lease = self.leases.get(command.session)
        if lease is not None and lease.suspended_until is not None and lease.suspended_until <= now:
            out.extend(self._end(command.session))
            lease = None
        if (
            lease is None
            or lease.user != command.user
            or not conn_supersedes(command.conn, lease.conn)
        ):
            out.append((command.edge, ClaimReply(command.session, command.conn, False)))
            return out
        out.extend(
            self.session_up(SessionUp(command.session, command.user, command.edge, command.conn))
        )
        watching: dict[str, Status] = {
            user: self.status(user) for user in sorted(self._watched_by.get(command.session, ()))
        }
        told = self._told.setdefault(command.session, {})
        changed = [user for user, status in watching.items() if told.get(user) != status]
        told.update(watching)
        out.append(
            (command.edge, ClaimReply(command.session, command.conn, True, watching, changed))
        )
        return out

    def edge_lost(self, edge: str, now: float) -> list[Outbound]:
        """``edge`` stopped heartbeating: its sessions start their resume windows now."""
        deadline = now + self.resume_window
        for session in list(self._connected_at.get(edge, ())):
            self._suspend(session, self.leases[session], deadline)
        return []

    def edge_sync(self, command: EdgeSync) -> list[Outbound]:
        """Rebuild from an edge's announcement of all it holds."""
        out: list[Outbound] = []
        for up in command.sessions:
            lease = self.leases.get(up.session)
            if lease is None or lease.conn != up.conn or lease.suspended_until is not None:
                out.extend(self.session_up(up))
        for session, users in command.watches.items():
            self._add_watches(session, users)
            # The edge told its clients what it knew; it drops repeats of that itself.
            self._told.setdefault(session, {}).update({u: self.status(u) for u in users})
        return out

    def expire(self, now: float) -> list[Outbound]:
        """End the sessions whose resume window lapsed, earliest deadline first."""
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
        return out

    def _suspend(self, session: str, lease: SessionLease, deadline: float) -> None:
        """Start (or restart) ``session``'s resume window: it is offline after ``deadline``."""
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
        self._unlink(session, lease)
        self._release(session, lease.user, out)
        self._told.pop(session, None)
        for user in self._watched_by.pop(session, ()):
            watchers = self._watchers_of.get(user)
            if watchers is not None:
                watchers.discard(session)
                if not watchers:
                    del self._watchers_of[user]
        return out

    # ----------------------------------------------------------------- watches

    def watch(self, command: WatchCmd) -> list[Outbound]:
        """Start watching users; reply with their current status."""
        self._add_watches(command.session, command.users)
        snapshot: dict[str, Status] = {user: self.status(user) for user in command.users}
        self._told.setdefault(command.session, {}).update(snapshot)
        payload = encode_frame(WatchingFrame(presence=dict(snapshot), id=command.req))
        return [(command.edge, Reply(command.session, command.conn, command.seq, payload, True))]

    def unwatch(self, command: UnwatchCmd) -> list[Outbound]:
        """Stop watching users."""
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
        payload = encode_frame(UnwatchedFrame(id=command.req))
        return [(command.edge, Reply(command.session, command.conn, command.seq, payload, True))]

    def watched_by(self, session: str) -> set[str]:
        """Users ``session`` watches."""
        return set(self._watched_by.get(session, ()))

    def _add_watches(self, session: str, users: list[str]) -> None:
        self._watched_by.setdefault(session, set()).update(users)
        for user in users:
            self._watchers_of.setdefault(user, set()).add(session)

    def _notify(self, user: str, was: Status, out: list[Outbound]) -> None:
        now_status = self.status(user)
        if now_status == was:
            return
        payload = encode_frame(PresenceFrame(user=user, status=now_status))
        by_edge: dict[str, list[str]] = {}
        for watcher in self._watchers_of.get(user, ()):
            lease = self.leases.get(watcher)
            if lease is not None and lease.suspended_until is None:
                by_edge.setdefault(lease.edge, []).append(watcher)
                self._told.setdefault(watcher, {})[user] = now_status
        for edge, sessions in by_edge.items():
            out.append((edge, Deliver(sessions, payload)))
