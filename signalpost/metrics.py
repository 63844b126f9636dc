"""Prometheus metrics every node exposes (``/metrics`` on the edge, the health port elsewhere).

Counters bumped once per frame or envelope are plain ints in ``HOT``, read only when
``/metrics`` is scraped: prometheus_client's ``Counter.inc`` takes a lock on every call,
which showed in the relay profiles (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class HotCounters(Collector):
    """Per-frame counters as plain attributes; exposed as ordinary Prometheus counters."""

    def __init__(self) -> None:
        self.frames_in = 0
        self.frames_out = 0
        self.envelopes: dict[str, int] = {}  # node kind -> envelopes handled

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "signalpost_frames_in", "Client frames received", value=self.frames_in
        )
        yield CounterMetricFamily(
            "signalpost_frames_out", "Frames written to clients", value=self.frames_out
        )
        envelopes = CounterMetricFamily(
            "signalpost_envelopes", "Envelopes handled by this node", labels=["kind"]
        )
        for kind, count in sorted(self.envelopes.items()):
            envelopes.add_metric([kind], count)
        yield envelopes


HOT = HotCounters()
REGISTRY.register(HOT)

CONNECTIONS = Gauge("signalpost_connections", "Client WebSocket connections open on this edge")
REGION_LINKS = Gauge(
    "signalpost_region_links_alive",
    "Links up (heartbeats answered) to another region's nodes of a tier",
    ["region", "tier"],
)
PEERS_LOST = Counter("signalpost_peers_lost", "Nodes declared dead after missed heartbeats")
DELIVERIES_DROPPED = Counter(
    "signalpost_deliveries_dropped",
    "Room events an edge did not write: a copy (duplicate), something missing before it "
    "(gap, resent by the owner), a room the session is not in here (unknown_room), of "
    "another epoch than the session's (other_epoch), from a deposed owner (stale_term), or "
    "about a room from a region that is no longer its home (former_home)",
    ["reason"],
)
REQUESTS_RESENT = Counter(
    "signalpost_requests_resent", "Requests and re-announcements an edge sent again unanswered"
)
REQUESTS_DEFERRED = Counter(
    "signalpost_requests_deferred",
    "Requests a broker left unanswered while it rebuilt the room from the edges' "
    "re-announcements (a member it needed was not re-announced yet; the edge resends them)",
)
DELIVERIES_RESENT = Counter(
    "signalpost_deliveries_resent", "Room events an owner sent again, unconfirmed by the edge"
)
NODE_SEND_DROPS = Counter(
    "signalpost_node_send_drops",
    "Envelopes a ROUTER could not hand to a peer (unknown peer or its pipe full); the "
    "delivery streams resend them",
    ["reason"],
)

NODE_FRAMES_DROPPED = Counter(
    "signalpost_node_frames_dropped",
    "Frames (or single envelopes in a frame) from another node that were dropped: not "
    "decodable (frame, envelope: malformed or nested too deeply), under a routing id its "
    "key does not have (identity), naming another node as sender (sender), an envelope "
    "its kind of node may not send to this tier (kind), about a session another edge "
    "holds (session), or about a room its broker does not own (room)",
    ["what"],
)

ADMISSION_REFUSED = Counter(
    "signalpost_admission_refused",
    "Client connections or hellos an edge refused (close 4503, or dropped at accept): over "
    "max_connections_per_ip (ip_cap; ip_dropped past twice it), over "
    "max_sessions_per_user (user_cap), over the accept rate (shed: a fresh session; "
    "shed_resume: a resume, the reserve used up too), or a full per-IP or per-user table "
    "(ip_table_full, user_table_full)",
    ["kind"],
)
HELLOS_ADMITTED = Counter(
    "signalpost_hellos_admitted",
    "Hellos an edge took on past the accept rate, by kind (fresh, resume)",
    ["kind"],
)

CLIENT_BAD_FRAMES = Counter(
    "signalpost_client_bad_frames",
    "Client frames answered bad_request: not JSON, invalid, or nested too deeply (a frame "
    "over max_frame closes the connection with 1009 instead)",
)
NODE_LINKS_REFUSED = Counter(
    "signalpost_node_links_refused",
    "Node links refused, per handshake. At a broker or presence: a node whose public key "
    "is not in the cluster keys directory (unknown_key), a plaintext node (plaintext), a "
    "handshake that failed otherwise, e.g. dialled with another server key (bad_handshake). "
    "At a dialling node: an endpoint no trusted certificate names (no_server_key), its own "
    "key refused by the server (refused_by_server), a server not holding the expected key "
    "(server_unverified), an endpoint whose certificate is another kind of node's "
    "(wrong_kind)",
    ["reason"],
)
REPLICA_ACKS_IGNORED = Counter(
    "signalpost_replica_acks_ignored",
    "Acknowledgements of a copy (room events, a session's lease) that an owner ignored "
    "because they came from a node other than the one it last sent that copy to (a "
    "runner-up replaced meanwhile); the copy's current target acknowledges it",
    ["kind"],
)

PRESENCE_DROPPED = Counter(
    "signalpost_presence_dropped",
    "Commands a presence node dropped: for a user it does not own (misrouted), a watch "
    "reply that waited too long for another node, a status note from a node that does not "
    "own the user",
)
CROSS_REGION_ENVELOPES = Counter(
    "signalpost_cross_region_envelopes",
    "Envelopes an edge sent to (out) or got from (in) the brokers of another region, by that "
    "region: the traffic of its clients in rooms homed there; 0 while every room an edge "
    "serves is homed in its own region",
    ["region", "direction"],
)
PRESENCE_HELD_DROPPED = Counter(
    "signalpost_presence_held_dropped",
    "Presence commands an edge dropped while no presence node was known yet and "
    "MAX_PRESENCE_HELD were already held (the oldest goes; claims are resent)",
)
CROSS_REGION_DROPPED = Counter(
    "signalpost_cross_region_dropped",
    "Envelopes for another region's rooms dropped while no broker of that region was known "
    "and MAX_PENDING were already waiting (requests are resent until answered)",
    ["region"],
)

EDGES_ANSWERS = Counter(
    "signalpost_edges_answers",
    "GET /v1/edges answers of this edge, by HTTP status (200; 404 unknown region; 400 bad "
    "query; 429 past the per-edge rate)",
    ["status"],
)

# Server API (edge/server_api.py)
API_REQUESTS = Counter(
    "signalpost_api_requests",
    "Server API requests answered by this edge, by route and HTTP status",
    ["route", "status"],
)
API_SECONDS = Histogram(
    "signalpost_api_seconds",
    "Seconds a server API request took on this edge (owners' answers included), by route",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
API_RESENT = Counter(
    "signalpost_api_resent",
    "Server API queries or publishes sent to an owner again (no answer within 0.5 s)",
)
API_PUBLISHED = Counter(
    "signalpost_api_published",
    "Server API room events acknowledged by their owner (publish, close), retries included",
    ["kind"],
)
API_KICKED = Counter(
    "signalpost_api_kicked",
    "Sessions this edge closed with 4410 because the server API kicked them",
)


def exposition() -> tuple[bytes, str]:
    """The text exposition format and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST


WEBHOOK_EVENTS = Counter(
    "signalpost_webhook_events",
    "Webhook requests and events by outcome: delivered (a 2xx), failed (an attempt that "
    "will be retried), dead (dead-lettered after webhook_max_attempts for one URL), "
    "dropped (the queue was full: webhook_queue_max)",
    ["outcome"],
)
WEBHOOK_QUEUE = Gauge("signalpost_webhook_queue", "Webhook events queued on this node")


class CountExport:
    """Exports a count a sans-I/O core only ever increases to a Prometheus counter (the
    core stays free of prometheus_client): ``update`` adds what grew since the last call."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.reported = 0

    def update(self, count: int) -> None:
        if count != self.reported:
            self.counter.inc(count - self.reported)
            self.reported = count
