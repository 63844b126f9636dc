"""Rendezvous (highest random weight) placement of rooms on brokers.

Every edge computes the same owner from the same broker set with no coordination; when a
broker joins or leaves, only the rooms it gains or loses move. ``ranking`` gives the full
order, so the runner-up is the natural replica and successor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence


def _weight(node: str, key: str) -> int:
    digest = hashlib.blake2b(f"{node}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranking(key: str, nodes: Iterable[str]) -> list[str]:
    """Nodes ordered by preference for ``key`` (owner first)."""
    return sorted(nodes, key=lambda node: _weight(node, key), reverse=True)


def owner(key: str, nodes: Sequence[str]) -> str:
    """The node that owns ``key``; ``nodes`` must not be empty."""
    if len(nodes) == 1:
        return nodes[0]
    return max(nodes, key=lambda node: _weight(node, key))
