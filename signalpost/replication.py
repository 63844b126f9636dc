"""Confirmed replication, the part brokers and presence nodes share.

An owner sends each change to the runner-up (a replica) and holds what the change caused
(replies, deliveries) until the replica acknowledges it: nothing a client saw is unknown
to the node that takes over when the owner dies. ``Unacked`` is one message to a replica
that is not acknowledged yet; the owner sends it again when it has waited ``resend_after``
(the message or its ack was lost on a reset link: the replica skips what it has), and to
the new replica when the replica changes (``retarget``); with no replica left there is
nobody to wait for, and it counts as confirmed.

What an owner holds behind its unacknowledged messages, and how a message names the
change (a room's batch number, a session's copy sequence), are the owner's: see
``broker.rooms`` (batches of room events, released in order) and ``presence.table``
(lease copies, one outstanding per session).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from signalpost.wire import Envelope

Outbound = tuple[str, Envelope]


@dataclass(slots=True)
class Unacked:
    """A message to a replica, held until the replica acknowledges it (``confirmed``)."""

    #: What the replica is sent (again); None: it holds nothing to replicate.
    message: Envelope | None
    #: The replica it was last sent to (None: none yet).
    target: str | None
    confirmed: bool = False
    sent_at: float = 0.0  # when the replica was last sent it


def resend_late(
    held: Iterable[Unacked], now: float, resend_after: float, out: list[Outbound]
) -> None:
    """Send again what its replica has not acknowledged for ``resend_after`` seconds."""
    late = now - resend_after
    for entry in held:
        if entry.confirmed or entry.message is None or entry.target is None:
            continue
        if entry.sent_at <= late:
            entry.sent_at = now
            out.append((entry.target, entry.message))


def retarget(entry: Unacked, replica: str | None, now: float, out: list[Outbound]) -> bool:
    """The replica is now ``replica``: send ``entry`` there if it was sent elsewhere, or
    confirm it if there is no replica any more. Whether it was sent anew."""
    if entry.confirmed or entry.message is None:
        return False
    if replica is None:
        entry.confirmed = True
        return False
    if entry.target == replica:
        return False
    entry.target = replica
    entry.sent_at = now
    out.append((replica, entry.message))
    return True
