"""A room owner's webhook events (sans-I/O): what ``RoomTable`` releases, as ``HookRecord``s.

The table calls ``released`` for every event it releases (visible to the room's members:
replicated to the runner-up first when there is one) and ``ended`` when a served room's
last member goes; ``taken`` when it starts serving a room replicated to it (a takeover).
Of the events only ``peer-joined`` and ``peer-left`` make webhook events (a signal costs a
prefix check). A ``peer-joined`` for nobody (its recipients are empty: the joiner was
alone) also starts the room. Keys: ``room:<name>:<epoch>:<offset>`` (``:started`` and
``:ended`` for the room's own events), so an event told again after a takeover (the
successor has the room's history) has the key it had.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from signalpost.webhooks import Outbound, Webhooks, make_event, room_stream

if TYPE_CHECKING:
    from broker.rooms import Member, Room, RoomEvent

_PEER_EVENT = b'{"type":"peer-'


def _key(room: Room, offset: int, suffix: str = "") -> str:
    return f"room:{room.name}:{room.epoch}:{offset}{suffix}"


class RoomHooks:
    """Turns a room table's released events into webhook events."""

    def __init__(self, hooks: Webhooks, wall_clock: float = 0.0) -> None:
        self.hooks = hooks
        #: Wall-clock seconds minus the table's clock (``created_at`` in the bodies).
        self.offset = wall_clock
        #: Keys of the events the room's end made during the request being applied (the
        #: table holds that request's answer behind their copy: ``hold``).
        self.ending: list[str] = []

    def released(self, room: Room, event: RoomEvent, now: float) -> None:
        payload = event.payload
        if not payload.startswith(_PEER_EVENT):
            return
        self._event(room, event, now)

    def _event(self, room: Room, event: RoomEvent, now: float) -> None:
        frame = json.loads(event.payload)
        stream = room_stream(room.name)
        at = now + self.offset
        base = {"room": room.name, "epoch": room.epoch, "offset": event.offset}
        if frame["type"] == "peer-joined":
            if not event.recipients:
                self.hooks.add(
                    make_event(
                        stream, _key(room, event.offset, ":started"), "room.started", at, base
                    ),
                    now,
                )
            self.hooks.add(
                make_event(
                    stream,
                    _key(room, event.offset),
                    "peer.joined",
                    at,
                    {**base, "peer": frame["peer"]},
                ),
                now,
            )
        else:
            fields = {**base, "peer": frame["peer"], "reason": frame["reason"]}
            self.hooks.add(
                make_event(stream, _key(room, event.offset), "peer.left", at, fields), now
            )

    def ended(self, room: Room, member: Member, reason: str, now: float) -> None:
        """The last member left a served room (nothing recorded: the room is gone)."""
        stream = room_stream(room.name)
        # Nothing is recorded for it: its key is the room's last offset's, with a suffix
        # (a successor that never heard of the end may give offset + 1 to another event).
        offset = room.offset
        at = now + self.offset
        base = {"room": room.name, "epoch": room.epoch, "offset": offset}
        peer = json.loads(member.peer)
        if self.hooks.replica_for(stream) is not None:
            self.ending = [_key(room, offset, ":left"), _key(room, offset, ":ended")]
        self.hooks.add(
            make_event(
                stream,
                _key(room, offset, ":left"),
                "peer.left",
                at,
                {**base, "peer": peer, "reason": reason},
            ),
            now,
        )
        self.hooks.add(
            make_event(stream, _key(room, offset, ":ended"), "room.ended", at, base), now
        )

    def hold(self, outbound: Outbound) -> list[Outbound]:
        """``outbound`` (the answer to the leave that ended a room) goes out once the
        runner-up has the end's events: now if it has (what to send now)."""
        keys, self.ending = self.ending, []
        return self.hooks.hold(keys, outbound)

    def taken(self, room: Room, now: float, derive: bool = True) -> None:
        """This broker serves ``room`` now, from its replica or a handoff: deliver what the
        previous owner may not have (its shadow's events, then the history's after the
        newest one known here; with ``derive`` False only if one is known: a handoff from
        a live owner, which goes on delivering what it queued)."""
        stream = room_stream(room.name)
        self.hooks.promote(stream, now)
        known = self.hooks.high_water(stream)
        if known is None and not derive:
            return
        floor = 0
        if known is not None:
            parts = known.split(":")
            # room:<name>:<epoch>:<offset>[:suffix]; a name may hold ":" (count from the end)
            has_suffix = not parts[-1].isdigit()
            epoch = parts[-3] if has_suffix else parts[-2]
            offset = parts[-2] if has_suffix else parts[-1]
            if epoch == room.epoch and offset.isdigit():
                floor = int(offset)
        for event in room.history:
            if floor < event.offset <= room.released and event.payload.startswith(_PEER_EVENT):
                self._event(room, event, now)
