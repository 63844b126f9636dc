"""The view keeper (signalpost/ownership.py): unit tests, then a model check of several
keepers sharing one check-and-set store that loses its state now and then."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from signalpost.ownership import (
    BROKERS as BROKER_TIER,
)
from signalpost.ownership import (
    PRESENCE,
    Proposal,
    View,
    ViewKeeper,
    _split,
    decode_view,
    encode_view,
)


class Clock:
    """Wall-clock milliseconds that move on by a second at every reading."""

    def __init__(self, start: int = 1_000_000) -> None:
        self.ms = start

    def __call__(self) -> int:
        self.ms += 1000
        return self.ms


def keeper(grace: float = 10.0) -> ViewKeeper:
    return ViewKeeper(reset_grace=grace, wall_ms=Clock())


def test_the_first_view_holds_the_members_present() -> None:
    k = keeper()
    assert k.answered(None, 0, [], 0.0) is None  # nobody yet: nothing to write
    proposal = k.answered(None, 0, ["b", "a"], 0.0)
    assert proposal == Proposal(View(1_001_000, ("a", "b")), 0)
    assert k.current is None  # adopted only once read back


def test_a_stored_view_is_adopted_and_kept_while_members_match() -> None:
    k = keeper()
    view = View(7, ("a", "b"))
    assert k.answered(view, 40, ["a", "b"], 0.0) is None
    assert k.current == view


def test_a_missing_member_leaves_and_a_new_one_joins_with_the_next_number() -> None:
    k = keeper()
    assert k.answered(View(7, ("a", "b")), 40, ["a", "b"], 0.0) is None
    assert k.answered(View(7, ("a", "b")), 40, ["a"], 1.0) == Proposal(View(8, ("a",)), 40)
    assert k.answered(View(7, ("a", "b")), 40, ["a", "b", "c"], 1.0) == Proposal(
        View(8, ("a", "b", "c")), 40
    )


def test_a_node_that_just_started_drops_a_keyless_member_only_after_the_grace() -> None:
    k = keeper(grace=10.0)  # never read before: a keyless "b" may be coming back
    assert k.answered(View(7, ("a", "b")), 40, ["a"], 0.0) is None
    assert k.answered(View(7, ("a", "b")), 40, ["a"], 10.5) == Proposal(View(8, ("a",)), 40)


def test_a_view_is_never_empty() -> None:
    k = keeper()
    assert k.answered(View(7, ("a",)), 40, [], 0.0) is None


def test_an_older_view_is_not_adopted() -> None:
    k = keeper()
    k.answered(View(9, ("a",)), 50, ["a"], 0.0)
    k.answered(View(8, ("a", "b")), 51, ["a"], 1.0)
    assert k.current == View(9, ("a",))


def test_after_consul_lost_its_state_the_known_view_is_written_back_above_it() -> None:
    k = keeper(grace=10.0)
    k.answered(View(5, ("a", "b", "c")), 40, ["a", "b", "c"], 0.0)
    # Consul restarted: no view, only "a" has its key again.
    proposal = k.answered(None, 0, ["a"], 1.0)
    assert proposal is not None and proposal.cas == 0
    assert proposal.view.members == ("a", "b", "c")  # the others get time to come back
    assert proposal.view.number > 5
    written = proposal.view
    # "b" comes back and goes again: it leaves at once; "c" only after the grace.
    assert k.answered(written, 3, ["a", "b"], 2.0) is None
    assert k.answered(written, 3, ["a"], 3.0) == Proposal(View(written.number + 1, ("a", "c")), 3)
    assert k.answered(written, 3, ["a"], 11.5) == Proposal(View(written.number + 1, ("a",)), 3)


def test_a_broker_told_of_a_reset_gives_the_view_its_grace_though_another_wrote_it_back() -> None:
    # Another broker saw the empty store and wrote the view back; this one only sees the
    # written-back view and the keys not re-acquired yet. Told that Consul lost its state,
    # it must not drop those brokers at once (it wrote a one-broker view before).
    k = keeper(grace=10.0)
    k.answered(View(5, ("a", "b", "c")), 40, ["a", "b", "c"], 0.0)
    back = View(9_000, ("a", "b", "c"))
    assert k.answered(back, 3, ["a"], 1.0, reset=True) is None
    assert k.answered(back, 3, ["a"], 12.0) == Proposal(View(9_001, ("a",)), 3)


def test_a_restarted_node_does_not_write_a_view_of_itself_while_running_nodes_lack_keys() -> None:
    # Chaos seed 1234: Consul restarted (store empty), then broker "c" was killed and came
    # back before "a" and "b" had their keys again; knowing no view, it wrote one of itself
    # alone and every room moved to it, empty (member_refused, and an acked signal lost).
    k = keeper(grace=10.0)
    assert k.answered(None, 0, ["c"], 0.0, registered=["a", "b", "c"]) is None
    assert k.answered(None, 0, ["a", "c"], 1.0, registered=["a", "b", "c"]) is None
    # The running nodes write the view they know back: followed as usual.
    back = View(9_000, ("a", "b", "c"))
    assert k.answered(back, 3, ["a", "b", "c"], 2.0, registered=["a", "b", "c"]) is None
    assert k.current == back


def test_a_restarted_node_reading_a_written_back_view_gives_its_members_the_grace() -> None:
    # The same run, after the fix above: the running nodes wrote the view back, the
    # restarted "c" read it first and, knowing nothing of the reset, dropped "a" and "b"
    # (no keys yet) and wrote a view of itself alone.
    k = keeper(grace=10.0)
    back = View(9_000, ("a", "b", "c"))
    assert k.answered(back, 3, ["c"], 0.0, registered=["a", "b", "c"]) is None
    assert k.answered(back, 3, ["b", "c"], 1.0) is None  # "b" came back
    assert k.answered(back, 3, ["c"], 2.0) == Proposal(View(9_001, ("a", "c")), 3)  # and went
    assert k.answered(back, 3, ["c"], 10.5) == Proposal(View(9_001, ("c",)), 3)


def test_a_first_view_waits_for_registered_nodes_at_most_the_grace() -> None:
    k = keeper(grace=10.0)
    assert k.answered(None, 0, ["c"], 0.0, registered=["b", "c"]) is None
    assert k.answered(None, 0, ["c"], 9.0, registered=["b", "c"]) is None
    proposal = k.answered(None, 0, ["c"], 10.5, registered=["b", "c"])
    assert proposal is not None and proposal.view.members == ("c",)  # "b" never came
    fresh = keeper()  # nothing else registered (a new cluster's first node): at once
    assert fresh.answered(None, 0, ["c"], 0.0, registered=["c"]) is not None


def test_a_lower_number_written_by_a_broker_that_knew_less_is_overwritten() -> None:
    k = keeper()
    k.answered(View(50, ("a", "b")), 40, ["a", "b"], 0.0)
    assert k.answered(View(3, ("b",)), 7, ["a", "b"], 1.0) == Proposal(View(51, ("a", "b")), 7)
    assert k.current == View(50, ("a", "b"))


def test_views_round_trip_and_bad_values_read_as_missing() -> None:
    view = View(12, ("tcp://127.0.0.1:5555",))
    assert decode_view(encode_view(view)) == view
    for raw in [
        None,
        b"",
        b"{",
        b'{"number": 0, "brokers": ["a"]}',
        b'{"number": 3, "brokers": []}',
    ]:
        assert decode_view(raw) is None


# --------------------------------------------------------------------------- model check


@dataclass
class Store:
    """Consul's KV as the keepers see it: one view key with a ModifyIndex, member keys."""

    view: View | None = None
    index: int = 0
    members: set[str] = field(default_factory=set)
    written: list[int] = field(default_factory=list)  # numbers of every successful write

    def write(self, proposal: Proposal) -> None:
        if proposal.cas != (self.index if self.view is not None else 0):
            return  # check-and-set failed
        self.index += 1
        self.view = proposal.view
        self.written.append(proposal.view.number)


BROKERS = ["a", "b", "c", "d"]
step = st.one_of(
    st.tuples(st.just("read"), st.sampled_from(BROKERS)),
    st.tuples(st.just("leave"), st.sampled_from(BROKERS)),
    st.tuples(st.just("join"), st.sampled_from(BROKERS)),
    st.tuples(st.just("restart"), st.sampled_from(BROKERS)),  # the process: memory gone
    st.tuples(st.just("reset"), st.just("")),  # Consul restarted
    st.tuples(st.just("tick"), st.just("")),
)


@settings(max_examples=1000, deadline=None)
@given(st.lists(step, max_size=60))
def test_keepers_sharing_a_store_agree_and_numbers_only_grow(steps: list[tuple[str, str]]) -> None:
    clock = Clock()
    keepers = {b: ViewKeeper(reset_grace=5.0, wall_ms=clock) for b in BROKERS}
    store = Store(members={"a", "b"})
    now = 0.0
    seen: dict[str, list[int]] = {b: [] for b in BROKERS}

    def read(broker: str) -> None:
        k = keepers[broker]
        proposal = k.answered(store.view, store.index, sorted(store.members), now)
        if k.current is not None:
            seen[broker].append(k.current.number)
        if proposal is not None:
            store.write(proposal)

    for action, broker in steps:
        if action == "read":
            read(broker)
        elif action == "leave":
            store.members.discard(broker)
        elif action == "join":
            store.members.add(broker)
        elif action == "restart":
            keepers[broker] = ViewKeeper(reset_grace=5.0, wall_ms=clock)
            seen[broker] = []
        elif action == "reset":
            store.view, store.index = None, 0
            store.members.clear()
        else:
            now += 1.0
        clock.ms += 10  # wall time passes between steps
    # Every view written carries a higher number than every view written before it.
    assert store.written == sorted(set(store.written))
    # Each keeper only ever moves forward.
    for numbers in seen.values():
        assert numbers == sorted(numbers)
    # Quiet again: members hold their keys, everyone has read (a keeper's first read
    # starts its grace), the grace passes, everyone reads again.
    store.members |= {"a"}
    now += 10.0
    for broker in BROKERS:
        read(broker)
    now += 10.0
    for _ in range(3):
        for broker in BROKERS:
            read(broker)
    assert store.view is not None
    assert set(store.view.members) == store.members
    assert {k.current for k in keepers.values()} == {store.view}


def test_each_tier_keeps_its_own_keys_and_reads_only_them() -> None:
    assert BROKER_TIER.view_key == "signalpost/brokers/view"
    assert PRESENCE.view_key == "signalpost/presence/view"
    node = "tcp://10.0.0.1:5555"
    key = PRESENCE.member_key(node)
    assert key.startswith("signalpost/presence/members/") and "//" not in key
    assert PRESENCE.member_of(key) == node
    assert BROKER_TIER.member_of(key) is None  # another tier's member is not one of these
    items = [
        {"Key": BROKER_TIER.view_key, "Value": encode_view(View(3, ("b",))), "ModifyIndex": 7},
        {"Key": BROKER_TIER.member_key("b"), "Session": "s1"},
        {"Key": PRESENCE.view_key, "Value": encode_view(View(9, ("p",))), "ModifyIndex": 8},
        {"Key": PRESENCE.member_key("p"), "Session": "s2"},
        {"Key": PRESENCE.member_key("q")},  # no session: not held
    ]
    assert _split(PRESENCE, items)[:3] == (View(9, ("p",)), 8, ["p"])
    assert _split(BROKER_TIER, items)[:3] == (View(3, ("b",)), 7, ["b"])


def test_a_view_is_stored_under_the_json_name_brokers_kept_before_tiers() -> None:
    # A rolling upgrade reads the view an older broker wrote, and the other way round.
    assert encode_view(View(4, ("a", "b"))) == b'{"number":4,"brokers":["a","b"]}'
    assert decode_view(b'{"number":4,"brokers":["a"]}') == View(4, ("a",))


def test_a_second_reset_within_the_grace_of_the_first_gives_a_new_grace() -> None:
    # Chaos seed 9001 (5 min): Consul restarted twice, 7 s apart. The grace still ran from
    # the first reset, and the members that had come back after it counted as back: 0.2 s
    # after writing the view back, a broker dropped the two whose keys were not yet
    # taken again and wrote a view of itself alone (every room moved to it, then back).
    k = keeper(grace=10.0)
    k.answered(View(5, ("a", "b", "c")), 40, ["a", "b", "c"], 0.0)
    first = k.answered(None, 0, ["c"], 1.0)
    assert first is not None
    assert k.answered(first.view, 3, ["a", "b", "c"], 2.0) is None  # all came back
    second = k.answered(None, 0, ["c"], 8.0)  # Consul lost its state again
    assert second is not None and second.view.members == ("a", "b", "c")
    assert k.answered(second.view, 3, ["c"], 11.2) is None  # first grace over: kept still
    assert k.answered(second.view, 3, ["c"], 18.5) == Proposal(
        View(second.view.number + 1, ("c",)), 3
    )


async def test_a_restarted_node_owns_nothing_by_its_predecessors_view() -> None:
    # Chaos seed 31337 (5 min): a broker killed and restarted under the same id read the
    # view that still named it (its predecessor's) and served a room by it, while the
    # others, on the next view without it, moved the room to its runner-up: two owners in
    # one epoch, an edge took one's event for the other's offset, and a signal was lost
    # behind `recovered: true`. Now a view names a node for itself only once it was
    # written after this process took its member key; an older one is written again.
    from signalpost.ownership import BROKERS, TierMembership

    seen: list[View] = []
    written: list[Proposal] = []
    me = "tcp://me:1"
    membership = TierMembership("127.0.0.1:1", BROKERS, me, "broker-me", seen.append)
    membership._session = "mine"

    async def write(proposal: Proposal) -> None:
        written.append(proposal)

    membership._write = write  # type: ignore[method-assign]

    def answer(view: View, view_index: int, key_index: int) -> list[dict[str, object]]:
        return [
            {"Key": BROKERS.view_key, "Value": encode_view(view), "ModifyIndex": view_index},
            {"Key": BROKERS.member_key("tcp://a:1"), "Session": "a", "ModifyIndex": 5},
            {"Key": BROKERS.member_key(me), "Session": "mine", "ModifyIndex": key_index},
        ]

    old = View(96, ("tcp://a:1", me))
    membership._answered(answer(old, 50, 60), 0.0, False)  # the view is older than my key
    await asyncio.sleep(0)
    assert seen == [View(96, ("tcp://a:1",))]  # owns nothing by it
    assert written == [Proposal(View(97, ("tcp://a:1", me)), 50)]  # written again
    new = View(97, ("tcp://a:1", me))
    membership._writing = False
    membership._answered(answer(new, 70, 60), 0.1, False)
    assert seen[-1] == new  # a view of its own: it owns its rooms now
