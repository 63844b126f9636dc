"""Discovery through Consul: register this node with a health check, follow a tier's members.

Every node registers as ``signalpost-<kind>`` with an HTTP check on its ``/healthz`` and
its ZeroMQ endpoint (or ws URL for edges) in the service meta; it deregisters on a clean
shutdown. Nodes follow the other tiers with blocking queries on ``/v1/health/service``
(healthy instances only).

Consul is a hint, not the source of truth for liveness: heartbeats between nodes decide
that within a second or two. So the membership a watcher hands out changes cautiously
(``Membership``, a sans-I/O core): new members are taken at once, a member is dropped only
after it has been missing from every answer for ``removal_grace`` seconds, an empty answer
never empties it, and while Consul cannot be reached the last known membership stands.
A Consul agent that restarts (``-dev`` keeps no state) therefore changes nothing while the
nodes re-register, which each does within ``REREGISTER_INTERVAL``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import consul

from signalpost.errors import ConfigError
from signalpost.lifecycle import cancel_all, spawn
from signalpost.lifecycle import in_thread as _in_thread

log = logging.getLogger("signalpost.discovery")

SERVICE_PREFIX: Final = "signalpost-"
#: How long a blocking query waits for a change before returning the same answer.
QUERY_WAIT: Final = 3.0
#: Minimum time between two queries of one watcher (rate limit).
MIN_QUERY_INTERVAL: Final = 0.2
#: Longest back-off between queries while Consul fails.
MAX_BACKOFF: Final = 5.0
#: Longest back-off for a query about another datacenter (region): it fails while the
#: datacenters are not WAN-joined yet (or the WAN is cut), and the first answer after that
#: is what links the regions, so it is not left waiting for a long back-off.
REMOTE_MAX_BACKOFF: Final = 1.0
#: A member missing this long from Consul's answers is dropped.
REMOVAL_GRACE: Final = 5.0
#: How often a node checks that Consul still has its registration (and re-registers).
REREGISTER_INTERVAL: Final = 1.0
#: Consul's HTTP check settings for every node.
CHECK_INTERVAL: Final = "1s"
CHECK_TIMEOUT: Final = "1s"
CHECK_DEREGISTER_AFTER: Final = "1m"
#: Timeout of the non-blocking Consul calls (register, deregister, list).
CALL_TIMEOUT: Final = 2.0


def service_name(kind: str) -> str:
    return SERVICE_PREFIX + kind


#: Seconds between two log lines about the same call refused by Consul's ACLs.
DENIED_LOG_INTERVAL: Final = 30.0
_denied_logged: dict[str, float] = {}  # one entry per call site: bounded


def consul_client(address: str, token: str | None = None) -> consul.Consul:
    """A py-consul client for ``host:port`` that sends ACL token ``token`` on every call.

    Without one, ``CONSUL_HTTP_TOKEN`` (Consul's own variable); without that, none.
    """
    host, _, port = address.rpartition(":")
    client = consul.Consul(
        host=host or "127.0.0.1", port=int(port), connections_timeout=CALL_TIMEOUT
    )
    # Set here: py-consul would let CONSUL_HTTP_TOKEN override the token it is given.
    client.token = token or os.environ.get("CONSUL_HTTP_TOKEN") or None
    return client


def denied_message(address: str, what: str, exc: BaseException) -> str:
    """What to tell an operator whose Consul token does not allow ``what``."""
    return (
        f"Consul at {address} refused to {what}: permission denied ({str(exc).strip()}). "
        "Set consul_token (SIGNALPOST_CONSUL_TOKEN, or CONSUL_HTTP_TOKEN) to an ACL token "
        'whose policy allows it: see docs/security.md, "Consul ACLs"'
    )


def acl_denied(address: str, what: str, exc: BaseException) -> bool:
    """True if ``exc`` is Consul refusing ``what`` for lack of ACL permission; logged as
    an error, once per ``DENIED_LOG_INTERVAL`` per ``what`` (the callers retry)."""
    if not isinstance(exc, consul.ACLPermissionDenied):
        return False
    now = time.monotonic()
    if now >= _denied_logged.get(what, float("-inf")) + DENIED_LOG_INTERVAL:
        _denied_logged[what] = now
        log.error("%s", denied_message(address, what, exc))
    return True


# --------------------------------------------------------------------------- sans-I/O core


class Membership:
    """What a watcher believes a tier's members are, from Consul's answers and failures.

    ``members`` maps a member id to the endpoint to dial. Time is passed in.
    """

    def __init__(
        self,
        *,
        min_interval: float = MIN_QUERY_INTERVAL,
        max_backoff: float = MAX_BACKOFF,
        removal_grace: float = REMOVAL_GRACE,
        wait: float = QUERY_WAIT,
    ) -> None:
        self.members: dict[str, str] = {}
        self.index = 0  # Consul's index to block on; 0: answer at once
        self.errors = 0  # failed queries in a row
        self._min_interval = min_interval
        self._max_backoff = max_backoff
        self._removal_grace = removal_grace
        self._wait = wait
        self._missing_since: dict[str, float] = {}
        self._last_query = float("-inf")

    def next_query(self, now: float) -> tuple[float, float]:
        """``(delay, wait)``: sleep ``delay`` seconds, then query blocking up to ``wait``."""
        interval = self._min_interval
        if self.errors:
            interval = min(self._max_backoff, self._min_interval * 2**self.errors)
        delay = max(0.0, self._last_query + interval - now)
        wait = self._wait
        if self._missing_since:  # come back in time to apply a removal
            due = min(self._missing_since.values()) + self._removal_grace
            wait = max(self._min_interval, min(wait, due - now - delay))
        return delay, wait

    def query_started(self, now: float) -> None:
        self._last_query = now

    def failed(self) -> None:
        """The query failed (Consul unreachable, error): keep everything as it is."""
        self.errors += 1

    def answered(self, index: int, found: dict[str, str], now: float) -> dict[str, str] | None:
        """Apply an answer; returns the new membership when it changed, else None."""
        self.errors = 0
        # An index that goes backwards means Consul lost its state (restart): start over.
        self.index = index if index > 0 and index >= self.index else 0
        members = dict(self.members)
        for member, endpoint in found.items():
            members[member] = endpoint
            self._missing_since.pop(member, None)
        if found:  # an empty answer never empties the membership
            for member in [m for m in members if m not in found]:
                since = self._missing_since.setdefault(member, now)
                if now - since >= self._removal_grace:
                    del members[member]
                    del self._missing_since[member]
        if members == self.members:
            return None
        self.members = members
        return dict(members)


def wan_members_of(entries: list[dict[str, Any]]) -> dict[str, str]:
    """``{endpoint: endpoint to dial from another region}`` from a ``/v1/health/service``
    answer of another datacenter (``wan_endpoint`` where the node advertises one)."""
    found: dict[str, str] = {}
    for entry in entries:
        meta = (entry.get("Service") or {}).get("Meta") or {}
        endpoint, wan = meta.get("endpoint"), meta.get("wan_endpoint")
        if isinstance(endpoint, str) and endpoint:
            found[endpoint] = wan if isinstance(wan, str) and wan else endpoint
    return found


def members_of(entries: list[dict[str, Any]]) -> dict[str, str]:
    """``{member id: endpoint}`` from a ``/v1/health/service`` answer."""
    found: dict[str, str] = {}
    for entry in entries:
        service = entry.get("Service") or {}
        endpoint = (service.get("Meta") or {}).get("endpoint")
        member = service.get("ID")
        if isinstance(endpoint, str) and endpoint and isinstance(member, str):
            found[member] = endpoint
    return found


# --------------------------------------------------------------------------- I/O shell


@dataclass(frozen=True)
class Registration:
    """This node as Consul should list it."""

    kind: str  # edge | broker | presence
    node_id: str
    endpoint: str  # what other nodes dial: a ZeroMQ endpoint, or an edge's ws URL
    check_url: str  # the HTTP check Consul polls
    region: str = ""  # the node's region (its agent's datacenter), for other regions' eyes
    wan_endpoint: str = ""  # what nodes of other regions dial (empty: ``endpoint``)
    extra_meta: dict[str, str] = field(default_factory=dict)  # e.g. an edge's ICE URLs

    def payload(self) -> dict[str, Any]:
        check = consul.Check.http(
            self.check_url,
            CHECK_INTERVAL,
            timeout=CHECK_TIMEOUT,
            deregister=CHECK_DEREGISTER_AFTER,
        )
        if self.check_url.startswith("https:"):
            # An edge with its own TLS: the check asks whether it serves, not who it is
            # (its certificate names the public host, not the address Consul dials).
            check["TLSSkipVerify"] = True
        meta = {"endpoint": self.endpoint}
        if self.region:
            meta["region"] = self.region
        if self.wan_endpoint:
            meta["wan_endpoint"] = self.wan_endpoint
        meta = {**self.extra_meta, **meta}
        return {
            "name": service_name(self.kind),
            "service_id": self.node_id,
            "tags": [self.kind],
            "meta": meta,
            "check": check,
        }


class Discovery:
    """Registers one node and runs the watchers it asks for, until ``close()``."""

    def __init__(
        self, address: str, registration: Registration | None = None, token: str | None = None
    ) -> None:
        self.address = address
        self.registration = registration
        self.token = token  # ACL token (consul_client: else CONSUL_HTTP_TOKEN)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Register (and keep registered). A registration Consul refuses for lack of ACL
        permission is a ``ConfigError`` (the node stops, saying which setting); Consul
        unreachable is not: the registration is retried until it is back."""
        if self.registration is None:
            return
        registered = False
        client = consul_client(self.address, self.token)
        payload = self.registration.payload()
        try:
            async with asyncio.timeout(CALL_TIMEOUT + 1):
                await _in_thread(lambda: client.agent.service.register(**payload))
            registered = True
            log.info("registered %s in Consul as %s", self.registration.node_id, payload["name"])
        except consul.ACLPermissionDenied as exc:
            what = f"register {self.registration.node_id} as {payload['name']}"
            raise ConfigError(denied_message(self.address, what, exc)) from None
        except Exception as exc:
            log.warning("Consul at %s: %s (will retry)", self.address, exc)
        self._spawn(self._keep_registered(self.registration, registered), "consul-register")

    def watch(
        self,
        kind: str,
        on_change: Callable[[dict[str, str]], None],
        dc: str | None = None,
        members: Callable[[list[dict[str, Any]]], dict[str, str]] = members_of,
    ) -> None:
        """Call ``on_change(members)`` with the healthy ``kind`` nodes, on every change;
        ``dc``: those of another datacenter (region), ``members`` read from each answer."""
        name = f"consul-watch-{kind}" + (f"-{dc}" if dc else "")
        self._spawn(self._watch(kind, on_change, dc, members), name)

    async def close(self) -> None:
        """Stop watching and deregister (best effort, bounded)."""
        await cancel_all(self._tasks)
        if self.registration is not None:
            node_id = self.registration.node_id
            client = consul_client(self.address, self.token)
            try:
                async with asyncio.timeout(CALL_TIMEOUT + 1):
                    await _in_thread(lambda: client.agent.service.deregister(node_id))
                log.info("deregistered %s from Consul", node_id)
            except Exception as exc:  # Consul down: its check deregisters us later
                log.warning("could not deregister %s from Consul: %s", node_id, exc)

    def _spawn(self, coroutine: Any, name: str) -> None:
        self._tasks.append(spawn(coroutine, name))

    async def _keep_registered(self, registration: Registration, registered: bool) -> None:
        client = consul_client(self.address, self.token)
        payload = registration.payload()
        node_id = registration.node_id
        while True:
            await asyncio.sleep(REREGISTER_INTERVAL)
            try:
                # Registered once by this process whatever the agent holds: a node restarted
                # under the same id must replace its predecessor's entry (whose health check
                # points at the dead process), then again whenever the entry is gone.
                services = {} if not registered else await _in_thread(client.agent.services)
                if node_id not in services:
                    await _in_thread(lambda: client.agent.service.register(**payload))
                    registered = True
                    log.info("registered %s in Consul as %s", node_id, payload["name"])
            except Exception as exc:
                if not acl_denied(self.address, f"register {node_id}", exc):
                    log.warning("Consul at %s: %s (will retry)", self.address, exc)

    async def _watch(
        self,
        kind: str,
        on_change: Callable[[dict[str, str]], None],
        dc: str | None,
        members: Callable[[list[dict[str, Any]]], dict[str, str]],
    ) -> None:
        client = consul_client(self.address, self.token)
        name = service_name(kind)
        membership = Membership(max_backoff=REMOTE_MAX_BACKOFF if dc else MAX_BACKOFF)
        loop = asyncio.get_running_loop()
        while True:
            delay, wait = membership.next_query(loop.time())
            if delay:
                await asyncio.sleep(delay)
            membership.query_started(loop.time())
            index = membership.index

            def query(index: int = index, wait: float = wait) -> Any:
                if index:
                    return client.health.service(
                        name, passing=True, index=index, wait=f"{wait:.1f}s", dc=dc
                    )
                return client.health.service(name, passing=True, dc=dc)

            try:
                new_index, entries = await _in_thread(query)
                changed = membership.answered(int(new_index or 0), members(entries), loop.time())
            except Exception as exc:
                if not membership.errors:
                    log.warning(
                        "Consul query for %s failed: %s; keeping %d known",
                        name,
                        exc,
                        len(membership.members),
                    )
                membership.failed()
                continue
            if changed is not None:
                log.info("%s members: %s", name, sorted(changed.values()))
                on_change(changed)
