"""ClientGuard: the per-connection rate limit and abuse counter, with time passed in."""

from __future__ import annotations

import pytest

from edge.guard import ClientGuard, Verdict, origin_admitted
from signalpost.errors import CloseCode


def make_guard(
    *,
    rate: float = 10.0,
    burst: int = 5,
    rate_strikes: int = 3,
    bad_frame_strikes: int = 4,
    window: float = 60.0,
) -> ClientGuard:
    return ClientGuard(rate, burst, rate_strikes, bad_frame_strikes, window)


# ------------------------------------------------------------------------------ rate limit


def test_a_burst_is_served_then_frames_are_refused() -> None:
    guard = make_guard(burst=5, rate_strikes=100)
    assert [guard.admit(0.0) for _ in range(5)] == [Verdict.SERVE] * 5
    assert guard.admit(0.0) is Verdict.REFUSE
    assert guard.close_code is None


def test_tokens_refill_at_the_configured_rate() -> None:
    guard = make_guard(rate=10.0, burst=5, rate_strikes=100)
    for _ in range(5):
        guard.admit(0.0)
    assert guard.admit(0.05) is Verdict.REFUSE  # half a token
    assert guard.admit(0.1) is Verdict.SERVE  # one token after 0.1 s
    assert guard.admit(0.1) is Verdict.REFUSE
    # 0.3 s more: three tokens.
    assert [guard.admit(0.4) for _ in range(4)] == [Verdict.SERVE] * 3 + [Verdict.REFUSE]


def test_refill_never_exceeds_the_burst() -> None:
    guard = make_guard(rate=10.0, burst=5, rate_strikes=100)
    guard.admit(0.0)
    verdicts = [guard.admit(3600.0) for _ in range(6)]
    assert verdicts == [Verdict.SERVE] * 5 + [Verdict.REFUSE]


def test_a_steady_rate_within_the_limit_is_always_served() -> None:
    guard = make_guard(rate=10.0, burst=2, rate_strikes=1)
    assert all(guard.admit(i * 0.1) is Verdict.SERVE for i in range(1000))


def test_a_clock_going_backwards_does_not_mint_tokens() -> None:
    guard = make_guard(rate=10.0, burst=1, rate_strikes=100)
    assert guard.admit(10.0) is Verdict.SERVE
    assert guard.admit(5.0) is Verdict.REFUSE


@pytest.mark.parametrize("strikes", [1, 3, 20])
def test_rate_strikes_refusals_in_a_row_close_with_4429(strikes: int) -> None:
    guard = make_guard(burst=1, rate_strikes=strikes)
    assert guard.admit(0.0) is Verdict.SERVE
    # ``rate_strikes`` rate_limited errors in a row: the last one also closes.
    verdicts = [guard.admit(0.0) for _ in range(strikes)]
    assert verdicts == [Verdict.REFUSE] * (strikes - 1) + [Verdict.CLOSE]
    assert guard.close_code is CloseCode.RATE_LIMITED
    assert guard.close_code == 4429


def test_a_served_frame_resets_the_refusal_streak() -> None:
    guard = make_guard(rate=10.0, burst=1, rate_strikes=3)
    guard.admit(0.0)
    assert [guard.admit(0.0), guard.admit(0.0)] == [Verdict.REFUSE] * 2
    assert guard.admit(0.1) is Verdict.SERVE  # a token came back
    assert [guard.admit(0.1), guard.admit(0.1)] == [Verdict.REFUSE] * 2
    assert guard.close_code is None
    assert guard.admit(0.1) is Verdict.CLOSE


# ------------------------------------------------------------------------------ bad frames


def test_bad_frames_close_with_4400_after_the_strikes_within_the_window() -> None:
    guard = make_guard(bad_frame_strikes=4, window=60.0)
    verdicts = [guard.bad_frame(t) for t in (0.0, 10.0, 20.0, 30.0)]
    assert verdicts == [Verdict.REFUSE] * 3 + [Verdict.CLOSE]
    assert guard.close_code is CloseCode.ABUSE
    assert guard.close_code == 4400


def test_bad_frames_spread_beyond_the_window_do_not_close() -> None:
    guard = make_guard(bad_frame_strikes=4, window=60.0)
    # Three within any minute at most: never four.
    verdicts = [guard.bad_frame(t * 21.0) for t in range(50)]
    assert set(verdicts) == {Verdict.REFUSE}
    assert guard.close_code is None


def test_old_bad_frames_age_out_of_the_window() -> None:
    guard = make_guard(bad_frame_strikes=3, window=10.0)
    guard.bad_frame(0.0)
    guard.bad_frame(1.0)
    assert guard.bad_frame(10.5) is Verdict.REFUSE  # the one at t=0 has aged out
    assert guard.bad_frame(10.9) is Verdict.CLOSE  # 1.0, 10.5, 10.9


def test_bad_frames_and_rate_refusals_are_counted_apart() -> None:
    guard = make_guard(burst=100, rate_strikes=2, bad_frame_strikes=2)
    assert guard.bad_frame(0.0) is Verdict.REFUSE
    assert guard.admit(0.0) is Verdict.SERVE
    assert guard.close_code is None
    assert guard.bad_frame(0.0) is Verdict.CLOSE
    assert guard.close_code is CloseCode.ABUSE


@pytest.mark.parametrize("strikes", [1, 2, 10])
def test_bad_frame_strikes_is_the_number_of_errors_before_the_close(strikes: int) -> None:
    guard = make_guard(bad_frame_strikes=strikes)
    verdicts = [guard.bad_frame(0.0) for _ in range(strikes)]
    assert verdicts == [Verdict.REFUSE] * (strikes - 1) + [Verdict.CLOSE]


@pytest.mark.parametrize(
    ("origin", "allowed", "allow_missing", "admitted"),
    [
        ("https://a.example", [], False, True),  # no list: any origin
        (None, [], False, True),
        ("https://a.example", ["https://a.example"], False, True),
        ("https://evil.example", ["https://a.example"], True, False),
        (None, ["https://a.example"], True, True),  # no header: not a browser page
        (None, ["https://a.example"], False, False),
        ("", ["https://a.example"], True, False),  # an empty header is a header
    ],
)
def test_origin_admitted(
    origin: str | None, allowed: list[str], allow_missing: bool, admitted: bool
) -> None:
    assert origin_admitted(origin, allowed, allow_missing) is admitted
