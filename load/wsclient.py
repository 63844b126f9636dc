"""A blocking signalpost protocol client for Locust users (gevent-friendly).

Built on ``websockets.sync.client``: Locust monkey-patches the standard library with
gevent before this module is imported, so the connection's background reader thread is
a greenlet and every blocking call yields to the other simulated users. Each request
(``hello``, ``join``, ``signal`` with an id, ``watch`` ...) is timed from send to reply
and reported to Locust as a ``WS`` request; a refused request or a timeout is a failure.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

#: ``fire(name, started, length, exception)`` reports one request to Locust.
Reporter = Callable[[str, float, int, BaseException | None], None]


class RequestFailed(Exception):
    """An ``error`` frame, a timeout, or a connection lost while waiting."""


class Busy(RequestFailed):
    """The edge answered the hello with close 4503 (try again later) and said when:
    ``retry_after`` seconds (docs/protocol.md "Close codes")."""

    def __init__(self, retry_after: float, reason: str) -> None:
        super().__init__(f"edge busy, retry after {retry_after} s ({reason})")
        self.retry_after = retry_after


def _retry_after(reason: str) -> float:
    head = reason.partition(" ")[0]
    name, _, value = head.partition("=")
    return int(value) / 1000.0 if name == "retry_after_ms" and value.isdigit() else 1.0


class _Reply:
    __slots__ = ("event", "frame")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.frame: dict[str, Any] | None = None


class SignalpostConnection:
    """One authenticated session: requests with ids, and an inbox of pushed frames."""

    def __init__(
        self,
        url: str,
        token: str,
        report: Reporter,
        *,
        timeout: float = 10.0,
        resume: str | None = None,
        rooms: dict[str, dict[str, Any]] | None = None,
        tolerate_loss: bool = False,
        ids: Iterator[int] | None = None,
    ) -> None:
        self.url = url
        #: When the test kills edges on purpose, a request cut off by the lost connection
        #: is reported apart (``<name>-lost-with-connection``), not as a failure.
        self.tolerate_loss = tolerate_loss
        self.timeout = timeout
        self.reporter = report
        #: Request ids: one per request of the session (a resumed session goes on counting
        #: from its previous connection: the same id would be the same request).
        self.ids: Iterator[int] = ids if ids is not None else itertools.count(1)
        self._waiting: dict[Any, _Reply] = {}
        self._lock = threading.Lock()
        self.inbox: deque[dict[str, Any]] = deque(maxlen=10_000)
        self._inbox_ready = threading.Event()
        self.positions: dict[str, dict[str, Any]] = dict(rooms or {})
        self.closed_code: int | None = None
        started = time.perf_counter()
        try:
            self.ws: ClientConnection = connect(
                url,
                compression=None,
                open_timeout=timeout,
                close_timeout=2,
                max_size=1 << 20,
            )
            hello: dict[str, Any] = {"type": "hello", "token": token}
            if resume:
                hello["resume"] = resume
                hello["rooms"] = self.positions
            try:
                self.ws.send(json.dumps(hello))
                welcome = json.loads(self.ws.recv(timeout))
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code == 4503:
                    raise Busy(_retry_after(exc.rcvd.reason), exc.rcvd.reason) from None
                raise
            if welcome.get("type") != "welcome":
                raise RequestFailed(f"hello refused: {welcome.get('code')}")
        except Busy:  # shed by the edge, told when to come back: counted apart, no failure
            report(("resume" if resume else "hello") + "-shed", started, 0, None)
            raise
        except Exception as exc:  # not GreenletExit: a user stopped mid-hello is no failure
            report("resume" if resume else "hello", started, 0, exc)
            raise
        report("resume" if resume else "hello", started, 0, None)
        self.session: str = welcome["session"]
        self.resume_token: str = welcome["resume"]
        self.resumed: bool = welcome.get("resumed", False)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # ----------------------------------------------------------------- reading

    def _read(self) -> None:
        try:
            for raw in self.ws:
                frame = json.loads(raw)
                frame["_received"] = time.time()
                room, offset = frame.get("room"), frame.get("offset")
                if room is not None and isinstance(offset, int) and "epoch" not in frame:
                    position = self.positions.get(room)
                    if position is not None and offset > position["offset"]:
                        position["offset"] = offset
                if frame.get("type") == "joined":
                    self.positions[frame["room"]] = {
                        "epoch": frame["epoch"],
                        "offset": frame["offset"],
                    }
                request_id = frame.get("id")
                if request_id is not None and frame.get("type") not in ("signal",):
                    with self._lock:
                        waiter = self._waiting.pop(request_id, None)
                    if waiter is not None:
                        waiter.frame = frame
                        waiter.event.set()
                        continue
                self.inbox.append(frame)
                self._inbox_ready.set()
        except ConnectionClosed as exc:
            self.closed_code = exc.rcvd.code if exc.rcvd else 1006
        except Exception:
            self.closed_code = 1006
        finally:
            if self.closed_code is None:
                self.closed_code = 1006
            with self._lock:
                waiting, self._waiting = self._waiting, {}
            for waiter in waiting.values():
                waiter.event.set()
            self._inbox_ready.set()

    # ----------------------------------------------------------------- requests

    def request(self, name: str, frame: dict[str, Any], *, report: bool = True) -> dict[str, Any]:
        """Send ``frame`` with a fresh id, wait for its reply; report it as ``name``."""
        request_id = next(self.ids)
        frame["id"] = request_id
        waiter = _Reply()
        with self._lock:
            self._waiting[request_id] = waiter
        data = json.dumps(frame)
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            try:
                self.ws.send(data)
            except ConnectionClosed as exc:
                # The reader may not have seen the close yet: the connection is lost now.
                if self.closed_code is None:
                    self.closed_code = exc.rcvd.code if exc.rcvd else 1006
                raise RequestFailed(f"{name}: connection closed") from None
            if not waiter.event.wait(self.timeout):
                raise RequestFailed(f"{name}: no reply in {self.timeout}s")
            reply = waiter.frame
            if reply is None:
                raise RequestFailed(f"{name}: connection closed ({self.closed_code})")
            if reply.get("type") == "error":
                raise RequestFailed(f"{name}: {reply.get('code')}")
            return reply
        except Exception as exc:
            error = exc
            raise
        except BaseException:  # GreenletExit: Locust stopped the user; nothing to report
            report = False
            raise
        finally:
            with self._lock:
                self._waiting.pop(request_id, None)
            if report:
                if error is not None and self.lost and self.tolerate_loss:
                    self.reporter(f"{name}-lost-with-connection", started, len(data), None)
                else:
                    self.reporter(name, started, len(data), error)

    def join(self, room: str) -> dict[str, Any]:
        return self.request("join", {"type": "join", "room": room})

    def leave(self, room: str) -> None:
        self.request("leave", {"type": "leave", "room": room})
        self.positions.pop(room, None)

    def signal(
        self, room: str, data: dict[str, Any], to: str | None = None, name: str = "signal"
    ) -> None:
        frame: dict[str, Any] = {"type": "signal", "room": room, "data": data}
        if to is not None:
            frame["to"] = to
        self.request(name, frame)

    def watch(self, users: list[str]) -> dict[str, Any]:
        return self.request("watch", {"type": "watch", "users": users})

    # ----------------------------------------------------------------- inbox

    def expect(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float | None = None
    ) -> dict[str, Any]:
        """The first pushed frame matching ``predicate`` (others stay in the inbox)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for index, frame in enumerate(self.inbox):
                if predicate(frame):
                    del self.inbox[index]
                    return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestFailed("expected frame did not arrive")
            if self.closed_code is not None and not self.inbox:
                raise RequestFailed(f"connection closed ({self.closed_code})")
            self._inbox_ready.clear()
            self._inbox_ready.wait(min(remaining, 0.5))

    def expect_signals(self, count: int, sender: str, timeout: float | None = None) -> None:
        for _ in range(count):
            self.expect(
                lambda f: f.get("type") == "signal" and f.get("from", {}).get("session") == sender,
                timeout,
            )

    def drain(self) -> None:
        self.inbox.clear()

    # ----------------------------------------------------------------- closing

    @property
    def lost(self) -> bool:
        """The connection ended (the edge went away, or ``abort``)."""
        return self.closed_code is not None

    def close(self, code: int = 1000) -> None:
        with contextlib.suppress(Exception):
            self.ws.close(code)

    def abort(self) -> None:
        """Drop the TCP connection without a close frame: the session may resume."""
        with contextlib.suppress(OSError):
            self.ws.socket.shutdown(2)
        self.ws.socket.close()
