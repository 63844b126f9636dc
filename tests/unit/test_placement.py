"""Rendezvous placement: deterministic owners, and minimal movement when the set changes."""

from __future__ import annotations

import random

import pytest

from signalpost.placement import owner, ranking

NODES = [f"tcp://10.0.0.{i}:5555" for i in range(1, 6)]
KEYS = [f"room-{i}" for i in range(10_000)]


def owners(nodes: list[str]) -> dict[str, str]:
    return {key: owner(key, nodes) for key in KEYS}


def test_owner_is_deterministic_and_independent_of_node_order() -> None:
    shuffled = list(NODES)
    random.Random(7).shuffle(shuffled)
    for key in KEYS[:500]:
        first = owner(key, NODES)
        assert owner(key, NODES) == first
        assert owner(key, shuffled) == first
        assert owner(key, tuple(NODES)) == first


@pytest.mark.parametrize(
    ("key", "order"),
    [
        ("room-0", [2, 4, 1, 5, 3]),
        ("lobby", [4, 2, 5, 1, 3]),
        ("r1", [1, 3, 2, 5, 4]),
        ("\u00e9t\u00e9", [3, 5, 1, 2, 4]),
    ],
)
def test_ranking_is_pinned_so_every_process_and_version_agrees(key: str, order: list[int]) -> None:
    # No dependence on PYTHONHASHSEED or on the interpreter: edges and brokers are separate
    # processes, and a rolling upgrade mixes versions. Changing the hash moves every room.
    assert ranking(key, NODES) == [f"tcp://10.0.0.{i}:5555" for i in order]


def test_owner_of_a_single_node() -> None:
    assert owner("anything", ["only"]) == "only"
    assert ranking("anything", ["only"]) == ["only"]


def test_ranking_starts_with_the_owner_and_lists_every_node_once() -> None:
    for key in KEYS[:500]:
        order = ranking(key, NODES)
        assert order[0] == owner(key, NODES)
        assert sorted(order) == sorted(NODES)


def test_ranking_is_the_order_owners_take_over_in() -> None:
    # Without the owner, the runner-up owns the key: the replica is the successor.
    for key in KEYS[:500]:
        order = ranking(key, NODES)
        rest = [n for n in NODES if n != order[0]]
        assert owner(key, rest) == order[1]
        assert ranking(key, rest) == order[1:]


def test_ranking_accepts_any_iterable() -> None:
    assert ranking("k", iter(NODES)) == ranking("k", NODES) == ranking("k", set(NODES))


def test_keys_spread_over_all_nodes() -> None:
    counts: dict[str, int] = {}
    for node in owners(NODES).values():
        counts[node] = counts.get(node, 0) + 1
    assert set(counts) == set(NODES)
    expected = len(KEYS) / len(NODES)
    assert all(abs(count - expected) < 0.1 * expected for count in counts.values()), counts


@pytest.mark.parametrize("removed", NODES)
def test_removing_a_node_moves_only_its_keys(removed: str) -> None:
    before = owners(NODES)
    after = owners([n for n in NODES if n != removed])
    moved = [key for key in KEYS if before[key] != after[key]]
    assert moved, "the removed node owned nothing?"
    assert all(before[key] == removed for key in moved)
    assert len(moved) == sum(1 for key in KEYS if before[key] == removed)
    # Its keys go to their runner-ups, spread over the survivors rather than one heir.
    heirs = {after[key] for key in moved}
    assert len(heirs) == len(NODES) - 1


def test_adding_a_node_moves_about_one_nth_and_only_to_the_new_node() -> None:
    before = owners(NODES)
    grown = [*NODES, "tcp://10.0.0.99:5555"]
    after = owners(grown)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(after[key] == "tcp://10.0.0.99:5555" for key in moved)
    share = len(moved) / len(KEYS)
    assert abs(share - 1 / len(grown)) < 0.03, share
