"""Who may own what: a numbered view of a tier's nodes, agreed in Consul's consistent KV.

Two tiers own things by rendezvous hashing over their nodes: brokers own rooms, presence
nodes own users. Each tier keeps its own view, under its own prefix (``Tier``):
``signalpost/<tier>/view`` and ``signalpost/<tier>/members/``; the rules below are the
same for both, and live once, here.

Heartbeats say which nodes look alive; only Consul says who may act. With Consul
configured, the nodes of a tier keep one key, ``signalpost/<tier>/view``: ``{"number": n,
"brokers": [...]}`` (the members' placement ids; the JSON name is the one the key had when
only brokers kept a view, so a rolling upgrade reads the view already stored). Every node
places what its tier owns by rendezvous hashing over the members of the newest view it has
read, so within one view a room (a user) has exactly one owner, and the view's number is
the term of every ownership that starts in it (a deposed owner's term is always lower: its
replica and the edges refuse it, broker/rooms.py).

How the view changes:

* each node holds a Consul session tied to its service's health check (its
  ``/healthz``, polled every second) and, with it, the key
  ``signalpost/<tier>/members/<placement id, base64url>`` (ids hold ``//``, which a
  Consul key path would not keep). A node that dies, hangs or is paused
  fails the check; Consul invalidates its session and deletes its key;
* every node of the tier follows the prefix with blocking queries. When the members differ
  from the view, it writes the next view (number + 1) with check-and-set on the key's
  ``ModifyIndex``: of nodes racing, exactly one write succeeds, and they all read it.

Consul down: the last view stands (no failover until it is back). A ``-dev`` agent that
restarts forgets the view and the sessions: the nodes write back the view they knew
(number + 1, or the wall clock in milliseconds if higher: numbers never go backwards) and
re-acquire their keys; a node that does not re-appear within ``RESET_GRACE`` leaves the
view then. A node that has just started cannot tell such a reset from nodes that are gone:
it gives the keyless members of the first view it reads the same grace, and, finding no
view at all, it writes none of its own while nodes registered in Consul hold no key (at
most ``RESET_GRACE``): otherwise a node restarted into a reset writes a view of itself.

``ViewKeeper`` is the sans-I/O core (Consul's answers and time in, the write to try out);
``TierMembership`` (a node's part) and ``follow_view`` (an edge's part) are the shells.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import msgspec

from signalpost.discovery import (
    MIN_QUERY_INTERVAL,
    QUERY_WAIT,
    acl_denied,
    consul_client,
)
from signalpost.lifecycle import cancel_all, spawn
from signalpost.lifecycle import in_thread as _in_thread

log = logging.getLogger("signalpost.ownership")

#: After Consul lost its state, how long a node of the last view has to re-acquire its
#: key before a new view leaves it out.
RESET_GRACE: Final = 10.0
#: Longest wait between two reads of the view while Consul does not answer.
VIEW_MAX_BACKOFF: Final = 1.0
#: How often a node without a session (or key) tries again.
RETRY_INTERVAL: Final = 0.25


@dataclass(frozen=True)
class Tier:
    """Where one tier keeps its view and member keys in Consul's KV."""

    name: str  # "brokers", "presence"

    @property
    def prefix(self) -> str:
        return f"signalpost/{self.name}/"

    @property
    def view_key(self) -> str:
        return self.prefix + "view"

    @property
    def members(self) -> str:
        return self.prefix + "members/"

    def member_key(self, placement_id: str) -> str:
        encoded = base64.urlsafe_b64encode(placement_id.encode()).decode().rstrip("=")
        return self.members + encoded

    def member_of(self, key: str) -> str | None:
        """The placement id a member key names (None: not one)."""
        if not key.startswith(self.members):
            return None
        name = key[len(self.members) :]
        try:
            return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None


BROKERS: Final = Tier("brokers")
PRESENCE: Final = Tier("presence")


class View(msgspec.Struct, frozen=True):
    """The nodes of a tier that own its keys, and the number (term) of this arrangement."""

    number: int
    #: Placement ids, sorted. Stored as ``brokers``: see the module docstring.
    members: tuple[str, ...] = msgspec.field(name="brokers")

    def __contains__(self, member: object) -> bool:
        return member in self.members


_view_decoder = msgspec.json.Decoder(View)


def encode_view(view: View) -> bytes:
    return msgspec.json.encode(view)


def decode_view(raw: bytes | None) -> View | None:
    """A stored view; None when missing or not a view (then it is written anew)."""
    if not raw:
        return None
    try:
        view = _view_decoder.decode(raw)
    except msgspec.DecodeError:
        log.warning("ignoring a malformed view in Consul: %r", raw[:200])
        return None
    return view if view.number > 0 and view.members else None


def _wall_ms() -> int:
    return int(time.time() * 1000)


# --------------------------------------------------------------------------- sans-I/O core


@dataclass(frozen=True)
class Proposal:
    """Write ``view`` if the key's ``ModifyIndex`` is still ``cas`` (0: the key is absent)."""

    view: View
    cas: int


class ViewKeeper:
    """What one node reads from Consul and what it proposes to write there (any tier).

    ``answered`` takes one answer of the prefix: the stored view (None if absent), its
    ``ModifyIndex``, and the nodes whose member keys are held. ``current`` is the newest
    view this node has read (never older than one it read before).
    """

    def __init__(
        self, *, reset_grace: float = RESET_GRACE, wall_ms: Callable[[], int] = _wall_ms
    ) -> None:
        self.current: View | None = None
        self._reset_grace = reset_grace
        self._wall_ms = wall_ms
        self._reset_at: float | None = None  # when Consul was seen to have lost its state
        self._back_since_reset: set[str] = set()
        self._first_wait_since: float | None = None  # waiting to write a first view
        self._started_at: float | None = None  # this keeper's first answer
        self._seen_since_start: set[str] = set()

    def answered(
        self,
        stored: View | None,
        index: int,
        members: Iterable[str],
        now: float,
        reset: bool = False,
        registered: Iterable[str] = (),
    ) -> Proposal | None:
        """``reset``: the answer comes from a Consul that lost its state (its index went
        backwards). Another node may have written the view back already, so this one
        would not see the key missing; the nodes of the view get their grace all the
        same. ``registered``: the tier's nodes registered (and passing) in Consul's catalog."""
        present = set(members)
        known = self.current
        if reset and known is not None:
            # Each reset starts the grace anew: a second one within the first's grace
            # finds every key gone again (the members that came back count no more).
            self._reset_at = now
            self._back_since_reset = set()
        if known is None and self._started_at is None:
            # This node's first read (it just started): it cannot tell a Consul that lost
            # its state (the others' keys not taken back yet) from nodes that are gone.
            # Missing keys get the grace; a node that is gone leaves by the others' word.
            self._started_at = now
        if stored is not None and (known is None or stored.number >= known.number):
            if known is None or stored.number > known.number:
                self.current = known = stored  # else the same view, read again
            base, number, cas = stored.members, stored.number + 1, index
        elif known is not None:
            # The key is gone, or holds a lower number written by a node that knew
            # less: Consul lost its state (again, perhaps). Write back what was known,
            # numbered above it; the grace counts from now.
            self._reset_at = now
            self._back_since_reset = set()
            base, number = known.members, known.number + 1
            cas = 0 if stored is None else index
            if stored is None:
                number = max(number, self._wall_ms())
        else:  # nothing stored and nothing known: the first view of a new cluster...
            if not present:
                return None
            # ... or of a Consul that lost its state, seen by a node that just (re)started:
            # the running nodes have not taken their keys back yet (they know the old view
            # and write it back). A view of this node alone would move every room to it,
            # empty. So while registered nodes hold no key, wait (at most the grace).
            if set(registered) - present:
                if self._first_wait_since is None:
                    self._first_wait_since = now
                if now - self._first_wait_since < self._reset_grace:
                    return None
            return Proposal(View(self._wall_ms(), tuple(sorted(present))), 0)
        if self._reset_at is not None:
            self._back_since_reset |= present
            if now - self._reset_at >= self._reset_grace:
                self._reset_at = None
        if self._started_at is not None:
            self._seen_since_start |= present
            if now - self._started_at >= self._reset_grace:
                self._started_at = None
        wanted = set(base) | present
        for member in base:
            if member not in present and self._may_remove(member):
                wanted.discard(member)
        members = tuple(sorted(wanted))
        if not members:
            members = tuple(base)  # a view is never empty
        if known == stored and members == known.members:
            return None
        return Proposal(View(number, members), cas)

    def _may_remove(self, member: str) -> bool:
        """A node whose key is missing leaves the view at once, except just after Consul
        lost its state or this node started: then only once it came back and went again,
        or the grace ran out."""
        if self._reset_at is not None and member not in self._back_since_reset:
            return False
        return self._started_at is None or member in self._seen_since_start


# --------------------------------------------------------------------------- I/O shells


def _split(
    tier: Tier, items: list[dict[str, Any]] | None
) -> tuple[View | None, int, list[str], int]:
    """The stored view, its ModifyIndex, the held member keys of a prefix answer, and the
    view key's CreateIndex (it changes only when the key is created anew: a Consul that
    lost its state)."""
    view: View | None = None
    index = created = 0
    members: list[str] = []
    for item in items or []:
        key = item.get("Key", "")
        if key == tier.view_key:
            view = decode_view(item.get("Value"))
            index = int(item.get("ModifyIndex") or 0)
            created = int(item.get("CreateIndex") or 0)
        elif key.startswith(tier.members) and item.get("Session"):
            member = tier.member_of(key)
            if member is not None:
                members.append(member)
    return view, index, members, created


async def _follow(
    address: str,
    tier: Tier,
    on_answer: Callable[[list[dict[str, Any]] | None, float, bool], None],
    dc: str | None = None,
    token: str | None = None,
) -> None:
    """Blocking queries on the tier's prefix until cancelled; ``on_answer(items, now, reset)``
    each time (``reset``: Consul's index went backwards, it lost its state). ``dc``: the
    tier of another datacenter (region), read through this agent."""
    client = consul_client(address, token)
    loop = asyncio.get_running_loop()
    index = 0
    errors = 0
    while True:
        started = loop.time()

        def query(index: int = index) -> Any:
            if index:
                return client.kv.get(
                    tier.prefix,
                    recurse=True,
                    index=index,
                    wait=f"{QUERY_WAIT:.1f}s",
                    consistency="consistent",
                    dc=dc,
                )
            return client.kv.get(tier.prefix, recurse=True, consistency="consistent", dc=dc)

        try:
            new_index, items = await _in_thread(query)
        except Exception as exc:
            if not acl_denied(address, f"read {tier.prefix}", exc) and not errors:
                log.warning("Consul KV at %s: %s; keeping the last view", address, exc)
            errors += 1
            # Capped low: a view written back after Consul lost its state must be read
            # (and a missing one written back) soon after it returns.
            await asyncio.sleep(min(VIEW_MAX_BACKOFF, MIN_QUERY_INTERVAL * 2**errors))
            continue
        errors = 0
        new = int(new_index or 0)
        # An index that goes backwards means Consul lost its state (restart): start over.
        reset = 0 < new < index
        index = new if new > 0 and new >= index else 0
        on_answer(items, loop.time(), reset)
        await asyncio.sleep(max(0.0, started + MIN_QUERY_INTERVAL - loop.time()))


async def follow_view(
    address: str,
    tier: Tier,
    on_view: Callable[[View], None],
    dc: str | None = None,
    token: str | None = None,
) -> None:
    """Call ``on_view`` with every newer view of ``tier`` (an edge's part: it only reads);
    ``dc``: of another datacenter (region)."""
    newest: list[View] = []

    def answer(items: list[dict[str, Any]] | None, now: float, reset: bool) -> None:
        view, _index, _members, _created = _split(tier, items)
        if view is not None and (not newest or view.number > newest[0].number):
            newest[:] = [view]
            on_view(view)

    await _follow(address, tier, answer, dc, token)


class TierMembership:
    """A node's part: hold its member key in ``tier``, keep the tier's view, report every
    newer view."""

    def __init__(
        self,
        address: str,
        tier: Tier,
        placement_id: str,
        service_id: str,
        on_view: Callable[[View], None],
        keeper: ViewKeeper | None = None,
        registered: Callable[[], Iterable[str]] = tuple,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.token = token
        #: The tier's nodes registered in Consul now (the node's discovery watch).
        self.registered = registered
        self.tier = tier
        self.placement_id = placement_id
        self.service_id = service_id  # its health check invalidates the session
        self.on_view = on_view
        self.keeper = keeper or ViewKeeper()
        self._client = consul_client(address, token)
        self._session: str | None = None
        self._member = asyncio.Event()  # this node's key is missing: (re)acquire it
        self._writing = False
        self._view_created = 0  # the view key's CreateIndex last seen
        self._tasks: list[asyncio.Task[None]] = []
        # Until a view written after this process took its member key names it, a view
        # that names it is its predecessor's (a node restarted under the same id): this
        # node owns nothing by it (``on_view`` gets it without this node), and writes it
        # again to have one of its own. Once vouched, never again (``_vouched_view``).
        self._vouched = False
        self._delivered: View | None = None

    def start(self) -> None:
        self._tasks = [
            spawn(self._hold_key(), "ownership-member"),
            spawn(
                _follow(self.address, self.tier, self._answered, token=self.token),
                "ownership-view",
            ),
        ]

    async def leave(self) -> None:
        """Give up the member key (SIGTERM): the next view leaves this node out."""
        session = self._session
        for task in self._tasks[:1]:
            task.cancel()
        if session is not None:
            try:
                async with asyncio.timeout(3):
                    await _in_thread(lambda: self._client.session.destroy(session))
            except Exception as exc:
                log.warning("could not leave the view: %s", exc)

    async def close(self) -> None:
        await cancel_all(self._tasks)

    def _answered(self, items: list[dict[str, Any]] | None, now: float, reset: bool) -> None:
        stored, index, members, created = _split(self.tier, items)
        if created:
            # The view key created anew (not by this node's first write): Consul lost
            # its state, whichever node wrote the view back.
            reset = reset or (self._view_created not in (0, created))
            self._view_created = created
        before = self.keeper.current
        proposal = self.keeper.answered(
            stored, index, members, now, reset, registered=self.registered()
        )
        current = self.keeper.current
        if current is not before and current is not None:
            log.info("%s view %d: %s", self.tier.name, current.number, ", ".join(current.members))
        if current is not None:
            effective, rewrite = self._vouched_view(current, stored, index, items)
            if effective != self._delivered:
                self._delivered = effective
                self.on_view(effective)
            if rewrite and proposal is None and stored is not None:
                # A view from before this process joined, naming it: written again (the
                # same members, the next number) it becomes one this process can act on.
                proposal = Proposal(View(stored.number + 1, stored.members), index)
        if self.placement_id not in members:
            self._member.set()
        if proposal is not None and not self._writing:
            self._writing = True
            asyncio.get_running_loop().create_task(self._write(proposal))

    def _vouched_view(
        self,
        current: View,
        stored: View | None,
        index: int,
        items: list[dict[str, Any]] | None,
    ) -> tuple[View, bool]:
        """``current``, or ``current`` without this node while only a view from before this
        process took its member key names it (see ``__init__``); and whether to write the
        view again (the key is held, the view is older than it)."""
        if self._vouched or self.placement_id not in current:
            return current, False
        mine, session = self.tier.member_key(self.placement_id), self._session
        held_at = 0
        for item in items or []:
            if session and item.get("Key") == mine and item.get("Session") == session:
                held_at = int(item.get("ModifyIndex") or 0)
        if held_at and stored is not None and stored == current and index > held_at:
            self._vouched = True
            return current, False
        others = tuple(m for m in current.members if m != self.placement_id)
        return View(current.number, others), bool(held_at) and stored == current

    async def _write(self, proposal: Proposal) -> None:
        body = encode_view(proposal.view)
        try:
            written = await _in_thread(
                lambda: self._client.kv.put(self.tier.view_key, body, cas=proposal.cas)
            )
            if written:
                view = proposal.view
                log.info(
                    "wrote %s view %d: %s", self.tier.name, view.number, ", ".join(view.members)
                )
        except Exception as exc:
            if not acl_denied(self.address, f"write {self.tier.view_key}", exc):
                log.warning("could not write view %d: %s", proposal.view.number, exc)
        finally:
            self._writing = False

    async def _hold_key(self) -> None:
        """Keep a session tied to this node's health check and the member key with it."""
        await self._destroy_stale_sessions()
        self._member.set()
        while True:
            await self._member.wait()
            if await self._acquire():
                self._member.clear()
            else:
                await asyncio.sleep(RETRY_INTERVAL)

    async def _destroy_stale_sessions(self) -> None:
        """A previous process under this placement id (it binds the same endpoint, so it is
        dead) may still hold the key through its session: end it."""
        try:
            _index, sessions = await _in_thread(self._client.session.list)
            for session in sessions or []:
                if session.get("Name") == self.placement_id:
                    await _in_thread(partial(self._client.session.destroy, session["ID"]))
        except Exception as exc:
            if not acl_denied(self.address, "list and destroy sessions", exc):
                log.warning("could not list Consul sessions: %s", exc)

    async def _acquire(self) -> bool:
        client = self._client
        try:
            if self._session is not None:
                _index, info = await _in_thread(lambda: client.session.info(self._session))
                if info is None:
                    self._session = None  # invalidated (check failed, Consul restarted)
            if self._session is None:
                # Fails while the health check is critical (just registered): retried.
                self._session = await _in_thread(
                    lambda: client.session.create(
                        name=self.placement_id,
                        checks=["serfHealth", f"service:{self.service_id}"],
                        lock_delay=0,
                        behavior="delete",
                    )
                )
            session = self._session
            held: bool = await _in_thread(
                lambda: client.kv.put(
                    self.tier.member_key(self.placement_id),
                    self.service_id.encode(),
                    acquire=session,
                )
            )
        except Exception as exc:
            if not acl_denied(self.address, f"hold {self.tier.members}<id> with a session", exc):
                log.debug("member key not held yet: %s", exc)
            return False
        if held:
            log.info("holding %s (%s)", self.tier.member_key(self.placement_id), self.placement_id)
        return held
