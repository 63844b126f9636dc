"""Which region is a room's home: the rules every edge applies alike (sans-I/O).

A room's home is the region whose brokers own it. The config's ``room_homes`` rules
(``pattern=region``, shell-style patterns matched against the room name, first match
wins) pin homes; a room no rule names is homed in the region of its first member,
agreed in Consul (``signalpost.homes``), or, with fewer than two ``regions``, in the
edge's own region. Every node of every region must carry the same rules and region
list: they are what makes all edges send a room's requests to one region.
"""

from __future__ import annotations

from fnmatch import fnmatchcase


def parse_home_rules(rules: list[str]) -> list[tuple[str, str]]:
    """``["eu-*=eu", ...]`` as ``[("eu-*", "eu"), ...]``; ValueError naming a bad rule."""
    parsed = []
    for rule in rules:
        pattern, equals, region = rule.rpartition("=")
        if not equals or not pattern.strip() or not region.strip():
            raise ValueError(f"room_homes rule {rule!r}: want pattern=region (e.g. eu-*=eu)")
        if not region.strip().replace("-", "").isalnum():
            raise ValueError(f"room_homes rule {rule!r}: region names use letters, digits, '-'")
        parsed.append((pattern.strip(), region.strip()))
    return parsed


def pinned_home(room: str, rules: list[tuple[str, str]]) -> str | None:
    """The region the first matching rule pins ``room`` to, or None."""
    for pattern, region in rules:
        if fnmatchcase(room, pattern):
            return region
    return None
