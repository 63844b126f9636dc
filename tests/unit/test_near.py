"""Near things first, the pure parts: ICE order, the region directory, the edge plan."""

from __future__ import annotations

import json
from http import HTTPStatus

import pytest

from signalpost.auth import ResumeTokens, ice_servers
from signalpost.cluster import region_settings
from signalpost.config import Settings
from signalpost.discovery import Registration
from signalpost.edge_plan import EdgePlan, probe_url, rank_regions, regions_of, summarize
from signalpost.near import (
    MAX_EDGES_PER_REGION,
    META_LIMIT,
    RegionDirectory,
    edge_entries_of,
    edge_meta,
    fit_urls,
)


def _consul_entry(member: str, url: str, **meta: str) -> dict[str, object]:
    return {"Service": {"ID": member, "Meta": {"endpoint": url, **meta}}}


def _directory(**kwargs: object) -> RegionDirectory:
    return RegionDirectory(
        "eu",
        ["us", "eu", "ap"],
        own_url="ws://eu-1/v1/signal",
        stun_urls=["stun:eu"],
        turn_urls=["turn:eu"],
        **kwargs,  # type: ignore[arg-type]
    )


def _us_edges() -> dict[str, str]:
    return edge_entries_of(
        [
            _consul_entry("us-2", "ws://us-2/v1/signal", stun_urls="stun:us", turn_urls="turn:us"),
            _consul_entry("us-1", "ws://us-1/v1/signal", turn_urls="turn:us,turns:us"),
        ]
    )


def test_ice_servers_come_local_region_first_then_the_others_in_regions_order() -> None:
    directory = _directory()
    directory.update("us", _us_edges())
    assert [(r.region, r.stun, r.turn) for r in directory.ice_regions()] == [
        ("eu", ("stun:eu",), ("turn:eu",)),
        ("us", ("stun:us",), ("turn:us", "turns:us")),
        ("ap", (), ()),  # no edge of ap known yet: nothing to offer from there
    ]
    settings = Settings(turn_secret="s3cret")
    regions = [(r.stun, r.turn) for r in directory.ice_regions()]
    servers = ice_servers(settings, "alice", 1000.0, regions)
    assert [s["urls"] for s in servers] == [
        ["stun:eu"],
        ["turn:eu"],
        ["stun:us"],
        ["turn:us", "turns:us"],
    ]
    # One credential for every region's TURN: every coturn shares the secret.
    assert servers[1]["username"] == servers[3]["username"] == "4600:alice"
    assert servers[1]["credential"] == servers[3]["credential"]


def test_without_a_turn_secret_no_region_hands_out_turn() -> None:
    servers = ice_servers(Settings(), "alice", 0.0, [(["stun:eu"], ["turn:eu"]), ([], ["turn:us"])])
    assert servers == [{"urls": ["stun:eu"]}]


def test_with_fewer_than_two_regions_only_the_own_region_is_followed() -> None:
    directory = RegionDirectory("eu", ["eu"], stun_urls=["stun:eu"])
    assert directory.regions == ["eu"]
    directory.update("us", _us_edges())  # not a region it follows: ignored
    assert [r.region for r in directory.ice_regions()] == ["eu"]
    assert RegionDirectory("", []).regions == [""]


def test_edges_answer_lists_each_regions_edges_own_region_first() -> None:
    directory = _directory()
    directory.update("us", _us_edges())
    directory.update("eu", edge_entries_of([_consul_entry("eu-2", "ws://eu-2/v1/signal")]))
    status, body = directory.answer("", 0.0)
    assert status == HTTPStatus.OK
    assert json.loads(body) == {
        "regions": [
            {"region": "eu", "edges": ["ws://eu-1/v1/signal", "ws://eu-2/v1/signal"]},
            {"region": "us", "edges": ["ws://us-1/v1/signal", "ws://us-2/v1/signal"]},
            {"region": "ap", "edges": []},
        ]
    }
    status, body = directory.answer("region=us", 0.0)
    assert (status, json.loads(body)["regions"]) == (
        HTTPStatus.OK,
        [{"region": "us", "edges": ["ws://us-1/v1/signal", "ws://us-2/v1/signal"]}],
    )


def test_an_unknown_region_is_a_404_with_an_error_body_and_changes_nothing() -> None:
    directory = _directory()
    before = directory.answer("", 0.0)
    status, body = directory.answer("region=mars", 0.0)
    assert status == HTTPStatus.NOT_FOUND
    error = json.loads(body)
    assert error["type"] == "error" and error["code"] == "bad_request"
    assert "mars" in error["message"] and "'eu'" in error["message"]
    assert directory.answer("region=" + "x" * 300, 0.0)[0] == HTTPStatus.BAD_REQUEST
    assert directory.answer("", 0.0) == before


def test_edges_answers_are_rate_limited_and_bounded() -> None:
    directory = RegionDirectory("eu", [], own_url="ws://self", rate=10.0, burst=3)
    assert [directory.answer("", 0.0)[0] for _ in range(4)] == [HTTPStatus.OK] * 3 + [
        HTTPStatus.TOO_MANY_REQUESTS
    ]
    _status, body = directory.answer("", 0.0)
    assert json.loads(body)["code"] == "rate_limited"
    assert directory.answer("", 0.1)[0] == HTTPStatus.OK  # refilled: 10 a second
    many = edge_entries_of([_consul_entry(f"e{i}", f"ws://e{i:03}") for i in range(200)])
    directory.update("eu", many)
    assert len(directory.edges("eu")) == MAX_EDGES_PER_REGION


def test_meta_values_fit_consuls_limit_and_round_trip() -> None:
    urls = [f"turn:turn-{i}.example.org:3478?transport=udp" for i in range(40)]
    joined = fit_urls(urls)
    assert len(joined) <= META_LIMIT and joined.split(",") == urls[: len(joined.split(","))]
    assert fit_urls(["turn:a,b", "turn:c"]) == "turn:c"
    meta = edge_meta(["stun:eu"], ["turn:eu"])
    registration = Registration("edge", "e1", "ws://e1", "http://e1/healthz", "eu", extra_meta=meta)
    payload_meta = registration.payload()["meta"]
    assert payload_meta == {
        "stun_urls": "stun:eu",
        "turn_urls": "turn:eu",
        "endpoint": "ws://e1",
        "region": "eu",
    }
    # A bad entry in Consul's answer is skipped, not fatal.
    assert edge_entries_of([{"Service": {"ID": "x", "Meta": {}}}, {}]) == {}


def test_the_plan_walks_a_regions_edges_then_falls_back_to_the_next_region() -> None:
    plan = EdgePlan(regions_of({"eu": ["eu-1", "eu-2"], "us": ["us-1"]}))
    assert (plan.region, plan.url) == ("eu", "eu-1")
    plan.failed()  # eu-1 dropped
    assert plan.url == "eu-2"
    plan.failed()  # eu-2 too: every eu edge failed in a row
    assert (plan.region, plan.url) == ("us", "us-1")
    plan.failed()
    assert plan.url == "eu-1"  # around again
    plan.succeeded()
    plan.failed()  # one drop after a welcome: the region's next edge, not another region
    assert plan.url == "eu-2"
    plan.succeeded()
    plan.failed()
    assert (plan.region, plan.url) == ("eu", "eu-1")


def test_a_plain_list_is_one_region_tried_round_robin_as_before() -> None:
    plan = EdgePlan(regions_of(["a", "b", "c"]))
    seen = [plan.url]
    for _ in range(4):
        plan.failed()
        seen.append(plan.url)
    assert seen == ["a", "b", "c", "a", "b"]
    assert EdgePlan(regions_of("ws://x")).urls == ["ws://x"]


@pytest.mark.parametrize("bad", [[], {}, {"eu": []}, {"eu": "ws://x"}, [""]])
def test_no_urls_is_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        regions_of(bad)  # type: ignore[arg-type]


def test_regions_rank_by_round_trip_unreachable_last_in_given_order() -> None:
    order = ["us", "eu", "ap", "sa"]
    rtts = {"us": 0.09, "eu": 0.01, "ap": None}
    assert rank_regions(order, rtts) == ["eu", "us", "ap", "sa"]
    assert summarize([0.3, None, 0.1, 0.2]) == 0.2
    assert summarize([None, None]) is None
    plan = EdgePlan(regions_of({"us": ["u"], "eu": ["e"]}))
    plan.prefer(rank_regions(["us", "eu"], rtts))
    assert (plan.region, plan.url, plan.urls) == ("eu", "e", ["e", "u"])
    assert probe_url("wss://edge.example:8443/v1/signal") == "https://edge.example:8443/healthz"
    assert probe_url("ws://127.0.0.1:9/v1/signal") == "http://127.0.0.1:9/healthz"


def test_resume_tokens_name_the_region_that_issued_them() -> None:
    tokens = ResumeTokens("secret")
    assert tokens.region_of(tokens.issue("s-1", "alice", 0.0, region="us")) == "us"
    assert tokens.region_of(tokens.issue("s-1", "alice", 0.0)) == ""
    assert tokens.region_of("not a token") == ""


def test_a_local_cluster_gives_each_region_its_own_settings() -> None:
    env = {
        "SIGNALPOST_TURN_URLS__EU": "turn:eu",
        "SIGNALPOST_TURN_URLS__US_EAST": "turn:us",
        "SIGNALPOST_TURN_SECRET": "shared",
        "OTHER__EU": "x",
    }
    assert region_settings(env, "eu") == {"SIGNALPOST_TURN_URLS": "turn:eu"}
    assert region_settings(env, "us-east") == {"SIGNALPOST_TURN_URLS": "turn:us"}
    assert region_settings(env, "") == {}
