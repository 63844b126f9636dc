"""Admission: which connections and hellos an edge takes on, sans I/O.

Three limits, decided with no sockets and no clock (``now`` is passed in):

- **Per IP** (``connect`` / ``disconnect``): TCP connections open at once from one peer
  address, counted from accept to close (also those still in their handshake or hello).
  Past ``max_per_ip`` a connection is refused once it is a WebSocket (close 4503, see
  below); past twice that it is dropped at accept, without a handshake (and not
  counted). Addresses in ``exempt`` (loopback by default: local load generators, a TLS
  proxy on the same host) are not counted.
- **Per user** (``open_session`` / ``close_session``): live sessions of one user (the
  token's ``sub``) on this edge, decided at the hello once the token is verified. A
  resume of a session this edge holds replaces that connection and is not refused.
- **Accept rate** (``hello``): one token bucket for the whole edge, ``rate`` hellos per
  second, ``burst`` deep. A fresh session takes a token only while more than ``reserve``
  are left; a resume (a valid resume token) may take the reserved ones too. So during a
  reconnect storm the resumes are admitted first and the fresh sessions are shed.

A refusal is a ``Refusal``: its ``kind`` (a metric label) and when to try again. The shell
closes the connection with ``CloseCode.TRY_AGAIN_LATER`` (4503) and ``reason`` (wire form
``retry_after_ms=<int> <kind>``, docs/protocol.md). The retry delay of a shed hello is the
time the bucket needs to serve the hellos shed recently (their count decays at ``rate``
per second) and this one: clients told to come back spread over that span (the SDKs wait
it out, plus up to as much again of random jitter), instead of all coming back at once.

Bounds: the per-IP and per-user tables hold only keys with something open (an entry goes
when its count drops to zero), so each is no larger than the connections open; on top of
that each holds at most ``max_tracked`` keys, and a connection from a new address (or a
hello of a new user) past that is refused (``ip_table_full`` / ``user_table_full``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from signalpost.errors import ConfigError

#: Keys each of the per-IP and per-user tables holds at most (see the module docstring).
MAX_TRACKED: Final = 100_000

#: Retry delays the edge hands out, in milliseconds: never less (a client coming back at
#: once would be shed again), never more (a client should not give up on a busy edge).
MIN_RETRY_MS: Final = 100
MAX_RETRY_MS: Final = 60_000


class RefusalKind(StrEnum):
    """Why a connection or hello was refused (the label of ``signalpost_admission_refused``)."""

    IP_CAP = "ip_cap"  # over max_per_ip: refused after the handshake (4503)
    IP_DROPPED = "ip_dropped"  # over twice max_per_ip: dropped at accept
    IP_TABLE_FULL = "ip_table_full"
    USER_CAP = "user_cap"
    USER_TABLE_FULL = "user_table_full"
    SHED = "shed"  # a fresh hello over the accept rate
    SHED_RESUME = "shed_resume"  # a resume over the accept rate (reserve used up too)


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: RefusalKind
    retry_after_ms: int

    @property
    def reason(self) -> str:
        """The close reason: ``retry_after_ms=<int> <kind>`` (docs/protocol.md)."""
        return f"retry_after_ms={self.retry_after_ms} {self.kind.value}"

    @property
    def drop(self) -> bool:
        """Drop the TCP connection at once (no handshake, no close code); not counted."""
        return self.kind is RefusalKind.IP_DROPPED or self.kind is RefusalKind.IP_TABLE_FULL


def exempt_addresses(addresses: Iterable[str]) -> frozenset[str]:
    """``connection_cap_exempt`` as the shell compares peers: IP addresses written the way
    the socket reports them (an IPv4-mapped IPv6 address as IPv4). Anything that is not an
    IP address is a ``ConfigError`` naming it (a host name or a network would silently
    never match)."""
    exempt = set()
    for text in addresses:
        try:
            address = ipaddress.ip_address(text.strip())
        except ValueError:
            raise ConfigError(
                f"invalid setting: connection_cap_exempt: {text!r} is not an IP address"
            ) from None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        exempt.add(str(address))
    return frozenset(exempt)


def _clamp_ms(seconds: float) -> int:
    ms = int(seconds * 1000.0 + 0.999)
    return MIN_RETRY_MS if ms < MIN_RETRY_MS else MAX_RETRY_MS if ms > MAX_RETRY_MS else ms


@dataclass(slots=True)
class Admission:
    """The edge's admission limits (see the module docstring)."""

    max_per_ip: int
    max_per_user: int
    rate: float  # hellos per second
    burst: int
    resume_share: float  # the part of ``burst`` only resumes may take, 0..1
    cap_retry_after: float  # seconds a client refused by a cap is told to wait
    exempt: frozenset[str] = frozenset()
    max_tracked: int = MAX_TRACKED
    per_ip: dict[str, int] = field(default_factory=dict, init=False)
    per_user: dict[str, int] = field(default_factory=dict, init=False)
    tokens: float = field(init=False)
    refilled_at: float | None = field(default=None, init=False)
    shed_backlog: float = field(default=0.0, init=False)  # hellos shed lately (decays at rate)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    @property
    def reserve(self) -> float:
        """Tokens a fresh hello must leave in the bucket (for resumes); at most
        ``burst - 1``, so that a full bucket always admits a fresh hello."""
        reserve = self.burst * self.resume_share
        return reserve if reserve <= self.burst - 1 else float(self.burst - 1)

    # ----------------------------------------------------------------- per IP

    def connect(self, ip: str) -> Refusal | None:
        """A TCP connection from ``ip`` was accepted: counted (unless dropped) until
        ``disconnect``, whatever the verdict. None: admitted."""
        if ip in self.exempt:
            return None
        count = self.per_ip.get(ip, 0)
        if count >= 2 * self.max_per_ip:
            return Refusal(RefusalKind.IP_DROPPED, _clamp_ms(self.cap_retry_after))
        if count == 0 and len(self.per_ip) >= self.max_tracked:
            return Refusal(RefusalKind.IP_TABLE_FULL, _clamp_ms(self.cap_retry_after))
        self.per_ip[ip] = count + 1
        if count >= self.max_per_ip:
            return Refusal(RefusalKind.IP_CAP, _clamp_ms(self.cap_retry_after))
        return None

    def disconnect(self, ip: str) -> None:
        """A connection ``connect`` counted (not dropped) is gone."""
        count = self.per_ip.get(ip)
        if count is None:
            return
        if count <= 1:
            del self.per_ip[ip]
        else:
            self.per_ip[ip] = count - 1

    # ----------------------------------------------------------------- per user

    def open_session(self, user: str, *, replacing: bool = False) -> Refusal | None:
        """A verified hello of ``user``: counted until ``close_session`` unless refused.
        ``replacing``: it resumes a session this edge holds (whose connection goes)."""
        count = self.per_user.get(user, 0)
        if count == 0 and len(self.per_user) >= self.max_tracked:
            return Refusal(RefusalKind.USER_TABLE_FULL, _clamp_ms(self.cap_retry_after))
        if count >= self.max_per_user and not replacing:
            return Refusal(RefusalKind.USER_CAP, _clamp_ms(self.cap_retry_after))
        self.per_user[user] = count + 1
        return None

    def close_session(self, user: str) -> None:
        count = self.per_user.get(user)
        if count is None:
            return
        if count <= 1:
            del self.per_user[user]
        else:
            self.per_user[user] = count - 1

    # ----------------------------------------------------------------- accept rate

    def hello(self, *, resume: bool, now: float) -> Refusal | None:
        """A verified hello arrived at ``now``: take a token, or shed it. ``resume``: it
        carries a valid resume token (it may take the reserved share)."""
        tokens = self.tokens
        refilled_at = self.refilled_at
        if refilled_at is not None and now > refilled_at:
            elapsed = now - refilled_at
            tokens += elapsed * self.rate
            if tokens > self.burst:
                tokens = float(self.burst)
            backlog = self.shed_backlog - elapsed * self.rate
            self.shed_backlog = backlog if backlog > 0.0 else 0.0
        if refilled_at is None or now > refilled_at:
            self.refilled_at = now
        floor = 1.0 if resume else 1.0 + self.reserve
        if tokens >= floor:
            self.tokens = tokens - 1.0
            return None
        self.tokens = tokens
        # Come back once the bucket has served the ones shed lately and reached this
        # one's floor (a resume needs less: it comes back sooner).
        self.shed_backlog += 1.0
        wait = (floor - tokens + self.shed_backlog) / self.rate
        kind = RefusalKind.SHED_RESUME if resume else RefusalKind.SHED
        return Refusal(kind, _clamp_ms(wait))
