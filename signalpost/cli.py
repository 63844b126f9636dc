"""``signalpost`` command line: dev, edge, broker, presence, cluster, token, keys, wan-relay,
api (the server API: ``signalpost.admin_cli``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from signalpost.admin_cli import add_api_parser
from signalpost.auth import mint_token
from signalpost.config import DEV_JWT_SECRET, Settings, load_settings
from signalpost.errors import ConfigError
from signalpost.lifecycle import run, until_stopped

log = logging.getLogger("signalpost")


async def run_dev(settings: Settings, ready: Callable[[int], None] | None = None) -> None:
    """The whole system in one process until SIGTERM/SIGINT."""
    from edge.backplane import LocalBackplane
    from edge.server import EdgeServer
    from edge.tls import reload_on_sighup

    inbox = None
    if not settings.webhook_urls:
        # No receiver of its own: the demo app's panel shows the webhooks (docs/webhooks.md).
        from signalpost.dev_webhooks import DevInbox

        inbox = DevInbox()
    backplane = LocalBackplane(settings, dev_inbox=inbox)
    edge = EdgeServer(settings, backplane, edge_id="dev")
    if inbox is not None:
        edge.dev_webhooks = backplane.dev_webhooks
    async with edge:
        secure = "s" if edge.tls is not None else ""
        print(
            f"signalpost dev: http{secure}://{settings.host}:{edge.port}/  "
            f"ws{secure}://{settings.host}:{edge.port}/v1/signal",
            flush=True,
        )
        if ready is not None:
            ready(edge.port)
        with reload_on_sighup(edge.tls):
            await until_stopped()


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {"host": getattr(args, "host", None), "port": getattr(args, "port", None)}
    overrides["tls_cert_file"] = getattr(args, "tls_cert", None)
    overrides["tls_key_file"] = getattr(args, "tls_key", None)
    if getattr(args, "insecure_node_links", False):
        overrides["insecure_node_links"] = True
    overrides.update(extra)
    return load_settings(args.config, **overrides)


def require_own_jwt_secret(settings: Settings, kind: str) -> None:
    """Refuse to run an edge or broker with the public default ``jwt_secret``.

    Anyone can mint tokens with it; only ``signalpost dev`` may use it.
    """
    if settings.jwt_secret == DEV_JWT_SECRET:
        raise ConfigError(
            f"refusing to start a {kind} with the public default jwt_secret: set "
            "SIGNALPOST_JWT_SECRET (e.g. `openssl rand -hex 32`); only `signalpost dev` "
            "runs with the default"
        )


def cmd_dev(args: argparse.Namespace) -> None:
    settings = _settings(args, dev_tokens=True)
    if settings.jwt_secret == DEV_JWT_SECRET:
        log.warning("using the built-in development JWT secret; set SIGNALPOST_JWT_SECRET")
    run(lambda: run_dev(settings))


def cmd_token(args: argparse.Namespace) -> None:
    settings = load_settings(args.config)
    token = mint_token(
        settings.jwt_secret,
        args.user,
        now=time.time(),
        ttl=args.ttl,
        rooms=args.room or None,
        audience=settings.jwt_audience,
        name=args.name,
        home=args.home,
    )
    print(token)


def cmd_edge(args: argparse.Namespace) -> None:
    from edge.main import run_edge

    settings = _settings(args, node_id=args.id)
    require_own_jwt_secret(settings, "edge")
    run(lambda: run_edge(settings))


def cmd_broker(args: argparse.Namespace) -> None:
    from broker.service import run_broker

    settings = _settings(args, node_id=args.id, broker_bind=args.bind)
    require_own_jwt_secret(settings, "broker")
    run(lambda: run_broker(settings))


def cmd_presence(args: argparse.Namespace) -> None:
    from presence.service import run_presence

    run(lambda: run_presence(_settings(args, node_id=args.id, presence_bind=args.bind)))


def cmd_keys(args: argparse.Namespace) -> None:
    from signalpost.node_keys import create_node_keys

    if args.ticket_secret:
        from signalpost.tickets import write_ticket_secret

        path = write_ticket_secret(Path(args.dir))
        print(f"ticket secret: {path}  (brokers and presence only: SIGNALPOST_TICKET_SECRET)")
        if not args.name:
            return
    if not args.name or not args.kind:
        raise ConfigError("signalpost keys needs --name and --kind (or --ticket-secret)")
    public, secret = create_node_keys(Path(args.dir), args.name, args.endpoint, kind=args.kind)
    print(f"public key: {public}  (copy into every node's cluster_keys_dir)")
    print(f"secret key: {secret}  (this node only: its node_key_file)")


def cmd_wan_relay(args: argparse.Namespace) -> None:
    from signalpost.wan_relay import parse_delay, parse_pair
    from signalpost.wan_relay import run as run_relay

    delay = parse_delay(args.delay)
    pairs = [parse_pair(pair) for pair in args.pair]
    run(lambda: run_relay(pairs, delay, args.stats))


def cmd_cluster(args: argparse.Namespace) -> None:
    from edge.tls import EdgeTls
    from signalpost.cluster import run_cluster
    from signalpost.wan_relay import parse_delay

    settings = _settings(args)
    require_own_jwt_secret(settings, "cluster")
    EdgeTls.from_settings(settings)  # bad TLS files: refused here, not by every edge
    raise SystemExit(
        run_cluster(
            settings,
            edges=args.edges,
            brokers=args.brokers,
            presence=args.presence,
            state_file=args.state,
            restart=args.restart,
            consul=args.consul,
            regions=_regions(args.regions),
            wan_delay=parse_delay(args.wan_delay),
        )
    )


def _tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tls-cert", help="PEM certificate chain: serve wss/https only (tls_cert_file)"
    )
    parser.add_argument("--tls-key", help="PEM key of --tls-cert (tls_key_file)")


def _regions(text: str | None) -> list[str]:
    regions = [r.strip() for r in (text or "").split(",") if r.strip()]
    if len(set(regions)) != len(regions):
        raise ConfigError(f"--regions names a region twice: {text!r}")
    for region in regions:
        if not region.replace("-", "").isalnum():
            raise ConfigError(f"region {region!r}: letters, digits and '-' only")
    return regions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="signalpost", description=__doc__)
    parser.add_argument("--config", help="TOML settings file (or SIGNALPOST_CONFIG)")
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("dev", help="the whole system in one process")
    dev.add_argument("--host")
    dev.add_argument("--port", type=int)
    _tls_arguments(dev)
    dev.set_defaults(func=cmd_dev)

    token = commands.add_parser("token", help="mint a client JWT with the configured secret")
    token.add_argument("--user", required=True)
    token.add_argument("--room", action="append", help="grant a room (or prefix*); repeatable")
    token.add_argument("--ttl", type=float, default=3600.0)
    token.add_argument("--name")
    token.add_argument("--home", help="region of the rooms this client opens (regions)")
    token.set_defaults(func=cmd_token)

    keys = commands.add_parser(
        "keys", help="write a node's CurveZMQ key pair (<name>.key, <name>.key_secret)"
    )
    keys.add_argument("--dir", required=True, help="directory to write the two files to")
    keys.add_argument("--name", help="file name: the node id is a good one")
    keys.add_argument(
        "--kind",
        choices=("edge", "broker", "presence"),
        help="the kind of node that holds the key: decides which envelopes it may send",
    )
    keys.add_argument(
        "--endpoint",
        help="the ZeroMQ endpoint others dial this node at (brokers and presence)",
    )
    keys.add_argument(
        "--ticket-secret",
        action="store_true",
        help="write ticket.secret: the seat tickets' secret, for brokers and presence only",
    )
    keys.set_defaults(func=cmd_keys)
    add_api_parser(commands)

    insecure_help = (
        "plaintext, unauthenticated node links without keys: anyone who reaches a ZeroMQ "
        "port can forge envelopes (a closed test network only; logged as a warning)"
    )
    for kind, func in (("edge", cmd_edge), ("broker", cmd_broker), ("presence", cmd_presence)):
        tier = commands.add_parser(kind, help=f"run one {kind} node")
        tier.add_argument("--id", help="node id (default: generated)")
        tier.add_argument("--insecure-node-links", action="store_true", help=insecure_help)
        if kind == "edge":
            tier.add_argument("--host")
            tier.add_argument("--port", type=int)
            _tls_arguments(tier)
        else:
            tier.add_argument("--bind", help="ZeroMQ endpoint to bind")
        tier.set_defaults(func=func)

    relay = commands.add_parser(
        "wan-relay", help="an emulated WAN: a TCP relay that delays every byte (tests, demos)"
    )
    relay.add_argument("--delay", required=True, help="one-way delay, e.g. 40ms")
    relay.add_argument(
        "--pair",
        action="append",
        required=True,
        help="listen_host:port=target_host:port; repeatable",
    )
    relay.add_argument("--stats", help="JSON file kept with the bytes relayed per pair")
    relay.set_defaults(func=cmd_wan_relay)

    cluster = commands.add_parser("cluster", help="a local multi-process cluster on loopback")
    cluster.add_argument("--edges", type=int, default=2)
    cluster.add_argument("--brokers", type=int, default=1)
    cluster.add_argument("--presence", type=int, default=1, help="presence nodes")
    cluster.add_argument("--state", required=True, help="JSON file describing the processes")
    cluster.add_argument("--restart", action="store_true", help="restart children that die")
    cluster.add_argument(
        "--consul",
        choices=("auto", "on", "off"),
        default="auto",
        help="start a Consul dev agent for discovery (auto: when consul is on PATH)",
    )
    cluster.add_argument("--insecure-node-links", action="store_true", help=insecure_help)
    _tls_arguments(cluster)
    cluster.add_argument(
        "--regions",
        help="comma-separated regions (e.g. eu,us): each its own Consul datacenter and nodes",
    )
    cluster.add_argument(
        "--wan-delay", default="0ms", help="with --regions: one-way delay between regions"
    )
    cluster.set_defaults(func=cmd_cluster)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``signalpost`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if logging.getLogger().level > logging.DEBUG:
        # websockets logs every connection and HTTP request (health checks) at INFO.
        logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"signalpost: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            sys.stderr.flush()


if __name__ == "__main__":
    main()
