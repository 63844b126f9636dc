"""Locust scenarios for signalpost over the real client protocol (see load/README.md).

User classes (pick them on the command line; all five run by default):

``CallSetupUser``       two connections per user; each task is one call: join, offer
                        (~4 KB SDP), answer, 12 trickled candidates each way, leave.
                        Reports ``call-setup`` besides every request.
``PresenceChurnUser``   connects as a user from a small pool, watches a few others, stays
                        a moment, leaves cleanly: presence goes online/offline all the time.
``RoomFanoutUser``      groups of ``--fanout-size`` users share a room and broadcast;
                        every received broadcast is reported as ``fanout-delivery`` with
                        its delivery latency (needs SIGNALPOST_ROOM_CAPACITY >= the size).
``RegionCallUser``      calls across two regions (``--cluster-state`` of ``signalpost cluster
                        --regions eu,us``): each user belongs to a region and holds a
                        connection on one of its edges and one on an edge of the other
                        region; each task is one call (as ``CallSetupUser``) inside its
                        region or across, in a room homed in its region or in the other.
                        Reports ``call-setup <region>`` and ``call-setup <a>-><b> home
                        <h>``. Without regions: ``call-setup (no regions)``.
``ReconnectStormUser``  pairs exchange signals; connections drop and sessions resume on
                        the next edge. Against a cluster (``--cluster-state FILE``) one
                        edge is killed after ``--storm-after`` seconds, so every client
                        of that edge reconnects at once; without a state file each user
                        drops its own connection now and then. Reports ``resume``.

    .venv/bin/locust -f load/locustfile.py --headless -u 40 -r 10 -t 60s \\
        --host ws://127.0.0.1:8080 --jwt-secret "$SIGNALPOST_JWT_SECRET"
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import gevent
from locust import User, between, events, task
from locust.env import Environment
from websockets.exceptions import WebSocketException

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `load` as a package

from load.wsclient import Busy, RequestFailed, SignalpostConnection
from signalpost.auth import mint_token

log = logging.getLogger("signalpost.load")

SDP_OFFER = "v=0\r\n" + "a=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack pli\r\n" * 100
SDP_ANSWER = SDP_OFFER[:3000]
CANDIDATE = (
    "candidate:842163049 1 udp 1677729535 203.0.113.7 {port} typ srflx raddr 10.0.0.2 "
    "rport {port} generation 0 ufrag EsAw network-id 1 network-cost 10"
)
CANDIDATES_EACH_WAY = 12

_user_numbers = itertools.count()

#: Tries of one edge that answered 4503 (busy) before the user gives up on it.
BUSY_RETRIES = 30


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument(
        "--jwt-secret",
        default=os.environ.get("SIGNALPOST_JWT_SECRET", ""),
        help="HS256 secret the server checks tokens with",
    )
    parser.add_argument(
        "--cluster-state",
        default="",
        help="state file of `signalpost cluster`: use every edge, and let "
        "the reconnect storm kill one",
    )
    parser.add_argument(
        "--storm-after",
        type=float,
        default=10.0,
        help="seconds into the run before the storm kills an edge",
    )
    parser.add_argument(
        "--kill-presence-after",
        type=float,
        default=0.0,
        help="with --cluster-state: SIGKILL one presence node this many seconds into the "
        "run (0: never)",
    )
    parser.add_argument("--fanout-size", type=int, default=5, help="members per fan-out room")
    parser.add_argument("--request-timeout", type=float, default=10.0)


@events.test_start.add_listener
def _check_secret(environment: Environment, **_kwargs: Any) -> None:
    options = environment.parsed_options
    if options is not None and not options.jwt_secret:
        raise SystemExit("load: set --jwt-secret or SIGNALPOST_JWT_SECRET (the server's secret)")


def _processes(environment: Environment, kind: str) -> list[dict[str, Any]]:
    """The cluster state file's processes of ``kind`` (none without a state file)."""
    path = environment.parsed_options.cluster_state if environment.parsed_options else ""
    if not path:
        return []
    document = json.loads(Path(path).read_text())
    return [p for p in document.get("processes", []) if p.get("kind") == kind]


def _edges(environment: Environment) -> list[dict[str, Any]]:
    return _processes(environment, "edge")


def _kill_one_later(environment: Environment, kind: str, after: float, what: str) -> None:
    """SIGKILL the first process of ``kind`` ``after`` seconds from now (if two or more)."""

    def kill_later() -> None:
        gevent.sleep(after)
        nodes = _processes(environment, kind)
        if len(nodes) < 2:
            log.warning("%s: fewer than two %s nodes; not killing any", what, kind)
            return
        victim = nodes[0]
        log.warning("%s: SIGKILL %s %s (pid %s)", what, kind, victim["id"], victim["pid"])
        try:
            os.kill(int(victim["pid"]), signal.SIGKILL)
        except OSError as exc:
            log.warning("%s: could not kill: %s", what, exc)

    gevent.spawn(kill_later)


@events.test_start.add_listener
def _storm(environment: Environment, **_kwargs: Any) -> None:
    """With a cluster state file and ReconnectStormUser in the run: kill one edge later."""
    options = environment.parsed_options
    if options is None or not options.cluster_state:
        return
    if any(u.__name__ == "ReconnectStormUser" for u in environment.user_classes):
        _kill_one_later(environment, "edge", options.storm_after, "reconnect storm")


@events.test_start.add_listener
def _presence_kill(environment: Environment, **_kwargs: Any) -> None:
    """With a cluster state file and ``--kill-presence-after``: kill one presence node."""
    options = environment.parsed_options
    if options is None or not options.cluster_state or options.kill_presence_after <= 0:
        return
    _kill_one_later(environment, "presence", options.kill_presence_after, "presence kill")


class SignalpostUser(User):
    """Shared plumbing: URLs, tokens, Locust reporting."""

    abstract = True
    wait_time = between(0.2, 1.0)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.number = next(_user_numbers)
        options = environment.parsed_options
        self.secret = options.jwt_secret if options else os.environ.get("SIGNALPOST_JWT_SECRET", "")
        self.timeout = options.request_timeout if options else 10.0
        edges = _edges(environment)
        if edges:
            self.urls = [
                e["url"] if e["url"].endswith("/v1/signal") else e["url"].rstrip("/") + "/v1/signal"
                for e in edges
            ]
        else:
            base = (self.host or "ws://127.0.0.1:8080").rstrip("/")
            self.urls = [base if base.endswith("/v1/signal") else base + "/v1/signal"]
        self.connections: list[SignalpostConnection] = []
        #: Edges get killed on purpose in this run: lost connections are expected.
        self.storm = bool(edges) and any(
            u.__name__ == "ReconnectStormUser" for u in environment.user_classes
        )

    def report(
        self, name: str, started: float, length: int, exception: BaseException | None
    ) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )

    def token(self, user: str) -> str:
        return mint_token(self.secret, user, now=time.time(), ttl=3600.0)

    def open(self, user: str, edge: int = 0, **resume: Any) -> SignalpostConnection:
        """Connect to edge ``edge``, falling over to the next ones if it is down.

        Only the last attempt's failure is reported: an edge killed by the storm refusing a
        connection is expected, no edge at all accepting it is a failure.
        """
        last: BaseException | None = None
        attempt = busy = 0
        while attempt < len(self.urls):
            url = self.urls[(edge + attempt) % len(self.urls)]
            final = attempt == len(self.urls) - 1
            try:
                connection = SignalpostConnection(
                    url,
                    self.token(user),
                    self.report if final else self._report_success,
                    timeout=self.timeout,
                    tolerate_loss=self.storm,
                    **resume,
                )
            except Busy as exc:
                # Shed (4503): come back when told, plus jitter (as the SDKs do).
                last = exc
                busy += 1
                if busy < BUSY_RETRIES:
                    gevent.sleep(exc.retry_after * (1.0 + random.random()))
                else:
                    attempt += 1
                continue
            except (OSError, RequestFailed, TimeoutError, WebSocketException) as exc:
                last = exc
                attempt += 1
                continue
            connection.reporter = self.report  # everything after the hello is reported
            self.connections.append(connection)
            return connection
        raise RequestFailed(f"no edge accepted the connection: {last}")

    def _report_success(
        self, name: str, started: float, length: int, exception: BaseException | None
    ) -> None:
        if exception is None:
            self.report(name, started, length, None)

    def on_stop(self) -> None:
        for connection in self.connections:
            connection.close()
        self.connections.clear()


class CallSetupUser(SignalpostUser):
    weight = 3

    def on_start(self) -> None:
        self.caller = self.open(f"caller-{self.number}", edge=0)
        self.callee = self.open(f"callee-{self.number}", edge=1)
        self.calls = itertools.count()

    def _reconnect_lost(self) -> None:
        """A killed edge took a connection: start new sessions (calls are short-lived)."""
        if self.caller.lost:
            self.connections.remove(self.caller)
            self.caller = self.open(f"caller-{self.number}", edge=0)
        if self.callee.lost:
            self.connections.remove(self.callee)
            self.callee = self.open(f"callee-{self.number}", edge=1)

    @task
    def call(self) -> None:
        self._reconnect_lost()
        _one_call(self, self.caller, self.callee, f"call-{self.number}-{next(self.calls)}")


def _one_call(
    user: SignalpostUser,
    caller: SignalpostConnection,
    callee: SignalpostConnection,
    room: str,
    *,
    name: str = "call-setup",
    callee_first: bool = False,
) -> None:
    """One call in a fresh ``room``: both join (the callee first if ``callee_first``), offer
    and candidates, answer and candidates, every signal acked; reported as ``name``."""
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        caller.drain()
        callee.drain()
        if callee_first:
            callee.join(room)
            caller.join(room)
            caller.drain()
        else:
            caller.join(room)
            callee.join(room)
        if callee_first:
            callee_session = callee.session
        else:
            peer = caller.expect(lambda f: f.get("type") == "peer-joined" and f.get("room") == room)
            callee_session = peer["peer"]["session"]
        caller.signal(room, {"type": "offer", "sdp": SDP_OFFER}, to=callee_session)
        for i in range(CANDIDATES_EACH_WAY):
            caller.signal(
                room,
                {
                    "candidate": CANDIDATE.format(port=50000 + i),
                    "sdpMid": "0",
                    "sdpMLineIndex": 0,
                },
                to=callee_session,
            )
        callee.expect_signals(1, caller.session)
        callee.signal(room, {"type": "answer", "sdp": SDP_ANSWER}, to=caller.session)
        for i in range(CANDIDATES_EACH_WAY):
            callee.signal(
                room,
                {
                    "candidate": CANDIDATE.format(port=51000 + i),
                    "sdpMid": "0",
                    "sdpMLineIndex": 0,
                },
                to=caller.session,
            )
        callee.expect_signals(CANDIDATES_EACH_WAY, caller.session)
        caller.expect_signals(1 + CANDIDATES_EACH_WAY, callee_session)
    except Exception as exc:
        error = exc
    if error is not None and user.storm and (caller.lost or callee.lost):
        # The edge under this call went away (reconnect storm): not a refusal.
        user.report("call-interrupted-by-edge-loss", started, 0, None)
        return
    user.report(name, started, 0, error)
    for connection in (caller, callee):
        with contextlib.suppress(RequestFailed):  # already reported by request()
            connection.leave(room)


class RegionCallUser(SignalpostUser):
    """Calls inside a region and across two (a cluster state file with regions).

    User ``n`` belongs to region ``n mod 2`` (of the regions in the state file, in their
    order). It holds two sessions on an edge of its region (``a`` and ``b``) and one on an
    edge of the other region (``far``). Its tasks, in turn: a call inside its region (``a``
    calls ``b``; homed in its region), a call across homed in its region (``a`` calls
    ``far``, ``a`` joins first), and a call across homed in the other region (``far`` joins
    first: a room's home is the region of its first member). Rooms are fresh each call.
    """

    weight = 1
    KINDS = ("local", "cross-home-near", "cross-home-far")

    def on_start(self) -> None:
        edges = _edges(self.environment)
        regions = list(dict.fromkeys(e.get("region", "") for e in edges if e.get("region")))
        self.calls = itertools.count()
        if len(regions) < 2:  # no regions (or no state file): local calls between any edges
            self.region = self.other = ""
            self.a = self.open(f"rc-{self.number}-a", edge=0)
            self.b = self.far = self.open(f"rc-{self.number}-b", edge=1)
            return
        self.region = regions[self.number % len(regions)]
        self.other = regions[(self.number + 1) % len(regions)]
        index = {
            region: [i for i, e in enumerate(edges) if e.get("region") == region]
            for region in regions
        }
        near, far = index[self.region], index[self.other]
        pick = self.number // len(regions)
        self.a = self.open(f"rc-{self.number}-a", edge=near[pick % len(near)])
        self.b = self.open(f"rc-{self.number}-b", edge=near[(pick + 1) % len(near)])
        self.far = self.open(f"rc-{self.number}-far", edge=far[pick % len(far)])

    @task
    def call(self) -> None:
        number = next(self.calls)
        kind = self.KINDS[number % len(self.KINDS)] if self.region else "local"
        room = f"rcall-{self.number}-{number}"
        if kind == "local":
            _one_call(
                self, self.a, self.b, room, name=f"call-setup {self.region or '(no regions)'}"
            )
        elif kind == "cross-home-near":
            name = f"call-setup {self.region}->{self.other} home {self.region}"
            _one_call(self, self.a, self.far, room, name=name)
        else:
            name = f"call-setup {self.region}->{self.other} home {self.other}"
            _one_call(self, self.a, self.far, room, name=name, callee_first=True)


class PresenceChurnUser(SignalpostUser):
    weight = 2
    POOL = 50

    @task
    def cycle(self) -> None:
        me = f"churn-{random.randrange(self.POOL)}"
        others = random.sample([f"churn-{i}" for i in range(self.POOL)], 8)
        connection = self.open(me, edge=random.randrange(len(self.urls)))
        try:
            started = time.perf_counter()
            watching = connection.watch(others)
            if not isinstance(watching.get("presence"), dict):
                self.report(
                    "watch-reply-shape",
                    started,
                    0,
                    RequestFailed("watching without a presence map"),
                )
            gevent.sleep(random.uniform(0.2, 1.5))
            connection.request("ping", {"type": "ping"})
        except RequestFailed:
            pass  # reported by request()
        finally:
            connection.close()
            self.connections.remove(connection)


class RoomFanoutUser(SignalpostUser):
    weight = 2

    def on_start(self) -> None:
        options = self.environment.parsed_options
        size = options.fanout_size if options else 5
        self.room = f"fanout-{self.number // size}"
        self.connection = self.open(f"fan-{self.number}", edge=self.number)
        self.connection.join(self.room)

    @task
    def broadcast(self) -> None:
        if self.connection.lost:  # its edge was killed: a new session rejoins the room
            self.connections.remove(self.connection)
            self.connection = self.open(f"fan-{self.number}", edge=self.number + 1)
            self.connection.join(self.room)
        connection = self.connection
        try:
            connection.signal(self.room, {"t": time.time(), "kind": "app-data"}, name="broadcast")
        except RequestFailed:
            return  # reported by request(); a lost connection is replaced on the next task
        while connection.inbox:
            frame = connection.inbox.popleft()
            if frame.get("type") == "signal" and "t" in frame.get("data", {}):
                # Latency to the moment the reader got the frame, not to this task.
                self.environment.events.request.fire(
                    request_type="WS",
                    name="fanout-delivery",
                    response_time=max(0.0, (frame["_received"] - frame["data"]["t"]) * 1000),
                    response_length=0,
                    exception=None,
                    context={},
                )


class _Ledger:
    """What the storm users' signals did: acked by the sender, received by the others.

    A signal acked is recorded with its send time; each member of the room records the
    ``(sender, n)`` of every signal it reads. At the end an acked signal sent after a
    member joined, and at least ``GRACE`` seconds before that member last read its inbox,
    must have reached it exactly once; rooms where a member's resume failed (a new
    session, whose earlier events are gone by design) are left out and counted.
    """

    GRACE = 2.0

    def __init__(self) -> None:
        self.acked: dict[str, list[tuple[str, int, float]]] = {}  # room -> (user, n, sent)
        self.received: dict[tuple[str, str], dict[tuple[str, int], int]] = {}
        self.joined_at: dict[tuple[str, str], float] = {}  # (room, user) -> time
        self.read_at: dict[tuple[str, str], float] = {}
        self.broken: set[str] = set()

    def read(self, room: str, user: str, connection: SignalpostConnection) -> None:
        received = self.received.setdefault((room, user), {})
        while connection.inbox:
            frame = connection.inbox.popleft()
            data = frame.get("data")
            if frame.get("type") == "signal" and isinstance(data, dict) and "u" in data:
                key = (data["u"], data["n"])
                received[key] = received.get(key, 0) + 1
        self.read_at[(room, user)] = time.time()

    def summary(self) -> dict[str, int]:
        checked = lost = duplicated = 0
        for room, acked in self.acked.items():
            if room in self.broken:
                continue
            members = [u for r, u in self.joined_at if r == room]
            for sender, n, sent in acked:
                for member in members:
                    if member == sender:
                        continue
                    joined = self.joined_at[(room, member)]
                    if not joined < sent < self.read_at.get((room, member), 0.0) - self.GRACE:
                        continue
                    checked += 1
                    copies = self.received.get((room, member), {}).get((sender, n), 0)
                    lost += copies == 0
                    duplicated += copies > 1
        return {
            "checked": checked,
            "lost": lost,
            "duplicated": duplicated,
            "rooms_left_out": len(self.broken),
        }


LEDGER = _Ledger()


@events.test_stop.add_listener
def _acked_report(environment: Environment, **_kwargs: Any) -> None:
    if not LEDGER.acked:
        return
    summary = LEDGER.summary()
    log.warning("reconnect storm, acked signals: %s", json.dumps(summary))
    name = "acked-signals-delivered"
    failed = summary["lost"] or summary["duplicated"]
    environment.events.request.fire(
        request_type="CHECK",
        name=name,
        response_time=0,
        response_length=summary["checked"],
        exception=RequestFailed(f"{summary}") if failed else None,
        context={},
    )


class ReconnectStormUser(SignalpostUser):
    weight = 2
    SELF_DROP_EVERY = 15  # tasks between self-inflicted drops when no edge gets killed

    def on_start(self) -> None:
        self.room = f"storm-{self.number // 2}"
        self.user = f"storm-{self.number}"
        self.edge = self.number % len(self.urls)
        self.connection = self.open(self.user, edge=self.edge)
        self.connection.join(self.room)
        LEDGER.joined_at[(self.room, self.user)] = time.time()
        self.rounds = 0  # not `tasks`: that is Locust's task list
        options = self.environment.parsed_options
        self.self_drop = not (options and options.cluster_state)

    def _resume(self) -> None:
        old = self.connection
        LEDGER.read(self.room, self.user, old)
        self.edge += 1
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            self.connection = self.open(
                f"storm-{self.number}",
                edge=self.edge,
                resume=old.resume_token,
                rooms=old.positions,
                ids=old.ids,
            )
            if not self.connection.resumed:
                raise RequestFailed("the session did not resume")
        except Exception as exc:
            error = exc
        self.report("session-resumed", started, 0, error)
        if old in self.connections:
            self.connections.remove(old)
        if error is not None:
            # Start afresh so the user keeps producing load.
            LEDGER.broken.add(self.room)
            self.connection = self.open(f"storm-{self.number}", edge=self.edge)
            self.connection.join(self.room)

    @task
    def talk(self) -> None:
        self.rounds += 1
        if self.self_drop and self.rounds % self.SELF_DROP_EVERY == 0:
            self.connection.abort()
            gevent.sleep(0.05)
        if self.connection.closed_code is not None:
            self._resume()
        LEDGER.read(self.room, self.user, self.connection)
        started = time.perf_counter()
        sent = time.time()
        try:
            self.connection.request(
                "signal",
                {
                    "type": "signal",
                    "room": self.room,
                    "data": {"kind": "keepalive", "n": self.rounds, "u": self.user},
                },
                report=False,
            )
            LEDGER.acked.setdefault(self.room, []).append((self.user, self.rounds, sent))
        except RequestFailed as exc:
            if self.connection.closed_code is None:
                self.report("signal", started, 0, exc)
                return
            # The edge went away under this request: not the server refusing it. Counted
            # apart; the session resumes on the next task.
            self.report("signal-lost-with-connection", started, 0, None)
            return
        self.report("signal", started, 0, None)
