"""ClientGuard: the sans-I/O limits one client connection is held to.

A token bucket (``rate_per_second`` refilled, ``rate_burst`` deep) decides whether a
frame is served or answered ``rate_limited``; consecutive refusals and recent malformed
frames are counted as strikes, and enough of either ends the connection (4429 / 4400).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Final

from signalpost.errors import CloseCode


class Verdict(Enum):
    """What to do with one frame."""

    SERVE = auto()
    REFUSE = auto()  # answer rate_limited, keep the connection
    CLOSE = auto()  # close with the guard's close_code


SERVE: Final = Verdict.SERVE
REFUSE: Final = Verdict.REFUSE
CLOSE: Final = Verdict.CLOSE


@dataclass(slots=True)
class ClientGuard:
    rate_per_second: float
    burst: int
    rate_strikes: int
    bad_frame_strikes: int
    bad_frame_window: float = 60.0
    tokens: float = field(init=False)
    refilled_at: float | None = field(default=None, init=False)
    refusals_in_a_row: int = field(default=0, init=False)
    bad_frames: list[float] = field(default_factory=list, init=False)
    close_code: CloseCode | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def admit(self, now: float) -> Verdict:
        """Take a token for one frame arriving at ``now``."""
        # Once per client frame: plain comparisons, no min/max calls, module-level verdicts
        # (an Enum member looked up on its class costs more than the arithmetic here).
        tokens = self.tokens
        refilled_at = self.refilled_at
        if refilled_at is not None and now > refilled_at:
            tokens += (now - refilled_at) * self.rate_per_second
            if tokens > self.burst:
                tokens = float(self.burst)
        self.refilled_at = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            self.refusals_in_a_row = 0
            return SERVE
        self.tokens = tokens
        self.refusals_in_a_row += 1
        if self.refusals_in_a_row >= self.rate_strikes:
            self.close_code = CloseCode.RATE_LIMITED
            return CLOSE
        return REFUSE

    def bad_frame(self, now: float) -> Verdict:
        """Count a malformed frame; CLOSE once too many fall within the window."""
        horizon = now - self.bad_frame_window
        self.bad_frames = [t for t in self.bad_frames if t > horizon]
        self.bad_frames.append(now)
        if len(self.bad_frames) >= self.bad_frame_strikes:
            self.close_code = CloseCode.ABUSE
            return CLOSE
        return REFUSE


def origin_admitted(origin: str | None, allowed: list[str], allow_missing: bool) -> bool:
    """Whether a WebSocket handshake with ``Origin: origin`` (None: no header) may open.

    An empty ``allowed`` admits every origin. A missing header is never a browser page
    (browsers send ``Origin`` on every WebSocket handshake); it is a native app or an SDK,
    admitted by ``allow_missing`` (see docs/security.md for why that is the default).
    """
    if not allowed:
        return True
    if origin is None:
        return allow_missing
    return origin in allowed
