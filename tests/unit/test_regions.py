"""Room homes: rules, the arbiter of a room, and the settings that carry them."""

from __future__ import annotations

import pytest

from signalpost.config import load_settings
from signalpost.errors import ConfigError
from signalpost.homes import arbiter_of, home_key
from signalpost.regions import parse_home_rules, pinned_home


def test_the_first_matching_rule_pins_a_room() -> None:
    rules = parse_home_rules(["eu-*=eu", "*-lisbon=eu", "us-*=us", "shared=us"])
    assert pinned_home("eu-call", rules) == "eu"
    assert pinned_home("us-call", rules) == "us"
    assert pinned_home("us-lisbon", rules) == "eu"  # "*-lisbon" comes before "us-*"
    assert pinned_home("x-lisbon", rules) == "eu"
    assert pinned_home("shared", rules) == "us"
    assert pinned_home("other", rules) is None
    assert pinned_home("EU-call", rules) is None  # case matters, on every platform


@pytest.mark.parametrize("rule", ["eu-*", "=eu", "eu-*=", "a=b c", "a=b/c"])
def test_a_bad_rule_is_refused_naming_it(rule: str) -> None:
    with pytest.raises(ValueError, match="room_homes rule"):
        parse_home_rules([rule])


def test_every_room_has_one_arbiter_whatever_the_order_of_the_regions() -> None:
    regions = ["eu", "us", "ap"]
    arbiters = {arbiter_of(f"room-{n}", regions) for n in range(200)}
    assert arbiters == set(regions)  # the rooms are spread over all of them
    for n in range(50):
        room = f"room-{n}"
        assert arbiter_of(room, regions) == arbiter_of(room, list(reversed(regions)))


def test_a_home_key_is_one_key_whatever_the_room_name_holds() -> None:
    assert home_key("a/b c?d") == "signalpost/homes/a%2Fb%20c%3Fd"
    assert "/" not in home_key("../../x").removeprefix("signalpost/homes/")


def test_settings_refuse_a_bad_rule_and_a_region_missing_from_the_list() -> None:
    settings = load_settings(
        environ={
            "SIGNALPOST_REGION": "eu",
            "SIGNALPOST_REGIONS": "eu,us",
            "SIGNALPOST_ROOM_HOMES": "eu-*=eu",
        }
    )
    assert settings.regions == ["eu", "us"] and settings.room_homes == ["eu-*=eu"]
    with pytest.raises(ConfigError, match="room_homes rule"):
        load_settings(environ={"SIGNALPOST_ROOM_HOMES": "eu-*"})
    with pytest.raises(ConfigError, match="not one of regions"):
        load_settings(environ={"SIGNALPOST_REGION": "ap", "SIGNALPOST_REGIONS": "eu,us"})
