"""Re-homing a room whose home region is lost: the rules every edge applies (sans-I/O)."""

from __future__ import annotations

import pytest

from signalpost.rehoming import (
    HomeRecord,
    RegionLiveness,
    Wait,
    Write,
    arbiters,
    decide,
    encode_record,
    parse_record,
)

REGIONS = ["eu", "us"]


def _room_arbitered_by(region: str) -> tuple[str, list[str]]:
    room = next(f"room-{n}" for n in range(100) if arbiters(f"room-{n}", REGIONS)[0] == region)
    return room, arbiters(room, REGIONS)


def test_records_round_trip_and_a_bare_region_is_a_first_claim() -> None:
    record = HomeRecord("us", 3)
    assert parse_record(encode_record(record), REGIONS) == record
    assert parse_record(b"eu", REGIONS) == HomeRecord("eu", 1)
    bad_ones = (b"ap", b'{"home": "eu"}', b'{"home": "ap", "term": 2}', b"{")
    for bad in (*bad_ones, b'{"home": "eu", "term": 0}'):
        with pytest.raises(ValueError):
            parse_record(bad, REGIONS)


def test_the_first_member_claims_at_the_arbiter() -> None:
    _room, order = _room_arbitered_by("eu")
    assert decide(order, {"eu": None, "us": None}, None, set(), "us") == Write(
        "eu", HomeRecord("us", 1)
    )
    # A record there: it is the home, once copied to the next arbiter (best effort: not
    # while that one does not answer).
    claimed = {"eu": HomeRecord("eu", 1), "us": None}
    assert decide(order, claimed, None, set(), "us") == Write("us", HomeRecord("eu", 1))
    assert decide(order, {"eu": HomeRecord("eu", 1)}, None, set(), "us") == HomeRecord("eu", 1)
    copied = {"eu": HomeRecord("eu", 1), "us": HomeRecord("eu", 1)}
    assert decide(order, copied, None, set(), "us") == HomeRecord("eu", 1)


def test_an_unreachable_arbiter_that_is_not_lost_is_waited_for() -> None:
    _room, order = _room_arbitered_by("eu")
    assert isinstance(decide(order, {"us": None}, None, set(), "us"), Wait)
    # Not even a known home moves while its region is not lost.
    assert isinstance(decide(order, {"us": None}, HomeRecord("eu", 1), set(), "us"), Wait)


def test_a_room_homed_in_a_lost_region_is_rehomed_with_the_next_term() -> None:
    # Arbitered by the lost region: the stand-in arbiter (us) takes the write.
    _room, order = _room_arbitered_by("eu")
    assert decide(order, {"us": None}, HomeRecord("eu", 1), {"eu"}, "us") == Write(
        "us", HomeRecord("us", 2)
    )
    # Not known here and the arbiter lost: a claim that outranks any first claim there.
    assert decide(order, {"us": None}, None, {"eu"}, "us") == Write("us", HomeRecord("us", 2))
    # Arbitered by the living region: written there.
    _room, order = _room_arbitered_by("us")
    assert decide(order, {"us": HomeRecord("eu", 4)}, None, {"eu"}, "us") == Write(
        "us", HomeRecord("us", 5)
    )
    # Another edge re-homed it first: its record stands (no copy in a lost region).
    assert decide(order, {"us": HomeRecord("us", 5)}, HomeRecord("eu", 4), {"eu"}, "us") == (
        HomeRecord("us", 5)
    )


def test_a_region_that_comes_back_does_not_take_its_rooms_back() -> None:
    # eu is back, with its first record (or an empty store): the newer term stands, and
    # the arbiter that decides is given it.
    _room, order = _room_arbitered_by("eu")
    read = {"eu": HomeRecord("eu", 1), "us": HomeRecord("us", 2)}
    assert decide(order, read, None, set(), "eu") == Write("eu", HomeRecord("us", 2))
    assert decide(order, {"eu": None, "us": HomeRecord("us", 2)}, None, set(), "eu") == Write(
        "eu", HomeRecord("us", 2)
    )
    repaired = {"eu": HomeRecord("us", 2), "us": HomeRecord("us", 2)}
    assert decide(order, repaired, None, set(), "eu") == HomeRecord("us", 2)
    # A first claim is found in its copy when the arbiter's store was lost...
    assert decide(order, {"eu": None, "us": HomeRecord("us", 1)}, None, set(), "eu") == Write(
        "eu", HomeRecord("us", 1)
    )
    # ... and what an edge knew is written back when there is no copy either.
    assert decide(order, {"eu": None, "us": None}, HomeRecord("us", 1), set(), "eu") == Write(
        "eu", HomeRecord("us", 1)
    )
    # A tie on the term (both sides of a partition re-homed): the arbiter's record wins.
    tie = {"eu": HomeRecord("eu", 2), "us": HomeRecord("us", 2)}
    assert decide(order, tie, None, set(), "us") == Write("us", HomeRecord("eu", 2))


def test_a_region_is_lost_only_after_lost_after_seconds_of_silence() -> None:
    liveness = RegionLiveness(5.0)
    assert liveness.observed("eu", False, 100.0) is None
    assert liveness.observed("eu", False, 104.9) is None
    assert liveness.observed("eu", True, 105.0) is None  # it answered: the count restarts
    assert liveness.observed("eu", False, 106.0) is None
    assert liveness.observed("eu", False, 110.9) is None
    assert liveness.observed("eu", False, 111.0) == "lost"
    assert liveness.lost == {"eu"}
    assert liveness.observed("eu", False, 120.0) is None
    assert liveness.observed("eu", True, 121.0) == "back"
    assert liveness.lost == set()


def test_a_tokens_home_claim_names_the_first_record_but_not_a_rehoming() -> None:
    _room, order = _room_arbitered_by("eu")
    # The first member's token says us: the first record names us, wherever its edge is.
    assert decide(order, {"eu": None, "us": None}, None, set(), "eu", "us") == Write(
        "eu", HomeRecord("us", 1)
    )
    # A claim for a lost region is not followed: the edge's own region.
    assert decide(order, {"us": None}, None, {"eu"}, "us", "eu") == Write("us", HomeRecord("us", 2))
    # A room that has a record keeps it: a later member's claim changes nothing.
    claimed = {"eu": HomeRecord("eu", 1), "us": HomeRecord("eu", 1)}
    assert decide(order, claimed, None, set(), "us", "us") == HomeRecord("eu", 1)
    # A re-homing names the edge's region, not a claim.
    lost_home = {"us": HomeRecord("eu", 1)}
    assert decide(order, lost_home, None, {"eu"}, "us", "eu") == Write("us", HomeRecord("us", 2))
