"""Prometheus metrics every node exposes (``/metrics`` on the edge, the health port elsewhere)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest

CONNECTIONS = Gauge("signalpost_connections", "Client WebSocket connections open on this edge")
FRAMES_IN = Counter("signalpost_frames_in", "Client frames received")
FRAMES_OUT = Counter("signalpost_frames_out", "Frames written to clients")
ENVELOPES = Counter("signalpost_envelopes", "Envelopes handled by this node", ["kind"])
PEERS_LOST = Counter("signalpost_peers_lost", "Nodes declared dead after missed heartbeats")


def exposition() -> tuple[bytes, str]:
    """The text exposition format and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
