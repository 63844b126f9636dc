"""The edge process: an ``EdgeServer`` on a ``ZmqBackplane``; SIGTERM drains clients."""

from __future__ import annotations

from edge.server import EdgeServer
from edge.zmq_backplane import ZmqBackplane
from signalpost.config import Settings
from signalpost.lifecycle import until_stopped


async def run_edge(settings: Settings) -> None:
    """Run one edge until SIGTERM/SIGINT, then close clients with 1001 and exit."""
    edge = EdgeServer(settings, ZmqBackplane(settings))
    async with edge:
        print(f"signalpost edge {edge.edge_id} ready on ws://{settings.host}:{edge.port}/v1/signal",
              flush=True)
        await until_stopped()
