"""The webhooks core (sans-I/O): signatures, order, retries, dead letters, bounds, copies
to the runner-up and takeover; and a model test against a small reference."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalpost.errors import BadRequest
from signalpost.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Attempt,
    Webhooks,
    make_event,
    retry_delay,
    sign,
    verify,
)
from signalpost.wire import HookAck, HookCopy, HookStream, decode_envelope, encode_envelope

URL = "http://127.0.0.1:9/hooks"


def ev(stream: str, n: int) -> object:
    return make_event(stream, f"{stream}:{n}", "peer.joined", 0.0, {"n": n})


def test_signature_verifies_and_refuses_tampering_and_replays() -> None:
    body = b'{"id":"k","type":"room.started"}'
    now = int(time.time())
    headers = {TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: sign("s3cret", now, body)}
    assert verify("s3cret", body, headers)["type"] == "room.started"
    with pytest.raises(BadRequest):
        verify("other", body, headers)
    with pytest.raises(BadRequest):
        verify("s3cret", body + b" ", headers)
    with pytest.raises(BadRequest):
        verify("s3cret", body, headers, now=now + 301)
    with pytest.raises(BadRequest):
        verify("s3cret", body, {TIMESTAMP_HEADER: str(now)})
    # Rotation: several signatures, one matching.
    rotated = {**headers, SIGNATURE_HEADER: f"v1=00, {headers[SIGNATURE_HEADER]}"}
    assert verify("s3cret", body, rotated)["id"] == "k"


def test_retry_delay_doubles_caps_and_jitters() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, 0.5, 30.0, rng) for n in range(1, 12)]
    assert 0.25 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0
    assert all(15.0 <= d <= 30.0 for d in delays[7:])


def test_one_in_flight_per_stream_and_url_in_order_and_concurrency_bound() -> None:
    hooks = Webhooks([URL], concurrency=2)
    for n in range(3):
        hooks.add(ev("room:a", n), 0.0)  # type: ignore[arg-type]
    hooks.add(ev("room:b", 0), 0.0)  # type: ignore[arg-type]
    hooks.add(ev("room:c", 0), 0.0)  # type: ignore[arg-type]
    first = hooks.due(0.0)
    assert [a.record.key for a in first] == ["room:a:0", "room:b:0"]  # concurrency 2
    assert hooks.due(0.0) == []
    hooks.finished(first[0], True, 0.0)
    assert [a.record.key for a in hooks.due(0.0)] == ["room:a:1"]


def test_failure_is_retried_after_backoff_then_dead_lettered_and_stream_goes_on() -> None:
    hooks = Webhooks([URL], max_attempts=2, retry_base=1.0, retry_max=1.0)
    hooks.add(ev("room:a", 0), 0.0)  # type: ignore[arg-type]
    hooks.add(ev("room:a", 1), 0.0)  # type: ignore[arg-type]
    (attempt,) = hooks.due(0.0)
    hooks.finished(attempt, False, 0.0)
    assert hooks.due(0.1) == []  # backing off (0.5 to 1 s)
    (again,) = hooks.due(1.0)
    assert again.record.key == "room:a:0"
    hooks.finished(again, False, 1.0)
    assert hooks.dead == 1
    (next_one,) = hooks.due(1.0)
    assert next_one.record.key == "room:a:1"


def test_queue_bound_drops_new_events_and_counts_them() -> None:
    hooks = Webhooks([URL], max_queue=2)
    assert hooks.add(ev("room:a", 0), 0.0)  # type: ignore[arg-type]
    assert hooks.add(ev("room:b", 0), 0.0)  # type: ignore[arg-type]
    assert not hooks.add(ev("room:c", 0), 0.0)  # type: ignore[arg-type]
    assert hooks.dropped == 1 and hooks.queued == 2


def test_nothing_goes_out_before_the_runner_up_acks_the_copy() -> None:
    owner = Webhooks([URL], node_id="b1", replica_for=lambda s: "b2")
    owner.add(ev("room:a", 0), 0.0)  # type: ignore[arg-type]
    assert owner.due(0.0) == []
    ((target, copy),) = owner.flush(0.0)
    assert target == "b2" and isinstance(copy, HookCopy)
    assert decode_envelope(encode_envelope(copy)) == copy
    assert owner.due(0.0) == []
    assert [e for _, e in owner.flush(1.5)] == [copy]  # resent, unacked
    owner.acked(HookAck(copy.number))
    assert [a.record.key for a in owner.due(1.5)] == ["room:a:0"]


def test_successor_delivers_from_the_last_confirmed_delivery() -> None:
    owner = Webhooks([URL], node_id="b1", replica_for=lambda s: "b2")
    runner_up = Webhooks([URL], node_id="b2")
    for n in range(4):
        owner.add(ev("room:a", n), 0.0)  # type: ignore[arg-type]
    ((_, copy),) = owner.flush(0.0)
    assert isinstance(copy, HookCopy)
    ((_, ack),) = runner_up.copied(copy)
    assert isinstance(ack, HookAck)
    owner.acked(ack)
    for _ in range(2):
        (attempt,) = owner.due(0.0)
        owner.finished(attempt, True, 0.0)
    ((_, cursor),) = owner.flush(0.1)  # the cursor goes to the runner-up
    assert isinstance(cursor, HookCopy) and cursor.streams[0].cursor == "room:a:1"
    runner_up.copied(cursor)
    # The owner dies; the runner-up takes the stream over.
    assert runner_up.promote("room:a", 1.0) == 2
    keys = []
    for _ in range(2):
        (attempt,) = runner_up.due(1.0)
        keys.append(attempt.record.key)
        runner_up.finished(attempt, True, 1.0)
    assert keys == ["room:a:2", "room:a:3"]


def test_a_cursor_that_empties_a_shadow_stream_is_acked() -> None:
    runner_up = Webhooks([URL], node_id="b2")
    record = ev("room:a", 0)
    copy = HookCopy("b1", 0, [HookStream("room:a", [record], "room:a:0")])  # type: ignore[list-item]
    assert runner_up.copied(copy) == [("b1", HookAck(0))]
    assert runner_up.shadowed_streams() == []


# --------------------------------------------------------------------------- model test

commands = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(["room:a", "room:b", "user:u"])),
        st.tuples(st.just("ok"), st.integers(0, 7)),
        st.tuples(st.just("fail"), st.integers(0, 7)),
        st.tuples(st.just("tick"), st.floats(0.0, 3.0)),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(commands)
def test_model_every_event_delivered_or_dead_once_per_url_in_stream_order(
    script: list[tuple[str, object]],
) -> None:
    """Against a reference: per stream and URL, attempts follow the order events were
    added; each event ends delivered or dead exactly once per URL; nothing is lost."""
    urls = [URL, URL + "2"]
    hooks = Webhooks(urls, concurrency=3, max_attempts=3, retry_base=0.5, retry_max=1.0)
    rng_now = 0.0
    added: dict[str, list[str]] = {}
    outcome: dict[tuple[str, str], str] = {}
    flying: list[Attempt] = []
    counter = 0
    for kind, arg in script:
        if kind == "add":
            stream = str(arg)
            key = f"{stream}:{counter}"
            counter += 1
            hooks.add(make_event(stream, key, "x", 0.0, {}), rng_now)
            added.setdefault(stream, []).append(key)
        elif kind == "tick":
            rng_now += float(arg)  # type: ignore[arg-type]
        elif flying:
            attempt = flying.pop(int(arg) % len(flying))  # type: ignore[call-overload]
            hooks.finished(attempt, kind == "ok", rng_now)
            if kind == "ok":
                assert (attempt.url, attempt.record.key) not in outcome
                outcome[(attempt.url, attempt.record.key)] = "ok"
        for attempt in hooks.due(rng_now):
            stream, key = attempt.record.stream, attempt.record.key
            # Order: every earlier event of the stream is done for this URL.
            earlier = added[stream][: added[stream].index(key)]
            assert all((attempt.url, k) in outcome or _dead(hooks, k) for k in earlier)
            assert not any(f.url == attempt.url and f.record.stream == stream for f in flying)
            flying.append(attempt)
        assert all(sum(1 for f in flying if f.url == u) <= 3 for u in urls)
    # Drain: everything ends delivered (or dead) for every URL.
    for _ in range(1000):
        if not flying and not hooks.queued:
            break
        rng_now += 1.0
        while flying:
            attempt = flying.pop(0)
            hooks.finished(attempt, True, rng_now)
            outcome[(attempt.url, attempt.record.key)] = "ok"
        flying.extend(hooks.due(rng_now))
    assert hooks.queued == 0
    total = sum(len(keys) for keys in added.values()) * len(urls)
    assert hooks.delivered + hooks.dead == total


def _dead(hooks: Webhooks, key: str) -> bool:
    return hooks.dead > 0  # a dead event lets the stream go on (counted, not tracked)


failover_commands = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(["room:a", "room:b", "user:u"])),
        st.tuples(st.just("copy"), st.booleans()),  # owner -> runner-up; False: lost
        st.tuples(st.just("send"), st.integers(0, 7)),  # an attempt finishes (ok)
        st.tuples(st.just("fail"), st.integers(0, 7)),
        st.tuples(st.just("kill"), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(failover_commands)
def test_model_kill_9_of_the_owner_loses_nothing_sent_and_keeps_order(
    script: list[tuple[str, object]],
) -> None:
    """An owner and its runner-up against a reference: nothing goes out before the
    runner-up has it; after the owner's death every event a receiver may have seen, or
    the runner-up acknowledged, arrives (again, under the same key); first arrivals per
    stream keep the order events were made in."""
    owner = Webhooks([URL], node_id="A", replica_for=lambda s: "B", max_attempts=1000)
    runner_up = Webhooks([URL], node_id="B", max_attempts=1000)
    live = owner
    made: dict[str, list[str]] = {}
    acked: set[str] = set()  # keys the runner-up acknowledged
    arrived: list[str] = []  # the receiver's log, every arrival
    flying: list[Attempt] = []
    owner_attempts: list[Attempt] = []  # (by identity: the same event may go twice)
    now = 0.0
    counter = 0
    dead = False
    for kind, arg in script:
        now += 0.3
        if kind == "add" and not dead:
            stream = str(arg)
            key = f"{stream}:{counter}"
            counter += 1
            owner.add(make_event(stream, key, "x", now, {}), now)
            made.setdefault(stream, []).append(key)
        elif kind == "copy" and not dead:
            for target, copy in owner.flush(now):
                assert target == "B" and isinstance(copy, HookCopy)
                if arg:  # delivered (else lost on the way; resent later)
                    for _, ack in runner_up.copied(copy):
                        assert isinstance(ack, HookAck)
                        acked.update(r.key for s in copy.streams for r in s.events)
                        owner.acked(ack)
        elif kind in ("send", "fail") and flying:
            attempt = flying.pop(int(arg) % len(flying))  # type: ignore[call-overload]
            node = owner if any(attempt is a for a in owner_attempts) else runner_up
            if kind == "send":
                arrived.append(attempt.record.key)
                if node is owner:
                    assert attempt.record.key in acked  # never before the runner-up had it
            node.finished(attempt, kind == "send", now)
        elif kind == "kill" and not dead:
            dead = True
            flying = [a for a in flying if not any(a is o for o in owner_attempts)]
            for stream in runner_up.shadowed_streams():
                runner_up.promote(stream, now)
            live = runner_up
        new = live.due(now)
        if live is owner:
            owner_attempts.extend(new)
        flying.extend(new)
    if not dead:  # the owner dies at the end, whatever is pending
        dead = True
        flying = [a for a in flying if not any(a is o for o in owner_attempts)]
        for stream in runner_up.shadowed_streams():
            runner_up.promote(stream, now)
    for _ in range(2000):  # drain the runner-up: every attempt succeeds
        now += 1.0
        flying.extend(runner_up.due(now))
        if not flying:
            if not runner_up.queued:
                break
            continue  # a retry is due later
        attempt = flying.pop(0)
        arrived.append(attempt.record.key)
        runner_up.finished(attempt, True, now)
    assert not runner_up.queued
    # Everything the runner-up acknowledged (and so everything sent) arrived.
    assert acked <= set(arrived)
    # First arrivals per stream in the order made.
    first = list(dict.fromkeys(arrived))
    for stream, keys in made.items():
        got = [k for k in first if k.startswith(stream + ":")]
        assert got == [k for k in keys if k in set(got)], (stream, got, keys)
    # And without gaps: what arrived of a stream is a prefix of what was made, except for
    # events made after the last acknowledged one (those may die with the owner).
    for stream, keys in made.items():
        got = {k for k in first if k.startswith(stream + ":")}
        last = max((keys.index(k) for k in got), default=-1)
        assert set(keys[: last + 1]) <= got, (stream, keys, got)


def test_the_leave_that_ends_a_room_is_answered_once_the_runner_up_has_the_end() -> None:
    # Nothing but the webhook copy records a room's end: a kill -9 before the runner-up has
    # it must leave the leave unanswered (the edge resends it to the successor).
    from broker.hooks import RoomHooks
    from broker.rooms import RoomTable
    from signalpost.wire import JoinCmd, LeaveCmd, Reply, peer_object

    hooks = Webhooks([URL], node_id="A", replica_for=lambda s: "B")
    table = RoomTable(
        capacity=2,
        resume_window=30,
        history_max_events=100,
        history_max_age=600,
        new_epoch=lambda: "e1",
        node_id="A",
    )
    table.hooks = RoomHooks(hooks)
    joined = table.handle(
        JoinCmd("a", "c-a", "edge", 1, 1, "r", peer_object("a", "u", None, None)), 0.0
    )
    assert any(isinstance(e, Reply) for _, e in joined)
    out = table.handle(LeaveCmd("a", "c-a", "edge", 2, 2, "r"), 0.0)
    assert not any(isinstance(e, Reply) for _, e in out)  # held
    copies = hooks.flush(0.0)
    (copy,) = [e for _, e in copies if isinstance(e, HookCopy)]
    kinds = [r.kind for s in copy.streams for r in s.events]
    assert kinds[-2:] == ["peer.left", "room.ended"]
    released = hooks.acked(HookAck(copy.number))
    assert [type(e) for _, e in released] == [Reply]
