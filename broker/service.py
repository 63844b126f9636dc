"""The broker process: a ``RoomTable`` behind a ZeroMQ ROUTER."""

from __future__ import annotations

import secrets

from broker.rooms import RoomTable
from signalpost.config import Settings
from signalpost.lifecycle import until_stopped
from signalpost.node import OwnerNode


def room_table(settings: Settings) -> RoomTable:
    """A RoomTable configured from ``settings``."""
    return RoomTable(
        capacity=settings.room_capacity,
        resume_window=settings.resume_window,
        history_max_events=settings.history_max_events,
        history_max_age=settings.history_max_age,
        new_epoch=lambda: secrets.token_urlsafe(6),
    )


async def run_broker(settings: Settings) -> None:
    """Run one broker until SIGTERM/SIGINT."""
    node = OwnerNode(settings, "broker", room_table(settings), settings.broker_bind)
    await node.run(until_stopped)
