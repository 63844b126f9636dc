"""The presence process: a ``PresenceTable`` behind a ZeroMQ ROUTER."""

from __future__ import annotations

from presence.table import PresenceTable
from signalpost.config import Settings
from signalpost.lifecycle import until_stopped
from signalpost.node import OwnerNode


async def run_presence(settings: Settings) -> None:
    """Run the presence service until SIGTERM/SIGINT."""
    table = PresenceTable(resume_window=settings.resume_window)
    node = OwnerNode(settings, "presence", table, settings.presence_bind)
    await node.run(until_stopped)
