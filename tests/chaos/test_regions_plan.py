"""The two-region chaos run's plan: rooms pinned to both regions with members in both,
and clients that resume in their own region before trying another (no cluster needed)."""

from __future__ import annotations

import random

from tests.chaos.checker import Journal
from tests.chaos.harness import ChaosConfig, main, plan_rooms
from tests.chaos.workload import ChaosClient, Endpoint

REGIONS = ("eu", "us")


def test_every_room_is_pinned_to_a_region_and_has_members_in_both() -> None:
    for seed in range(50):
        plan = plan_rooms(random.Random(seed), 16, 8, REGIONS)
        names = list(plan)
        region_of = {name: REGIONS[i % 2] for i, name in enumerate(names)}
        rooms = {room for rooms in plan.values() for room in rooms}
        assert {room.split("-", 1)[0] for room in rooms} == set(REGIONS)
        for room in rooms:
            members = [n for n in names if room in plan[n]]
            assert len(members) >= 3
            assert {region_of[n] for n in members} == set(REGIONS), (seed, room)
    config = ChaosConfig(seed=1, regions=REGIONS)
    assert config.home_of("eu-room-1") == "eu" and config.home_of("us-room-2") == "us"
    assert ChaosConfig(seed=1).home_of("room-1") == ""


def test_without_regions_the_plan_is_unchanged() -> None:
    plan = plan_rooms(random.Random(7), 16, 8)
    assert {room for rooms in plan.values() for room in rooms} == {f"room-{i}" for i in range(1, 9)}


def _client(home: int, edges: list[Endpoint]) -> ChaosClient:
    return ChaosClient("c01", ("eu-room-1",), edges, home, Journal(0.0), lambda: 0.0)


def test_a_client_resumes_in_its_own_region_first_then_the_other() -> None:
    edges = [
        Endpoint("eu-edge-1", "ws://a", "eu"),
        Endpoint("eu-edge-2", "ws://b", "eu"),
        Endpoint("us-edge-1", "ws://c", "us"),
        Endpoint("us-edge-2", "ws://d", "us"),
    ]
    client = _client(1, edges)  # home eu-edge-2
    client._edge_index = 1
    assert client.resume_order() == [0, 1, 2, 3]  # the other eu edge, the lost one, then us
    client._edge_index = 0
    assert client.resume_order() == [1, 0, 2, 3]  # home first
    client._edge_index = 2  # resumed in us while eu was down: home first, then eu, then us
    assert client.resume_order() == [1, 0, 2, 3]
    single = _client(0, [Endpoint("edge-1", "ws://a"), Endpoint("edge-2", "ws://b")])
    assert single.resume_order() == [1, 0]  # one region: the other edge, then this one


def test_the_command_line_refuses_one_region_and_unknown_faults(capsys: object) -> None:
    for argv in (["--regions", "eu"], ["--regions", "eu,eu"], ["--faults", "region_kill"]):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
