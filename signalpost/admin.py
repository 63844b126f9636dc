"""A Python client of the server API (docs/server-api.md), and ``signalpost api ...``.

Blocking, standard library only (``urllib``), so an app backend can call it from any
thread or script::

    from signalpost.admin import AdminClient

    api = AdminClient("http://127.0.0.1:8080", api_key)
    api.publish("room-1", {"kind": "announcement", "text": "hello"})

Errors are the package's one exception tree: a refused request raises the
``ProtocolError`` subclass of its code (``NotFound``, ``Forbidden``, ...) with the HTTP
``status`` set on it; a network failure raises ``TransportError``. ``publish`` and
``close_room`` send an idempotency key (one is made if none is given) and retry 503s and
network failures with it, so a retried publish is applied once.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any, Final

from signalpost.errors import (
    BadRequest,
    ErrorCode,
    Forbidden,
    InternalError,
    NotFound,
    NotInRoom,
    ProtocolError,
    RateLimited,
    RoomFull,
    TooLarge,
    TransportError,
    Unauthorized,
    Unavailable,
    UnknownPeer,
)

_ERRORS: Final[dict[str, type[ProtocolError]]] = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.NOT_IN_ROOM: NotInRoom,
    ErrorCode.UNKNOWN_PEER: UnknownPeer,
    ErrorCode.ROOM_FULL: RoomFull,
    ErrorCode.TOO_LARGE: TooLarge,
    ErrorCode.RATE_LIMITED: RateLimited,
    ErrorCode.UNAVAILABLE: Unavailable,
    ErrorCode.INTERNAL: InternalError,
}


def api_error(status: int, body: bytes) -> ProtocolError:
    """The exception of an error answer (its ``code``'s class; ``status`` set on it)."""
    try:
        decoded = json.loads(body)
        code, message = str(decoded["code"]), str(decoded["message"])
    except (ValueError, KeyError, TypeError):
        code, message = ErrorCode.INTERNAL, f"HTTP {status}: {body[:200]!r}"
    exc = _ERRORS.get(code, InternalError)(message)
    exc.status = status  # type: ignore[attr-defined]
    return exc


class AdminClient:
    """The server API of one edge (any edge serves all of it)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self._ssl = ssl_context

    # ----------------------------------------------------------------- transport

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        query: list[tuple[str, str]] | None = None,
        *,
        retry: bool = False,
    ) -> Any:
        """One API call; JSON answer. ``retry``: retry 503s and network failures."""
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout, context=self._ssl) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as exc:
                error = api_error(exc.code, exc.read())
                if exc.code == 503 and not last:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                raise error from None
            except (urllib.error.URLError, OSError) as exc:
                if not last:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                raise TransportError(f"{method} {url}: {exc}") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _room_path(room: str, action: str = "") -> str:
        path = "/v1/api/rooms/" + urllib.parse.quote(room, safe="")
        return f"{path}/{action}" if action else path

    # ----------------------------------------------------------------- endpoints

    def list_rooms(self, limit: int = 100, cursor: str | None = None) -> dict[str, Any]:
        """One page: ``{"rooms": [...], "next_cursor": str | None}``."""
        query = [("limit", str(limit))]
        if cursor:
            query.append(("cursor", cursor))
        page: dict[str, Any] = self.request("GET", "/v1/api/rooms", query=query)
        return page

    def iter_rooms(self, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every room, page after page."""
        cursor: str | None = None
        while True:
            page = self.list_rooms(page_size, cursor)
            yield from page["rooms"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def room(self, room: str) -> dict[str, Any]:
        """The room and its members (``NotFound`` if it has none)."""
        answer: dict[str, Any] = self.request("GET", self._room_path(room))
        return answer

    def presence(self, *users: str) -> list[dict[str, Any]]:
        """Each user's status, version and sessions."""
        answer = self.request("GET", "/v1/api/presence", query=[("user", u) for u in users])
        users_found: list[dict[str, Any]] = answer["users"]
        return users_found

    def publish(
        self,
        room: str,
        data: dict[str, Any],
        *,
        to: str | None = None,
        to_user: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Publish ``data`` to the room (or session ``to``, or every session of ``to_user``
        in it); ``{"room", "epoch", "offset"}`` of the event."""
        body: dict[str, Any] = {"data": data, "idempotency_key": idempotency_key or _key()}
        if to is not None:
            body["to"] = to
        if to_user is not None:
            body["to_user"] = to_user
        answer: dict[str, Any] = self.request(
            "POST", self._room_path(room, "publish"), body, retry=True
        )
        return answer

    def close_room(
        self, room: str, reason: str = "", *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Every member gets ``room-closed`` and leaves."""
        body = {"reason": reason, "idempotency_key": idempotency_key or _key()}
        answer: dict[str, Any] = self.request(
            "POST", self._room_path(room, "close"), body, retry=True
        )
        return answer

    def kick(self, user: str, session: str | None = None, reason: str = "") -> list[str]:
        """End ``session`` of ``user`` (every session of ``user`` when None): closed 4410,
        its resume refused. The sessions ended."""
        body: dict[str, Any] = {"user": user, "reason": reason}
        if session is not None:
            body["session"] = session
        answer = self.request("POST", "/v1/api/kick", body)
        kicked: list[str] = answer["kicked"]
        return kicked

    def mint_token(
        self,
        user: str,
        *,
        ttl: int = 3600,
        rooms: list[str] | None = None,
        name: str | None = None,
        home: str | None = None,
    ) -> str:
        """A client token for ``user`` (``home``: the region of the rooms it opens)."""
        body: dict[str, Any] = {"user": user, "ttl": ttl}
        if rooms:
            body["rooms"] = rooms
        if name:
            body["name"] = name
        if home:
            body["home"] = home
        answer = self.request("POST", "/v1/api/tokens", body)
        token: str = answer["token"]
        return token


def _key() -> str:
    return uuid.uuid4().hex
