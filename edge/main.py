"""The edge process: an ``EdgeServer`` on a ``ZmqBackplane``; SIGTERM drains clients,
SIGHUP reloads the TLS certificate (``edge.tls``)."""

from __future__ import annotations

from edge.server import EdgeServer
from edge.tls import reload_on_sighup
from edge.zmq_backplane import ZmqBackplane
from signalpost.config import Settings
from signalpost.discovery import Discovery, Registration
from signalpost.lifecycle import until_stopped
from signalpost.node_keys import edge_id_for


async def run_edge(settings: Settings) -> None:
    """Run one edge until SIGTERM/SIGINT, then close clients with 1001 and exit.

    With Consul, the edge registers once it serves (its ``/healthz`` is the check) and
    deregisters before draining, so nothing new is sent its way while clients leave.
    """
    backplane = ZmqBackplane(settings)
    # Its links speak under its key's name: that is its id (a different node_id is refused).
    edge = EdgeServer(settings, backplane, edge_id=edge_id_for(settings, backplane.keys))
    async with edge:
        base = f"{settings.advertised_host}:{edge.port}"
        secure = "s" if edge.tls is not None else ""
        url = f"ws{secure}://{base}/v1/signal"
        discovery = None
        if settings.consul_addr:
            check_url = f"http{secure}://{base}/healthz"
            registration = Registration(
                "edge", edge.edge_id, url, check_url, region=settings.region
            )
            discovery = Discovery(settings.consul_addr, registration, settings.consul_token)
            await discovery.start()
        print(f"signalpost edge {edge.edge_id} ready on {url}", flush=True)
        try:
            with reload_on_sighup(edge.tls):
                await until_stopped()
        finally:
            if discovery is not None:
                await discovery.close()
