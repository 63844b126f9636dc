"""Webhooks: the sans-I/O core (queue, order, retries, copies to the runner-up, cursors).

Theory of operation
-------------------
An *event* (``HookRecord``) belongs to a *stream*: ``room:<name>`` for a room's events,
``user:<id>`` for a user's presence. Its ``key`` is its idempotency key (a room's epoch and
offset, a user's status version): the same event told twice has the same key, and no two
events have the same key. The node that owns the stream (the broker owning the room, the
presence node owning the user) makes the event once what caused it is confirmed by its
runner-up (a room's batch acked, a lease copy acked), and hands it to ``Webhooks.add``.

``Webhooks`` then:

1. **Copies** it to the stream's runner-up (``HookCopy``; ``HookAck`` back), resent every
   ``resend_after`` until acknowledged and sent to the new runner-up when that changes
   (``signalpost.replication``). An event is *sendable* only once its copy is acked (or
   when there is no runner-up): a kill -9 of the owner never loses an event a receiver
   may have seen, nor one the owner made.
2. **Sends** it to every URL, per stream in order: for each (URL, stream) only the oldest
   event not yet delivered there is in flight, and at most ``concurrency`` requests per
   URL (``due``). A failure is retried after ``retry_delay`` (exponential, capped, with
   equal jitter); after ``max_attempts`` failures the event is *dead-lettered* for that URL
   (counted: ``dead``) and the stream goes on.
3. **Tells the runner-up** how far each stream is delivered (the *cursor*: the key of the
   last event every URL is done with), in the next ``HookCopy`` to it. The runner-up keeps
   the events it was copied past that cursor (``Shadow``).

When the runner-up becomes the owner (the owner died; ``promote``), it takes the events
its shadow holds past the cursor into its own queue, in order: delivery goes on from the
last confirmed delivery. What was in flight when the owner died is sent again (at least
once: a receiver drops an event whose ``Signalpost-Event-Id`` it has seen).

Bounds: the queue holds at most ``max_queue`` events; an event added past that is
dropped and counted as dead (``dropped``): a receiver that is down longer than the
queue lasts loses the newest events, never signalling's speed. A shadow holds at most
``max_queue`` events too (the oldest go first: by then delivered, almost surely).
``Webhooks`` never reads a clock (``now`` is passed in) nor draws randomness except from
the ``random`` it is given.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from signalpost.errors import BadRequest
from signalpost.replication import Unacked, resend_late
from signalpost.wire import Envelope, HookAck, HookCopy, HookRecord, HookStream

Outbound = tuple[str, Envelope]

#: Header names of a delivery (docs/webhooks.md).
EVENT_ID_HEADER: Final = "Signalpost-Event-Id"
TIMESTAMP_HEADER: Final = "Signalpost-Timestamp"
SIGNATURE_HEADER: Final = "Signalpost-Signature"
#: A signature older (or newer) than this many seconds is refused by ``verify``.
DEFAULT_TOLERANCE: Final = 300.0
#: Seconds after which an unacknowledged copy is sent to the runner-up again.
COPY_RESEND_AFTER: Final = 1.0
#: Events per ``HookCopy`` (more wait for the next one).
MAX_COPY_EVENTS: Final = 1024


# --------------------------------------------------------------------------- signatures


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The ``Signalpost-Signature`` header value: ``v1=`` and the hex HMAC-SHA256 of
    ``"<timestamp>." + body`` under ``secret``."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def verify(
    secret: str | bytes,
    body: bytes,
    headers: Mapping[str, str],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> dict[str, object]:
    """Check a delivery's signature and age; return its decoded event.

    Raises ``BadRequest`` if a header is missing, the timestamp is further than
    ``tolerance`` seconds from ``now`` (a replay), or no ``v1=`` signature matches (during
    a secret rotation a header may carry several, comma separated).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    stamp = lowered.get(TIMESTAMP_HEADER.lower())
    signature = lowered.get(SIGNATURE_HEADER.lower())
    if stamp is None or signature is None:
        raise BadRequest("webhook: missing timestamp or signature header")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise BadRequest("webhook: timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise BadRequest("webhook: timestamp outside the tolerance (a replay?)")
    expected = sign(secret, timestamp, body)
    if not any(hmac.compare_digest(expected, part.strip()) for part in signature.split(",")):
        raise BadRequest("webhook: signature does not match")
    event: dict[str, object] = json.loads(body)
    return event


def retry_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds before retry number ``attempt`` (1 is the first retry): ``base x 2^(n-1)``
    capped at ``cap``, of which a random half (equal jitter): receivers that came back are
    not hit by every sender at once."""
    delay = min(cap, base * (2.0 ** min(attempt - 1, 62)))
    return delay / 2 + rng.random() * delay / 2


# --------------------------------------------------------------------------- events


def room_stream(room: str) -> str:
    return f"room:{room}"


def user_stream(user: str) -> str:
    return f"user:{user}"


def event_body(key: str, kind: str, at: float, fields: Mapping[str, object]) -> bytes:
    """The JSON body of one event: ``id`` (the idempotency key), ``type``, ``created_at``
    (unix seconds) and the event's own fields."""
    document: dict[str, object] = {"id": key, "type": kind, "created_at": round(at, 3)}
    document.update(fields)
    return json.dumps(document, separators=(",", ":")).encode()


def make_event(
    stream: str, key: str, kind: str, at: float, fields: Mapping[str, object]
) -> HookRecord:
    return HookRecord(stream, key, kind, event_body(key, kind, at, fields))


# --------------------------------------------------------------------------- the queue


@dataclass(slots=True, eq=False)
class _Entry:
    record: HookRecord
    sendable: bool  # its copy is acked (or there is no runner-up)
    done: set[str] = field(default_factory=set)  # URLs delivered or dead-lettered
    attempts: dict[str, int] = field(default_factory=dict)  # URL -> failures so far
    retry_at: dict[str, float] = field(default_factory=dict)  # URL -> not before
    flying: set[str] = field(default_factory=set)  # URLs it is in flight to


@dataclass(slots=True)
class _Copy(Unacked):
    number: int = 0
    keys: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One request to make: ``record`` to ``url``."""

    url: str
    record: HookRecord


@dataclass(slots=True)
class Shadow:
    """A runner-up's copies: per stream, the events past the owner's cursor, in order."""

    max_events: int
    streams: OrderedDict[str, OrderedDict[str, HookRecord]] = field(default_factory=OrderedDict)
    count: int = 0
    #: stream -> the newest key copied here (its events may be delivered and gone since);
    #: as many streams as ``max_events``, the least recently copied forgotten first.
    last: OrderedDict[str, str] = field(default_factory=OrderedDict)

    def keep(self, stream: HookStream) -> None:
        held = self.streams.get(stream.stream)
        if held is None:
            held = self.streams[stream.stream] = OrderedDict()
        else:
            self.streams.move_to_end(stream.stream)
        for record in stream.events:
            if record.key not in held:
                held[record.key] = record
                self.count += 1
        newest = stream.events[-1].key if stream.events else stream.cursor
        if newest:
            self.last[stream.stream] = newest
            self.last.move_to_end(stream.stream)
            if len(self.last) > self.max_events:
                self.last.popitem(last=False)
        if stream.cursor:
            self.trim(stream.stream, stream.cursor)
        if not held:
            self.streams.pop(stream.stream, None)  # (``trim`` may have dropped it)
        while self.count > self.max_events and self.streams:
            name, oldest = next(iter(self.streams.items()))
            oldest.popitem(last=False)
            self.count -= 1
            if not oldest:
                del self.streams[name]

    def trim(self, stream: str, cursor: str) -> None:
        """Drop the events of ``stream`` through ``cursor`` (if it holds that one)."""
        held = self.streams.get(stream)
        if held is None or cursor not in held:
            return
        while held:
            key, _ = held.popitem(last=False)
            self.count -= 1
            if key == cursor:
                break
        if not held:
            del self.streams[stream]

    def take(self, stream: str) -> list[HookRecord]:
        held = self.streams.pop(stream, None)
        if held is None:
            return []
        self.count -= len(held)
        return list(held.values())

    def holds(self, stream: str, key: str) -> bool:
        held = self.streams.get(stream)
        return held is not None and key in held


def _no_replica(stream: str) -> str | None:
    return None


class Webhooks:
    """One node's webhook queue, its copies to runner-ups and its shadow of others'."""

    def __init__(
        self,
        urls: Iterable[str],
        *,
        node_id: str = "",
        replica_for: Callable[[str], str | None] = _no_replica,
        max_queue: int = 100_000,
        concurrency: int = 32,
        max_attempts: int = 12,
        retry_base: float = 0.5,
        retry_max: float = 30.0,
        resend_after: float = COPY_RESEND_AFTER,
        rng: random.Random | None = None,
    ) -> None:
        self.urls = list(dict.fromkeys(urls))
        self.node_id = node_id
        self.replica_for = replica_for
        self.max_queue = max_queue
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.resend_after = resend_after
        self.rng = rng if rng is not None else random.Random()
        self.streams: dict[str, deque[_Entry]] = {}
        self.queued = 0
        self._keys: dict[str, _Entry] = {}  # key -> its entry while queued
        self._flying: dict[str, int] = dict.fromkeys(self.urls, 0)
        self._copies: dict[int, _Copy] = {}
        self._next_copy = 0
        self._to_copy: dict[str, list[HookRecord]] = {}  # stream -> events to copy next
        self._cursors: dict[str, str] = {}  # stream -> cursor not told to its runner-up yet
        # What waits for events to be copied (``hold``): their keys, and what to send then.
        self._held: list[tuple[list[str], Outbound]] = []
        self.shadow = Shadow(max_queue)
        #: Counters (the shell exports them): delivered, failed attempts, dead-lettered
        #: (max attempts), dropped (queue full).
        self.delivered = 0
        self.failed = 0
        self.dead = 0
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return bool(self.urls)

    # ----------------------------------------------------------------- owner side

    def add(self, record: HookRecord, now: float) -> bool:
        """Queue an event made by this node as the stream's owner. False: dropped (the
        queue is full, or the same key is queued already)."""
        if not self.urls or record.key in self._keys:
            return False
        if self.queued >= self.max_queue:
            self.dropped += 1
            return False
        replica = self.replica_for(record.stream)
        entry = _Entry(record, sendable=replica is None)
        self._push(entry)
        if replica is not None:
            self._to_copy.setdefault(record.stream, []).append(record)
        return True

    def _push(self, entry: _Entry) -> None:
        stream = self.streams.get(entry.record.stream)
        if stream is None:
            stream = self.streams[entry.record.stream] = deque()
        stream.append(entry)
        self._keys[entry.record.key] = entry
        self.queued += 1

    def promote(self, stream: str, now: float) -> int:
        """This node owns ``stream`` now: queue what its shadow holds of it (ahead of
        anything new), and copy it on to this node's runner-up. How many were taken."""
        taken = self.shadow.take(stream)
        if not taken or not self.urls:
            return 0
        queue = self.streams.get(stream)
        later = list(queue) if queue else []
        if queue:
            for entry in later:
                del self._keys[entry.record.key]
            self.queued -= len(later)
            queue.clear()
        replica = self.replica_for(stream)
        count = 0
        for record in taken:
            if record.key in self._keys:
                continue
            self._push(_Entry(record, sendable=replica is None))
            if replica is not None:
                self._to_copy.setdefault(stream, []).append(record)
            count += 1
        for entry in later:
            if entry.record.key not in self._keys:
                self._push(entry)
        return count

    def high_water(self, stream: str) -> str | None:
        """The newest key of ``stream`` this node knows (queued here, or copied to it by
        the previous owner); None: none."""
        queue = self.streams.get(stream)
        if queue:
            return queue[-1].record.key
        return self.shadow.last.get(stream)

    def shadowed_streams(self) -> list[str]:
        return list(self.shadow.streams)

    def due(self, now: float) -> list[Attempt]:
        """The requests to make now: per URL at most ``concurrency`` in flight, per
        (URL, stream) only the oldest event not delivered there yet."""
        attempts: list[Attempt] = []
        for url in self.urls:
            room = self.concurrency - self._flying[url]
            if room <= 0:
                continue
            for queue in self.streams.values():
                head = next((e for e in queue if url not in e.done), None)
                if (
                    head is None
                    or not head.sendable
                    or url in head.flying
                    or head.retry_at.get(url, 0.0) > now
                ):
                    continue
                head.flying.add(url)
                self._flying[url] += 1
                attempts.append(Attempt(url, head.record))
                room -= 1
                if room == 0:
                    break
        return attempts

    def next_retry(self) -> float | None:
        """When the earliest waiting retry becomes due (None: none waits)."""
        times = [
            at
            for queue in self.streams.values()
            for entry in queue
            for url, at in entry.retry_at.items()
            if url not in entry.done and url not in entry.flying
        ]
        return min(times, default=None)

    def finished(self, attempt: Attempt, ok: bool, now: float) -> None:
        """An attempt's outcome: delivered (a 2xx), or failed (retried, or dead)."""
        entry = self._keys.get(attempt.record.key)
        url = attempt.url
        if url in self._flying and self._flying[url] > 0:
            self._flying[url] -= 1
        if entry is None or url not in entry.flying:
            return
        entry.flying.discard(url)
        if ok:
            self.delivered += 1
            entry.done.add(url)
        else:
            self.failed += 1
            failures = entry.attempts[url] = entry.attempts.get(url, 0) + 1
            if failures >= self.max_attempts:
                self.dead += 1
                entry.done.add(url)
            else:
                entry.retry_at[url] = now + retry_delay(
                    failures, self.retry_base, self.retry_max, self.rng
                )
        self._pop_done(entry.record.stream)

    def _pop_done(self, stream: str) -> None:
        queue = self.streams.get(stream)
        if queue is None:
            return
        cursor = None
        while queue and len(queue[0].done) == len(self.urls):
            entry = queue.popleft()
            del self._keys[entry.record.key]
            self.queued -= 1
            cursor = entry.record.key
        if cursor is not None:
            self._cursors[stream] = cursor
        if not queue:
            del self.streams[stream]

    # ----------------------------------------------------------------- copies

    def flush(self, now: float) -> list[Outbound]:
        """The copies to send now: new events and cursors per runner-up, and copies not
        acknowledged for ``resend_after``."""
        out: list[Outbound] = []
        by_target: dict[str, dict[str, HookStream]] = {}
        for stream, records in self._to_copy.items():
            replica = self.replica_for(stream)
            if replica is None:
                for record in records:
                    entry = self._keys.get(record.key)
                    if entry is not None:
                        entry.sendable = True
                continue
            # With every event of the stream not acknowledged yet, in the stream's order:
            # an earlier copy lost and resent later must not put its events behind these
            # in the runner-up's copy of the stream (it keeps the first place it saw).
            queue = self.streams.get(stream)
            if queue is not None:
                records = [e.record for e in queue if not e.sendable]
            cursor = self._cursors.pop(stream, "")
            by_target.setdefault(replica, {})[stream] = HookStream(stream, records, cursor)
        self._to_copy = {}
        for stream, cursor in self._cursors.items():
            replica = self.replica_for(stream)
            if replica is not None:
                parts = by_target.setdefault(replica, {})
                if stream not in parts:
                    parts[stream] = HookStream(stream, [], cursor)
        self._cursors = {}
        out.extend(self._let_out())  # (events without a runner-up went out just now)
        for replica, parts in by_target.items():
            chunk: list[HookStream] = []
            size = 0
            for part in parts.values():
                events = part.events
                while len(events) > MAX_COPY_EVENTS - size:
                    head, events = (
                        events[: MAX_COPY_EVENTS - size],
                        events[MAX_COPY_EVENTS - size :],
                    )
                    chunk.append(HookStream(part.stream, head))
                    self._send_copy(replica, chunk, now, out)
                    chunk, size = [], 0
                chunk.append(HookStream(part.stream, events, part.cursor))
                size += len(events)
            if chunk:
                self._send_copy(replica, chunk, now, out)
        resend_late(self._copies.values(), now, self.resend_after, out)
        return out

    def _send_copy(
        self, target: str, streams: list[HookStream], now: float, out: list[Outbound]
    ) -> None:
        number = self._next_copy
        self._next_copy += 1
        message = HookCopy(self.node_id, number, streams)
        keys = [r.key for s in streams for r in s.events]
        if keys:  # cursors alone need no ack: a lost one costs duplicates, nothing else
            self._copies[number] = _Copy(message, target, sent_at=now, number=number, keys=keys)
        out.append((target, message))

    def acked(self, ack: HookAck) -> list[Outbound]:
        """The runner-up has copy ``ack.number``: its events may go out. What was held
        for them, to send now."""
        held = self._copies.pop(ack.number, None)
        if held is None:
            return []
        for key in held.keys:
            entry = self._keys.get(key)
            if entry is not None:
                entry.sendable = True
        return self._let_out()

    def hold(self, keys: list[str], outbound: Outbound) -> list[Outbound]:
        """Send ``outbound`` only once the events ``keys`` are copied to the runner-up (or
        gone: delivered, dropped). What to send now."""
        self._held.append((keys, outbound))
        return self._let_out()

    def _let_out(self) -> list[Outbound]:
        if not self._held:
            return []
        out: list[Outbound] = []
        waiting: list[tuple[list[str], Outbound]] = []
        for keys, outbound in self._held:
            if all(self._keys[k].sendable for k in keys if k in self._keys):
                out.append(outbound)
            else:
                waiting.append((keys, outbound))
        self._held = waiting
        return out

    def replicas_changed(self, now: float) -> list[Outbound]:
        """Runner-ups may have changed: what is not acknowledged yet is copied again, each
        stream to its runner-up now, at the next ``flush`` (with none, it may go out)."""
        for held in self._copies.values():
            if isinstance(held.message, HookCopy):
                for stream in held.message.streams:
                    pending = [r for r in stream.events if r.key in self._keys]
                    if pending:
                        self._to_copy.setdefault(stream.stream, [])[:0] = pending
        self._copies.clear()
        return self.flush(now)

    # ----------------------------------------------------------------- runner-up side

    def copied(self, copy: HookCopy) -> list[Outbound]:
        """Runner-up: keep the owner's events (past its cursors), acknowledge."""
        for stream in copy.streams:
            self.shadow.keep(stream)
        return [(copy.owner, HookAck(copy.number))]
