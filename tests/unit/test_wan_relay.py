"""The emulated WAN's delay line: order, delay, end of stream, bound."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from signalpost.errors import ConfigError
from signalpost.wan_relay import EOF, DelayLine, parse_delay, parse_pair


def test_a_chunk_is_released_only_after_the_delay() -> None:
    line = DelayLine(0.04)
    line.push(b"abc", now=1.0)
    assert line.take_due(1.039) == []
    assert line.next_due() == pytest.approx(1.04)
    assert line.take_due(1.04) == [b"abc"]
    assert line.next_due() is None and line.held_bytes == 0


def test_the_end_of_stream_is_delayed_like_data_and_ends_the_line() -> None:
    line = DelayLine(0.01)
    line.push(b"x", now=0.0)
    line.push(EOF, now=0.005)
    assert line.take_due(0.01) == [b"x"]
    assert line.take_due(0.015) == [EOF]
    with pytest.raises(ValueError):
        line.push(b"late", now=0.02)


def test_reading_stops_at_the_bound_and_resumes_at_half() -> None:
    line = DelayLine(0.0, max_held=100)
    line.push(b"a" * 60, now=0.0)
    assert not line.full
    line.push(b"b" * 40, now=0.0)
    assert line.full and not line.drained
    assert line.take_due(0.0) == [b"a" * 60, b"b" * 40]
    assert line.drained and not line.full


@given(
    st.lists(st.tuples(st.binary(min_size=1, max_size=50), st.floats(0, 0.05)), max_size=30),
    st.floats(0, 0.1),
)
def test_bytes_come_out_in_order_never_early(
    chunks: list[tuple[bytes, float]], delay: float
) -> None:
    line = DelayLine(delay)
    now, pushed_at, out = 0.0, [], []
    for data, gap in chunks:
        now += gap
        line.push(data, now)
        pushed_at.append(now)
        out += [(now, d) for d in line.take_due(now)]
    out += [(now + 1.0, d) for d in line.take_due(now + 1.0)]
    assert b"".join(d for _, d in out) == b"".join(d for d, _ in chunks)
    for (taken_at, _), sent_at in zip(out, pushed_at, strict=True):
        assert taken_at >= sent_at + delay
    assert line.held_bytes == 0


def test_delays_and_pairs_parse_or_say_why() -> None:
    assert parse_delay("40ms") == pytest.approx(0.04)
    assert parse_delay("0.5s") == 0.5
    assert parse_delay("0") == 0.0
    for bad in ("fast", "-1ms", "11s"):
        with pytest.raises(ConfigError):
            parse_delay(bad)
    assert parse_pair("127.0.0.1:7001=tcp://127.0.0.1:5555") == (
        ("127.0.0.1", 7001),
        ("127.0.0.1", 5555),
    )
    for bad in ("127.0.0.1:7001", "x=y", "a:1=b:port"):
        with pytest.raises(ConfigError):
            parse_pair(bad)
