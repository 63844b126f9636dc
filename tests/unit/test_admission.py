"""Admission: per-IP and per-user caps and the accept rate, with time passed in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.admission import (
    MAX_RETRY_MS,
    MIN_RETRY_MS,
    Admission,
    RefusalKind,
    exempt_addresses,
)
from signalpost.errors import ConfigError


def make(
    *,
    per_ip: int = 3,
    per_user: int = 2,
    rate: float = 10.0,
    burst: int = 10,
    share: float = 0.5,
    exempt: frozenset[str] = frozenset(),
    max_tracked: int = 1000,
) -> Admission:
    return Admission(
        max_per_ip=per_ip,
        max_per_user=per_user,
        rate=rate,
        burst=burst,
        resume_share=share,
        cap_retry_after=5.0,
        exempt=exempt,
        max_tracked=max_tracked,
    )


# ------------------------------------------------------------------------------ per IP


def test_the_ip_cap_refuses_the_one_over_then_drops_past_twice_it() -> None:
    admission = make(per_ip=3)
    assert [admission.connect("10.0.0.1") for _ in range(3)] == [None] * 3
    refusal = admission.connect("10.0.0.1")
    assert refusal is not None and refusal.kind is RefusalKind.IP_CAP and not refusal.drop
    assert refusal.reason == "retry_after_ms=5000 ip_cap"
    assert admission.connect("10.0.0.2") is None  # another address is not affected
    for _ in range(2):
        assert admission.connect("10.0.0.1") is not None  # refused ones are counted too
    dropped = admission.connect("10.0.0.1")
    assert dropped is not None and dropped.kind is RefusalKind.IP_DROPPED and dropped.drop
    assert admission.per_ip["10.0.0.1"] == 6  # a dropped connection is not counted


def test_closing_frees_the_slot_and_an_empty_address_is_forgotten() -> None:
    admission = make(per_ip=1)
    assert admission.connect("10.0.0.1") is None
    assert admission.connect("10.0.0.1") is not None
    admission.disconnect("10.0.0.1")
    admission.disconnect("10.0.0.1")
    assert admission.per_ip == {}
    admission.disconnect("10.0.0.1")  # once more: nothing to give back, nothing changes
    assert admission.per_ip == {}
    assert admission.connect("10.0.0.1") is None


def test_exempt_addresses_are_not_counted() -> None:
    admission = make(per_ip=1, exempt=frozenset({"127.0.0.1"}))
    assert all(admission.connect("127.0.0.1") is None for _ in range(10))
    assert admission.per_ip == {}


def test_a_full_ip_table_drops_new_addresses_only() -> None:
    admission = make(per_ip=5, max_tracked=2)
    assert admission.connect("a") is None and admission.connect("b") is None
    refusal = admission.connect("c")
    assert refusal is not None and refusal.kind is RefusalKind.IP_TABLE_FULL and refusal.drop
    assert admission.connect("a") is None  # a known address still counts up
    assert set(admission.per_ip) == {"a", "b"}


# ------------------------------------------------------------------------------ per user


def test_the_user_cap_refuses_the_one_over_unless_it_replaces_a_session_here() -> None:
    admission = make(per_user=2)
    assert admission.open_session("alice") is None
    assert admission.open_session("alice") is None
    refusal = admission.open_session("alice")
    assert refusal is not None and refusal.kind is RefusalKind.USER_CAP
    assert admission.open_session("bob") is None
    assert admission.open_session("alice", replacing=True) is None
    for _ in range(3):
        admission.close_session("alice")
    assert admission.per_user == {"bob": 1}


def test_a_full_user_table_refuses_new_users() -> None:
    admission = make(max_tracked=1)
    assert admission.open_session("alice") is None
    refusal = admission.open_session("bob")
    assert refusal is not None and refusal.kind is RefusalKind.USER_TABLE_FULL
    assert admission.open_session("alice") is None


# ------------------------------------------------------------------------------ accept rate


def test_fresh_hellos_leave_the_reserve_to_resumes() -> None:
    admission = make(rate=1.0, burst=10, share=0.5)  # reserve: 5 tokens
    fresh = [admission.hello(resume=False, now=0.0) for _ in range(8)]
    assert fresh[:5] == [None] * 5
    assert all(r is not None and r.kind is RefusalKind.SHED for r in fresh[5:])
    resumes = [admission.hello(resume=True, now=0.0) for _ in range(6)]
    assert resumes[:5] == [None] * 5
    last = resumes[5]
    assert last is not None and last.kind is RefusalKind.SHED_RESUME


def test_the_bucket_refills_at_the_rate() -> None:
    admission = make(rate=2.0, burst=2, share=0.0)
    assert admission.hello(resume=False, now=0.0) is None
    assert admission.hello(resume=False, now=0.0) is None
    assert admission.hello(resume=False, now=0.0) is not None
    assert admission.hello(resume=False, now=0.25) is not None  # half a token
    assert admission.hello(resume=False, now=0.5) is None  # a whole one


def test_a_full_bucket_admits_a_fresh_hello_even_with_the_whole_burst_reserved() -> None:
    admission = make(rate=1.0, burst=3, share=1.0)
    assert admission.hello(resume=False, now=0.0) is None
    assert admission.hello(resume=False, now=0.0) is not None


def test_the_retry_delay_grows_with_the_hellos_shed_and_is_bounded() -> None:
    admission = make(rate=10.0, burst=1, share=0.0)
    assert admission.hello(resume=False, now=0.0) is None
    delays = []
    for _ in range(50):
        refusal = admission.hello(resume=False, now=0.0)
        assert refusal is not None
        delays.append(refusal.retry_after_ms)
    assert delays == sorted(delays) and delays[-1] > delays[0]
    # the 50th shed one is told to wait for the 49 before it: about 5 s at 10/s
    assert 4_900 <= delays[-1] <= 5_200
    slow = make(rate=0.001, burst=1)
    slow.hello(resume=False, now=0.0)
    refusal = slow.hello(resume=False, now=0.0)
    assert refusal is not None and refusal.retry_after_ms == MAX_RETRY_MS


def test_time_going_back_adds_no_tokens() -> None:
    admission = make(rate=1.0, burst=1, share=0.0)
    assert admission.hello(resume=False, now=10.0) is None
    assert admission.hello(resume=False, now=5.0) is not None
    assert admission.hello(resume=False, now=10.5) is not None  # measured from 10.0
    assert admission.hello(resume=False, now=11.0) is None


hellos = st.lists(
    st.tuples(st.booleans(), st.floats(min_value=0.0, max_value=0.5)), min_size=1, max_size=300
)


@settings(max_examples=200, deadline=None)
@given(
    hellos,
    st.floats(min_value=0.5, max_value=100.0),
    st.integers(min_value=1, max_value=50),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_property_resumes_come_first_and_the_rate_holds(
    arrivals: list[tuple[bool, float]], rate: float, burst: int, share: float
) -> None:
    """Whatever the arrivals: admitted hellos never exceed burst + rate x elapsed; a
    resume is shed only when a fresh hello at that moment would be too; while the
    bucket is below the reserve no fresh hello is admitted; every retry delay is within
    bounds and says the kind."""
    admission = make(rate=rate, burst=burst, share=share)
    now = 0.0
    admitted = 0
    for resume, gap in arrivals:
        now += gap
        # (refilled_at may be 0.0, a time like any other: not "never")
        since = now if admission.refilled_at is None else admission.refilled_at
        tokens_before = admission.tokens + max(0.0, now - since) * rate
        tokens_before = min(tokens_before, float(burst))
        refusal = admission.hello(resume=resume, now=now)
        if refusal is None:
            admitted += 1
            if not resume:
                assert tokens_before >= 1.0 + admission.reserve - 1e-9
        else:
            assert MIN_RETRY_MS <= refusal.retry_after_ms <= MAX_RETRY_MS
            assert refusal.kind is (RefusalKind.SHED_RESUME if resume else RefusalKind.SHED)
            if resume:
                assert tokens_before < 1.0 + 1e-9
        assert admitted <= burst + rate * now + 1e-6
        assert 0.0 <= admission.tokens <= burst


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.booleans()), max_size=200))
def test_property_ip_counts_match_the_open_connections(ops: list[tuple[str, bool]]) -> None:
    """Counts are exactly the open (not dropped) connections; no key is kept at zero."""
    admission = make(per_ip=2)
    open_: dict[str, int] = {}
    for ip, opening in ops:
        if opening:
            refusal = admission.connect(ip)
            if refusal is None or not refusal.drop:
                open_[ip] = open_.get(ip, 0) + 1
            assert (refusal is None) == (open_[ip] <= 2) or (refusal is not None and refusal.drop)
        elif open_.get(ip):
            admission.disconnect(ip)
            open_[ip] -= 1
        assert admission.per_ip == {k: v for k, v in open_.items() if v}
        assert all(v <= 4 for v in admission.per_ip.values())


def test_exempt_addresses_are_checked_and_written_as_peers_are() -> None:
    assert exempt_addresses(["127.0.0.1", "::1", "::ffff:10.0.0.7", "0:0::1"]) == {
        "127.0.0.1",
        "::1",
        "10.0.0.7",
    }
    with pytest.raises(ConfigError, match="'localhost' is not an IP address"):
        exempt_addresses(["127.0.0.1", "localhost"])
    with pytest.raises(ConfigError, match=r"10\.0\.0\.0/8"):
        exempt_addresses(["10.0.0.0/8"])
