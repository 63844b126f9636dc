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
"""

from __future__ import annotations

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


class PresenceTable:
    """Who is online, and who wants to know."""

    def __init__(self, *, resume_window: float) -> None:
        self.resume_window = resume_window
        self.leases: dict[str, SessionLease] = {}
        self._sessions_of: dict[str, set[str]] = {}  # user -> sessions with a lease
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
        if lease is not None and lease.conn != command.conn and lease.suspended_until is None:
            out.append((lease.edge, Evict(command.session, lease.conn)))
        was = self.status(command.user)
        self.leases[command.session] = SessionLease(command.user, command.edge, command.conn)
        self._sessions_of.setdefault(command.user, set()).add(command.session)
        self._notify(command.user, was, out)
        return out

    def session_down(self, command: SessionDown, now: float) -> list[Outbound]:
        """The connection ended (the session ends) or dropped (its resume window starts)."""
        lease = self.leases.get(command.session)
        if lease is None or lease.conn != command.conn:
            return []  # stale: the session already moved to another connection
        if command.ended:
            return self._end(command.session)
        lease.suspended_until = now + self.resume_window
        return []

    def claim(self, command: ClaimCmd, now: float) -> list[Outbound]:
        """May ``session`` resume? Yes while it holds a lease for the same user.

        A lease whose resume window lapsed is over even if ``expire`` has not run yet.
        """
        out: list[Outbound] = []
        lease = self.leases.get(command.session)
        if lease is not None and lease.suspended_until is not None and lease.suspended_until <= now:
            out.extend(self._end(command.session))
            lease = None
        if lease is None or lease.user != command.user:
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
        for lease in self.leases.values():
            if lease.edge == edge and lease.suspended_until is None:
                lease.suspended_until = now + self.resume_window
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
        """End the sessions whose resume window lapsed."""
        out: list[Outbound] = []
        lapsed = [
            session
            for session, lease in self.leases.items()
            if lease.suspended_until is not None and lease.suspended_until <= now
        ]
        for session in lapsed:
            out.extend(self._end(session))
        return out

    def _end(self, session: str) -> list[Outbound]:
        out: list[Outbound] = []
        lease = self.leases.pop(session)
        sessions = self._sessions_of.get(lease.user)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._sessions_of[lease.user]
                self._notify(lease.user, "online", out)
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
