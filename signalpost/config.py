"""Typed settings for every process kind, from a TOML file and ``SIGNALPOST_*`` variables.

Precedence: built-in default < TOML file < environment variable < explicit override
(command-line flags). Every field of ``Settings`` can be set by the variable
``SIGNALPOST_<FIELD>`` (upper case); list fields take comma-separated values.
docs/configuration.md carries the table; ``settings_table()`` prints it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from signalpost.errors import ConfigError
from signalpost.regions import parse_home_rules

ENV_PREFIX: Final = "SIGNALPOST_"
DEV_JWT_SECRET: Final = "signalpost-dev-secret-change-me"

_YEAR: Final = 365 * 86400.0
# Range types: a bad value is refused at load time (naming the setting), not at first use.
# NaN fails every comparison, so it is refused too.
Count = Annotated[int, Meta(gt=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Seconds = Annotated[float, Meta(ge=0, le=_YEAR)]
PositiveSeconds = Annotated[float, Meta(gt=0, le=_YEAR)]
Rate = Annotated[float, Meta(gt=0)]
Secret = Annotated[str, Meta(min_length=1)]
Share = Annotated[float, Meta(ge=0, le=1)]
#: Algorithms a JWKS key may sign client tokens with (``none`` is not one of them).
JwksAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA", "HS256", "HS384", "HS512",
]  # fmt: skip
#: The default: public-key algorithms only (an HS* key from a JWKS only when listed).
DEFAULT_JWKS_ALGORITHMS: Final = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip


#: Hosts a ZeroMQ endpoint may bind that nobody can dial.
_WILDCARD_HOSTS: Final = ("*", "0.0.0.0", "[::]", "::", "")


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """All settings; each process reads the ones it needs."""

    # client edge
    host: str = "127.0.0.1"
    port: Port = 8080
    tls_cert_file: str | None = None  # PEM chain: the edge serves wss/https only (with key)
    tls_key_file: str | None = None  # PEM key of tls_cert_file; both re-read on SIGHUP
    jwt_secret: Secret = DEV_JWT_SECRET
    jwt_audience: str | None = None
    jwt_leeway: Seconds = 10.0
    jwt_public_key_file: str | None = None  # PEM; enables ES256/RS256 beside HS256
    jwks_source: str | None = None  # https:// or http:// URL, or a file: a JWK Set, by `kid`
    jwks_refresh: PositiveSeconds = 300.0
    jwks_min_refresh: PositiveSeconds = 10.0  # unknown kid: refetch at most this often
    jwks_grace: Seconds = 600.0  # a key gone from the JWKS is still accepted this long
    jwks_algorithms: list[JwksAlgorithm] = msgspec.field(
        default_factory=lambda: list(DEFAULT_JWKS_ALGORITHMS)
    )
    hello_timeout: PositiveSeconds = 5.0
    max_frame: Count = 65536
    heartbeat: Count = 25
    resume_window: Seconds = 30.0
    allowed_origins: list[str] = []
    allow_missing_origin: bool = True  # with allowed_origins: admit clients sending no Origin
    rate_per_second: Rate = 50.0
    rate_burst: Count = 100
    rate_strikes: Count = 20  # rate_limited errors in a row before close 4429
    bad_frame_strikes: Count = 10  # bad_request errors within a minute before close 4400
    max_watch: Count = 1000
    send_buffer_limit: Count = 4 * 1024 * 1024  # bytes queued to a slow client before dropping it
    drain_timeout: Seconds = 10.0
    dev_tokens: bool = False  # serve /v1/dev-token (dev mode only)
    # server API (edge/server_api.py, docs/server-api.md)
    api_max_body: Count = 256 * 1024
    api_timeout: PositiveSeconds = 5.0
    api_max_inflight: Count = 1024
    # admission (edge/admission.py): caps and the accept rate
    max_connections_per_ip: Count = 1000
    connection_cap_exempt: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1", "::1"])
    max_sessions_per_user: Count = 100
    accept_rate: Rate = 500.0
    accept_burst: Count = 1000
    accept_resume_share: Share = 0.5
    cap_retry_after: PositiveSeconds = 5.0

    # TURN / STUN
    turn_secret: str | None = None
    turn_urls: list[str] = []
    stun_urls: list[str] = []
    turn_ttl: Count = 3600

    # rooms (broker)
    room_capacity: Count = 2
    history_max_events: Annotated[int, Meta(ge=0)] = 1024
    history_max_age: Seconds = 120.0

    # webhooks (signalpost/webhooks.py, docs/webhooks.md)
    webhook_urls: list[str] = []
    webhook_secret: str | None = None  # required with webhook_urls
    webhook_timeout: PositiveSeconds = 5.0
    webhook_concurrency: Count = 32
    webhook_max_attempts: Count = 12
    webhook_retry_base: PositiveSeconds = 0.5
    webhook_retry_max: PositiveSeconds = 30.0
    webhook_queue_max: Count = 100_000

    # cluster
    node_id: str | None = None
    broker_bind: str = "tcp://127.0.0.1:5555"
    broker_endpoints: list[str] = []
    presence_bind: str = "tcp://127.0.0.1:5565"
    presence_endpoint: str | None = None
    heartbeat_interval: PositiveSeconds = 0.5
    heartbeat_liveness: Count = 6
    request_timeout: PositiveSeconds = 2.0
    consul_addr: str | None = None  # host:port of a Consul agent; None = static endpoints
    consul_token: str | None = None  # Consul ACL token (default: CONSUL_HTTP_TOKEN)
    advertise_host: str | None = None  # address Consul and peers reach this node at (default: host)
    health_port: Port = 0  # /healthz for Consul HTTP checks (0 = pick free)
    region: str = ""  # this node's region: its Consul agent's datacenter ("" = one region)
    wan_advertise: str | None = None  # the endpoint nodes of other regions dial this node at
    room_homes: list[str] = []  # "pattern=region" rules pinning rooms' home regions
    regions: list[str] = []  # every region of the deployment (the same list everywhere)
    region_loss_after: PositiveSeconds = 5.0  # no broker of a region in Consul: it is lost

    def __post_init__(self) -> None:
        parse_home_rules(self.room_homes)  # a bad rule is refused at load, naming it
        if self.webhook_urls and not self.webhook_secret:
            raise ValueError("webhook_urls needs webhook_secret (every request is signed)")
        for url in self.webhook_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"webhook URL {url!r} is not http:// or https://")
        if self.regions and self.region not in self.regions:
            raise ValueError(f"region {self.region!r} is not one of regions {self.regions}")

    # node links: CurveZMQ keys (signalpost/node_keys.py, docs/security.md)
    node_key_file: str | None = None  # this node's <name>.key_secret
    node_secret_key: str | None = None  # or the Z85 secret key itself (e.g. from env)
    cluster_keys_dir: str | None = None  # every node's <name>.key: allow-list, server keys
    insecure_node_links: bool = False  # plaintext, unauthenticated links (closed test nets)
    max_node_message: Count = 128 * 1024 * 1024  # ZeroMQ MAXMSGSIZE on every node socket
    ticket_secret: str | None = None  # brokers and presence: seat tickets' HMAC secret

    @property
    def advertised_host(self) -> str:
        """The address to put in URLs others use (a wildcard bind is no address)."""
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def dialable(self, endpoint: str) -> str:
        """``endpoint`` as other nodes dial it: a wildcard host becomes ``advertised_host``.

        A broker's dialable endpoint is also its placement id, so every edge and broker
        must name it the same way: ``tcp://0.0.0.0:5555`` is no address to dial or hash.
        """
        scheme, separator, rest = endpoint.partition("://")
        host, colon, port = rest.rpartition(":")
        if scheme != "tcp" or not separator or not colon or host not in _WILDCARD_HOSTS:
            return endpoint
        advertised = self.advertised_host
        if ":" in advertised and not advertised.startswith("["):
            advertised = f"[{advertised}]"  # an IPv6 address in a ZeroMQ endpoint
        return f"tcp://{advertised}:{port}"

    @property
    def presence_endpoints(self) -> list[str]:
        """The presence nodes of ``presence_endpoint`` (comma separated: several nodes)."""
        return [e.strip() for e in (self.presence_endpoint or "").split(",") if e.strip()]

    @property
    def peer_expiry(self) -> float:
        """Seconds without a heartbeat after which a node is taken for dead."""
        return self.heartbeat_interval * self.heartbeat_liveness


_FIELD_TYPES: Final = {f.name: f.type for f in msgspec.structs.fields(Settings)}


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _FIELD_TYPES:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if "list[" in str(_FIELD_TYPES[name]):
            values[name] = [item.strip() for item in raw.split(",") if item.strip()]
        elif raw == "" and "None" in str(_FIELD_TYPES[name]):
            values[name] = None
        else:
            values[name] = raw
    return values


def load_settings(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings: defaults, then the TOML file, then env, then ``overrides``."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_PREFIX + "CONFIG")
    merged: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as config_file:
                document = tomllib.load(config_file)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read settings file {path}: {exc}") from exc
        merged.update(document.get("signalpost", document))
    merged.update(_from_env(environ))
    merged.update({k: v for k, v in overrides.items() if v is not None})
    try:
        # strict=False lets "30" from the environment become 30.0, "true" become True.
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {exc}") from exc


#: What each setting means; ``settings_table()`` puts it in docs/configuration.md.
MEANINGS: Final = {
    "host": "address the edge (and a broker's/presence's health server) listens on",
    "port": "edge WebSocket/HTTP port (0: pick a free one)",
    "tls_cert_file": "PEM certificate chain (leaf first): with `tls_key_file`, the edge's "
    "port serves TLS only (`wss://`, `https://`; TLS 1.2+); re-read on SIGHUP. Neither: "
    "plain ws (behind a TLS load balancer); one alone refuses to start",
    "tls_key_file": "PEM private key (unencrypted) of `tls_cert_file`; re-read on SIGHUP",
    "region": (
        "this node's region, which is the datacenter of the Consul agent it talks to "
        "(docs/multi-region.md); empty: a single-region deployment"
    ),
    "wan_advertise": (
        "the ZeroMQ endpoint nodes of other regions dial this broker or presence node at "
        "(its public address, or a relay's); default: its own endpoint"
    ),
    "regions": (
        "every region of the deployment, the same list on every node; with two or more, a "
        "room no `room_homes` rule pins is homed in its first member's region, agreed in "
        "the Consul of the room's arbiter region (docs/multi-region.md)"
    ),
    "region_loss_after": (
        "seconds an edge's Consul agent names no passing broker of another region before "
        "that region counts as lost and the rooms homed there (not pinned by `room_homes`) "
        'are re-homed, by check-and-set in Consul (docs/multi-region.md, "Region loss")'
    ),
    "room_homes": (
        "rules pinning rooms to home regions, `pattern=region` (shell-style pattern on the room "
        "name, first match wins; e.g. `eu-*=eu`); the same rules on every node of every region"
    ),
    "api_max_body": "largest server API request body in bytes (larger: 413 `too_large`, "
    "connection closed)",
    "api_timeout": "seconds a server API request waits for the owners' answers (resent every "
    "0.5 s) before 503 `unavailable`",
    "api_max_inflight": "server API requests an edge lets wait for owners at once; more are "
    "answered 429 `rate_limited`",
    "jwt_secret": "HS256 secret for client tokens; also keys resume tokens (same on every node)",
    "jwt_audience": "required `aud` claim, when set",
    "jwt_leeway": "seconds of clock skew allowed on `exp`/`nbf`/`iat`",
    "jwt_public_key_file": "PEM public key: accept ES256/RS256 tokens too",
    "jwks_source": "JWK Set of client-token keys: an `https://` (or `http://`) URL or a file "
    "path; a token with a `kid` header is checked with that key only (docs/security.md)",
    "jwks_refresh": "seconds between fetches of `jwks_source`",
    "jwks_min_refresh": "a token with an unknown `kid` fetches `jwks_source` again at most "
    "once per this many seconds (else it is refused at once); also the first retry delay "
    "after a failed fetch",
    "jwks_grace": "seconds a key that left the JWK Set is still accepted (0: refused at once)",
    "jwks_algorithms": "algorithms a JWK Set key may have (comma separated; `HS256`/`HS384`/"
    "`HS512` only when listed; never `none`)",
    "hello_timeout": (
        "seconds a new connection has to complete the TLS handshake, if any, then the "
        "WebSocket handshake (each, else dropped), "
        "then again to send `hello` (else close 4408)"
    ),
    "max_frame": "largest client frame in bytes (larger: close 1009)",
    "heartbeat": "seconds between WebSocket pings to clients (sent in `welcome`)",
    "resume_window": "seconds a dropped session stays in its rooms, resumable",
    "allowed_origins": "browser `Origin`s accepted (empty: any; else others get 4403)",
    "allow_missing_origin": "with `allowed_origins` set, still accept connections that send "
    "no `Origin` (native apps, the Python SDK: never a browser page); false: refuse them (4403)",
    "rate_per_second": "frames per second per connection (token bucket refill)",
    "rate_burst": "token bucket size",
    "rate_strikes": "`rate_limited` errors in a row before close 4429",
    "bad_frame_strikes": "`bad_request` errors within a minute before close 4400",
    "max_watch": "users one session may watch",
    "send_buffer_limit": "bytes queued to a client that does not read before it is dropped",
    "drain_timeout": "seconds an edge waits for clients to leave on SIGTERM",
    "dev_tokens": "serve `/v1/dev-token` (set by `signalpost dev` only)",
    "max_connections_per_ip": "TCP connections open at once from one address (from accept "
    "to close); more are closed 4503 after the handshake, and past twice this dropped at "
    "accept. Behind a proxy every client has the proxy's address: exempt it",
    "connection_cap_exempt": "IP addresses not held to `max_connections_per_ip` (comma "
    "separated; no names or networks; loopback by default: local load generators, a TLS "
    "proxy on the host)",
    "max_sessions_per_user": "live sessions of one user (token `sub`) on one edge; more "
    "hellos are closed 4503 (a resume of a session held here is never refused for it)",
    "accept_rate": "hellos per second an edge takes on (token bucket refill); past it "
    "fresh sessions are closed 4503 first, resumes only once the reserve is used up too",
    "accept_burst": "the accept-rate bucket's size",
    "accept_resume_share": "part of `accept_burst` only resumes may take (0 to 1): in a "
    "reconnect storm resumes are admitted before fresh sessions",
    "cap_retry_after": "seconds a client refused by a cap (per IP, per user) is told to "
    "wait before trying again (`retry_after_ms` in the 4503 close reason)",
    "turn_secret": "TURN REST shared secret (one of coturn's `static-auth-secret`); the same "
    "in every region: an edge mints the credentials for the other regions' TURN URLs too",
    "turn_urls": "TURN URLs handed out with credentials (comma separated): this edge's "
    "region's; with two or more `regions` the other regions' follow, learnt from their "
    "edges' Consul registrations (docs/webrtc.md)",
    "stun_urls": "STUN URLs handed out (comma separated): this edge's region's, first",
    "turn_ttl": "seconds TURN credentials stay valid",
    "room_capacity": "members per room (the seed app's rule is 2)",
    "history_max_events": "events kept per room for resume",
    "history_max_age": "seconds events are kept per room for resume",
    "webhook_urls": "URLs every webhook event is POSTed to (comma separated; empty: no "
    "webhooks). Brokers, presence nodes and `signalpost dev` send them (docs/webhooks.md)",
    "webhook_secret": "the HMAC-SHA256 key of the `Signalpost-Signature` header; required "
    "with `webhook_urls`",
    "webhook_timeout": "seconds one webhook request may take (then it failed, and is retried)",
    "webhook_concurrency": "webhook requests in flight per URL (one per room or user at a "
    "time: order per stream)",
    "webhook_max_attempts": "failed attempts of one event to one URL before it is "
    'dead-lettered (`signalpost_webhook_events{outcome="dead"}`) and the stream goes on',
    "webhook_retry_base": "seconds before the first retry; doubled each retry up to "
    "`webhook_retry_max`, of which a random half (jitter)",
    "webhook_retry_max": "longest wait between two attempts (seconds)",
    "webhook_queue_max": "webhook events queued per node (and kept per runner-up); past it "
    'new events are dropped and counted (`outcome="dropped"`): signalling never waits',
    "node_id": "this node's id (default: an edge's is its key's name; else generated)",
    "broker_bind": "a broker's ZeroMQ endpoint; as dialled (a wildcard host advertised as "
    "`advertise_host`) it is also the broker's placement id",
    "broker_endpoints": "brokers to use without Consul (comma separated)",
    "presence_bind": "the presence service's ZeroMQ endpoint (a wildcard host is advertised "
    "as `advertise_host`)",
    "presence_endpoint": "presence endpoints to use without Consul (comma separated)",
    "heartbeat_interval": "seconds between heartbeats on every ZeroMQ link",
    "heartbeat_liveness": "heartbeats missed before a node is taken for dead",
    "request_timeout": "an edge claims a resume, or a new session's lease, from presence "
    "(every 0.5 s) for twice this many seconds before the `welcome`, then welcomes on its "
    "own authority (a resume on the signed token)",
    "consul_addr": "`host:port` of a Consul agent: register there and discover the others",
    "consul_token": "Consul ACL token for every Consul call (unset: `CONSUL_HTTP_TOKEN`, "
    "else none); its policy: docs/security.md",
    "advertise_host": "address Consul and other nodes reach this node at (default: host)",
    "health_port": "port of a broker's/presence's `/healthz` and `/metrics` (0: pick free)",
    "node_key_file": "this node's CurveZMQ key pair: the `<name>.key_secret` file "
    "`signalpost keys` wrote",
    "node_secret_key": "this node's CurveZMQ secret key (40 Z85 characters), instead of "
    "`node_key_file`",
    "cluster_keys_dir": "directory of every node's public `<name>.key`: the nodes a broker "
    "or presence admits, and the server key for each endpoint a node dials",
    "insecure_node_links": "plaintext, unauthenticated node links without keys "
    "(`--insecure-node-links`; logged as a warning; a closed test network only)",
    "max_node_message": "largest ZeroMQ message a node accepts (MAXMSGSIZE); a larger one "
    "drops the connection. Keep above `history_max_events x max_frame` (a room handoff)",
    "ticket_secret": "brokers and presence only (never edges): the secret of the seat "
    "tickets presence grants with a resume and brokers check before moving a session's seat "
    "to another edge (32+ random characters, the same on all of them; `signalpost keys "
    "--ticket-secret` makes one). Required with node keys",
}


def settings_table() -> str:
    """Markdown table of every setting: variable, default, meaning (docs/configuration.md)."""
    defaults = Settings()
    rows = [
        "| setting | environment variable | default | meaning |",
        "|---|---|---|---|",
    ]
    for name in _FIELD_TYPES:
        value = getattr(defaults, name)
        meaning = MEANINGS[name]
        rows.append(f"| `{name}` | `{ENV_PREFIX}{name.upper()}` | `{value!r}` | {meaning} |")
    return "\n".join(rows)
