"""The discovery core: how Consul's answers and failures become a tier's membership."""

from __future__ import annotations

import pytest

from signalpost.discovery import Membership, Registration, consul_client, members_of

A = {"broker-1": "tcp://10.0.0.1:5555"}
AB = {**A, "broker-2": "tcp://10.0.0.2:5555"}


def membership() -> Membership:
    return Membership(min_interval=0.2, max_backoff=5.0, removal_grace=5.0, wait=3.0)


def test_new_members_are_taken_at_once() -> None:
    m = membership()
    assert m.answered(10, A, now=0.0) == A
    assert m.answered(11, AB, now=0.1) == AB
    assert m.answered(12, AB, now=0.2) is None  # unchanged: no callback
    assert m.index == 12


def test_a_missing_member_is_dropped_only_after_the_grace() -> None:
    m = membership()
    m.answered(10, AB, now=0.0)
    assert m.answered(11, A, now=1.0) is None
    assert m.answered(12, A, now=5.9) is None
    assert m.answered(13, A, now=6.0) == A


def test_a_member_back_within_the_grace_is_never_dropped() -> None:
    m = membership()
    m.answered(10, AB, now=0.0)
    m.answered(11, A, now=1.0)
    m.answered(12, AB, now=2.0)  # re-registered (e.g. after a Consul restart)
    assert m.answered(13, A, now=6.5) is None  # missing again: a fresh grace
    assert m.answered(14, A, now=11.5) == A


def test_an_empty_answer_never_empties_the_membership() -> None:
    # A Consul agent that restarted knows nobody until the nodes re-register.
    m = membership()
    m.answered(10, AB, now=0.0)
    for t in range(1, 60):
        assert m.answered(1, {}, now=float(t)) is None
    assert m.members == AB


def test_failures_keep_the_membership_and_back_off() -> None:
    m = membership()
    m.answered(10, AB, now=0.0)
    m.query_started(0.0)
    delays = []
    for _ in range(8):
        m.failed()
        delay, _wait = m.next_query(0.0)
        delays.append(delay)
    assert delays == [0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0]
    assert m.members == AB
    m.answered(11, AB, now=10.0)
    assert m.errors == 0


def test_queries_are_rate_limited() -> None:
    m = membership()
    m.query_started(100.0)
    assert m.next_query(100.05)[0] == pytest.approx(0.15)
    assert m.next_query(100.5)[0] == 0.0


def test_the_wait_shrinks_to_apply_a_pending_removal_in_time() -> None:
    m = membership()
    m.answered(10, AB, now=0.0)
    assert m.next_query(0.0)[1] == 3.0
    m.answered(11, A, now=1.0)  # broker-2 due for removal at 6.0
    assert m.next_query(4.0)[1] == pytest.approx(2.0)
    assert m.next_query(5.95)[1] == 0.2  # never below the rate limit


def test_an_index_going_backwards_restarts_from_zero() -> None:
    m = membership()
    m.answered(500, AB, now=0.0)
    m.answered(3, AB, now=1.0)  # Consul restarted and lost its state
    assert m.index == 0
    m.answered(7, AB, now=2.0)
    assert m.index == 7


def test_members_of_reads_ids_and_endpoints_and_skips_junk() -> None:
    entries = [
        {"Service": {"ID": "broker-1", "Meta": {"endpoint": "tcp://10.0.0.1:5555"}}},
        {"Service": {"ID": "broker-2", "Meta": {}}},
        {"Service": {"ID": "broker-3", "Meta": {"endpoint": ""}}},
        {"Service": None},
        {},
    ]
    assert members_of(entries) == A


def test_a_registration_carries_an_http_check_and_the_endpoint() -> None:
    payload = Registration(
        "broker", "broker-1", "tcp://10.0.0.1:5555", "http://10.0.0.1:9000/healthz"
    ).payload()
    assert payload["name"] == "signalpost-broker" and payload["service_id"] == "broker-1"
    assert payload["meta"] == {"endpoint": "tcp://10.0.0.1:5555"}
    check = payload["check"]
    assert check["http"] == "http://10.0.0.1:9000/healthz"
    assert check["interval"] and check["DeregisterCriticalServiceAfter"]


def test_an_https_check_does_not_verify_the_certificate() -> None:
    # An edge with its own TLS: its certificate names the public host, not the address
    # Consul dials, and the check asks only whether it serves.
    def check(url: str) -> dict[str, object]:
        payload = Registration("edge", "edge-1", "wss://10.0.0.1:8443/v1/signal", url).payload()
        return dict(payload["check"])

    assert check("https://10.0.0.1:8443/healthz")["TLSSkipVerify"] is True
    assert "TLSSkipVerify" not in check("http://10.0.0.1:8080/healthz")


def test_the_consul_token_setting_wins_over_consul_http_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    assert consul_client("127.0.0.1:8500").token is None
    assert consul_client("127.0.0.1:8500", "from-setting").token == "from-setting"
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    assert consul_client("127.0.0.1:8500").token == "from-env"
    # (py-consul alone would let the variable override the token it is given.)
    assert consul_client("127.0.0.1:8500", "from-setting").token == "from-setting"
