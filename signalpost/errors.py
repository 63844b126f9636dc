"""The one exception tree of signalpost.

    SignalpostError
    ├── ConfigError                 bad settings file or variable; raised at start-up
    ├── TransportError              a node link (ZeroMQ, Consul) failed
    ├── KeySetError                 a JWK Set could not be fetched or used (keys held stand)
    └── ProtocolError               a client did something the protocol refuses;
        │                           carries the error ``code`` to send and, when the
        │                           connection must end, the ``close_code``
        ├── BadRequest              bad_request   (connection stays open)
        ├── Unauthorized            unauthorized  -> close 4401
        ├── Forbidden               forbidden
        ├── RoomFull                room_full
        ├── NotInRoom               not_in_room
        ├── UnknownPeer             unknown_peer
        ├── RateLimited             rate_limited
        ├── TooLarge                too_large
        ├── NotFound                not_found     (server API: no such room, session)
        ├── Unavailable             unavailable   (server API: an owner did not answer)
        └── InternalError           internal      (a bug; the request was not served)

Cores raise these; shells turn them into an ``error`` frame (and a close when
``close_code`` is set). Nothing else is caught as a protocol failure.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` frame (PROTOCOL.md "Other")."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    ROOM_FULL = "room_full"
    NOT_IN_ROOM = "not_in_room"
    UNKNOWN_PEER = "unknown_peer"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """WebSocket close codes the edge uses."""

    NORMAL = 1000
    GOING_AWAY = 1001  # edge draining: reconnect elsewhere and resume
    UNSUPPORTED_DATA = 1003  # binary frame
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011  # the hello failed inside the server: nothing was taken over
    ABUSE = 4400
    UNAUTHORIZED = 4401
    ORIGIN_REFUSED = 4403
    HELLO_TIMEOUT = 4408
    REPLACED = 4409  # the session was resumed on another connection
    KICKED = 4410  # the server API ended the session (its resume is refused)
    RATE_LIMITED = 4429
    TRY_AGAIN_LATER = 4503  # admission refused (caps, accept rate): retry after retry_after_ms


class SignalpostError(Exception):
    """Root of every error signalpost raises on purpose."""


class ConfigError(SignalpostError):
    """A settings file or environment variable is invalid."""


class TransportError(SignalpostError):
    """A link between nodes failed."""


class KeySetError(SignalpostError):
    """A JWK Set (``jwks_source``) could not be fetched or holds no usable key."""


class ProtocolError(SignalpostError):
    """A client request is refused; ``code`` goes on the wire."""

    code: ErrorCode = ErrorCode.INTERNAL
    close_code: CloseCode | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ProtocolError):
    code = ErrorCode.BAD_REQUEST


class Unauthorized(ProtocolError):
    code = ErrorCode.UNAUTHORIZED
    close_code = CloseCode.UNAUTHORIZED


class Forbidden(ProtocolError):
    code = ErrorCode.FORBIDDEN


class RoomFull(ProtocolError):
    code = ErrorCode.ROOM_FULL


class NotInRoom(ProtocolError):
    code = ErrorCode.NOT_IN_ROOM


class UnknownPeer(ProtocolError):
    code = ErrorCode.UNKNOWN_PEER


class RateLimited(ProtocolError):
    code = ErrorCode.RATE_LIMITED


class TooLarge(ProtocolError):
    code = ErrorCode.TOO_LARGE


class NotFound(ProtocolError):
    code = ErrorCode.NOT_FOUND


class Unavailable(ProtocolError):
    code = ErrorCode.UNAVAILABLE


class InternalError(ProtocolError):
    code = ErrorCode.INTERNAL
