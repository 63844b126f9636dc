"""Seat tickets: presence's word, carried by an edge, that a session's connection is its.

A session's seats (its memberships at the brokers) live on one edge. An edge moves a seat
to itself when the session resumes there (``AttachCmd``, and the ``RestoreCmd`` or
``JoinCmd`` that follow). The brokers do not know who holds a session; presence does: its
lease, granted to an edge by a resume claim (``ClaimCmd``) whose grant evicts the
connection that held it. So presence hands the edge, with the grant (``ClaimReply``), a
ticket: an HMAC of (session, edge, connection) under a secret that presence and the
brokers share and edges do not have (``ticket_secret``). The edge sends the ticket with
every command that could move a seat of that connection; a broker moves a seat from
another edge only on a valid ticket naming the sender and the connection
(``broker.rooms.RoomTable``). Any other command about a session is taken only from the
edge that holds the seat (no ticket, no cryptography: one comparison).

Sans-I/O and pure. 16 bytes of HMAC-SHA256; the verification happens only when a seat
would change edge (a resume), never per signal.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Final

from signalpost.config import Settings
from signalpost.errors import ConfigError

log = logging.getLogger("signalpost.tickets")

#: Bytes of a ticket (a truncated HMAC-SHA256: 128 bits).
TICKET_BYTES: Final = 16

#: Shortest ``ticket_secret`` accepted.
MIN_SECRET_LENGTH: Final = 32

_CONTEXT: Final = b"signalpost seat ticket v1"


class SeatTickets:
    """Issues (presence) and checks (brokers) seat tickets under one cluster secret."""

    def __init__(self, secret: str) -> None:
        self._key = hmac.new(secret.encode(), _CONTEXT, hashlib.sha256).digest()

    def issue(self, session: str, edge: str, conn: str) -> bytes:
        """The ticket of ``conn`` of ``session`` on ``edge``."""
        # Length-prefixed: no two (session, edge, conn) triples share a message.
        message = b"".join(
            len(part).to_bytes(4, "big") + part
            for part in (session.encode(), edge.encode(), conn.encode())
        )
        return hmac.new(self._key, message, hashlib.sha256).digest()[:TICKET_BYTES]

    def valid(self, ticket: bytes, session: str, edge: str, conn: str) -> bool:
        """Whether ``ticket`` is presence's for ``conn`` of ``session`` on ``edge``."""
        return hmac.compare_digest(ticket, self.issue(session, edge, conn))


def seat_tickets(settings: Settings, secured: bool) -> SeatTickets | None:
    """A broker's or presence's tickets from ``ticket_secret``; None (seat moves not
    checked, logged) only with plaintext node links (``secured`` false).

    Raises ``ConfigError`` when node links are secured and the secret is missing or short.
    """
    secret = settings.ticket_secret
    if secret is None:
        if secured:
            raise ConfigError(
                "brokers and presence need ticket_secret with node keys (the same on all of "
                "them, never on edges): make one with `signalpost keys --dir DIR "
                "--ticket-secret` and set SIGNALPOST_TICKET_SECRET to the file's content"
            )
        log.warning(
            "no ticket_secret: brokers move a session's seats to whichever edge resumes it "
            "without presence's ticket (plaintext links are unauthenticated anyway)"
        )
        return None
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(f"ticket_secret is too short: at least {MIN_SECRET_LENGTH} characters")
    return SeatTickets(secret)


def new_ticket_secret() -> str:
    """A fresh ``ticket_secret`` (64 hex digits)."""
    return secrets.token_hex(32)


#: The file ``signalpost keys --ticket-secret`` writes (and ``signalpost cluster``).
TICKET_SECRET_FILE: Final = "ticket.secret"


def write_ticket_secret(directory: Path) -> Path:
    """Write a fresh secret to ``directory/ticket.secret`` (0600); never overwrites."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TICKET_SECRET_FILE
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists (a secret is never overwritten)") from None
    with os.fdopen(descriptor, "w") as secret_file:
        secret_file.write(new_ticket_secret() + "\n")
    return path
