"""``signalpost api ...``: the server API from the command line (``signalpost.admin``).

Every command but ``key`` calls an edge: ``--url`` (or ``SIGNALPOST_API_URL``, default
``http://127.0.0.1:8080``) with ``--key`` (or ``SIGNALPOST_API_KEY``); answers are printed
as JSON. ``key`` mints an API key offline with the configured ``jwt_secret``. A refused
request prints its code and message and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from signalpost.admin import AdminClient
from signalpost.api_keys import mint_api_key, parse_scopes
from signalpost.config import load_settings
from signalpost.errors import ConfigError, ProtocolError, TransportError

DEFAULT_URL = "http://127.0.0.1:8080"


def _client(args: argparse.Namespace) -> AdminClient:
    key = args.key or os.environ.get("SIGNALPOST_API_KEY")
    if not key:
        raise ConfigError("no API key: pass --key or set SIGNALPOST_API_KEY")
    url = args.url or os.environ.get("SIGNALPOST_API_URL") or DEFAULT_URL
    return AdminClient(url, key)


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"data is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError("data must be a JSON object")
    return value


def cmd_api(args: argparse.Namespace) -> None:
    """Run one ``signalpost api`` command."""
    try:
        _run(args)
    except ProtocolError as exc:
        print(f"signalpost api: {exc.code}: {exc.message}", file=sys.stderr)
        raise SystemExit(1) from None
    except TransportError as exc:
        print(f"signalpost api: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _run(args: argparse.Namespace) -> None:
    action = args.api_command
    if action == "key":
        settings = load_settings(args.config)
        scopes = parse_scopes(" ".join(args.scope))
        key = mint_api_key(
            settings.jwt_secret,
            args.name,
            scopes,
            now=time.time(),
            ttl=args.ttl,
            audience=settings.jwt_audience,
        )
        print(key)
        return
    api = _client(args)
    if action == "rooms":
        if args.all:
            _print(list(api.iter_rooms(args.limit)))
        else:
            _print(api.list_rooms(args.limit, args.cursor))
    elif action == "room":
        _print(api.room(args.room))
    elif action == "presence":
        _print(api.presence(*args.user))
    elif action == "publish":
        _print(
            api.publish(
                args.room,
                _json_object(args.data),
                to=args.to,
                to_user=args.to_user,
                idempotency_key=args.idempotency_key,
            )
        )
    elif action == "close":
        _print(api.close_room(args.room, args.reason, idempotency_key=args.idempotency_key))
    elif action == "kick":
        _print(api.kick(args.user, args.session, args.reason))
    elif action == "token":
        print(
            api.mint_token(
                args.user, ttl=args.ttl, rooms=args.room or None, name=args.name, home=args.home
            )
        )


def add_api_parser(commands: Any) -> None:
    """Add ``api`` and its subcommands to the ``signalpost`` parser's subcommands."""
    api = commands.add_parser("api", help="call the server API of an edge (docs/server-api.md)")
    api.add_argument("--url", help=f"edge base URL (SIGNALPOST_API_URL; {DEFAULT_URL})")
    api.add_argument("--key", help="API key (SIGNALPOST_API_KEY)")
    api.set_defaults(func=cmd_api)
    sub = api.add_subparsers(dest="api_command", required=True)

    key = sub.add_parser("key", help="mint an API key with the configured jwt_secret (offline)")
    key.add_argument("--name", required=True, help="the key's name (shown as a publish's key)")
    key.add_argument(
        "--scope",
        action="append",
        required=True,
        help="scopes (space or comma separated, repeatable; `all`: every scope)",
    )
    key.add_argument("--ttl", type=float, default=365 * 86400.0, help="seconds (default 1 year)")

    rooms = sub.add_parser("rooms", help="list rooms (every broker's), by name")
    rooms.add_argument("--limit", type=int, default=100)
    rooms.add_argument("--cursor", help="next_cursor of the previous page")
    rooms.add_argument("--all", action="store_true", help="every page")

    room = sub.add_parser("room", help="one room and its members")
    room.add_argument("room")

    presence = sub.add_parser("presence", help="users' status and sessions")
    presence.add_argument("user", nargs="+")

    publish = sub.add_parser("publish", help="publish a JSON object to a room")
    publish.add_argument("room")
    publish.add_argument("data", help="a JSON object: the signal's data")
    target = publish.add_mutually_exclusive_group()
    target.add_argument("--to", help="one session of the room")
    target.add_argument("--to-user", help="every session of this user in the room")
    publish.add_argument("--idempotency-key", help="default: a new one per call")

    close = sub.add_parser("close", help="close a room: members get room-closed and leave")
    close.add_argument("room")
    close.add_argument("--reason", default="")
    close.add_argument("--idempotency-key")

    kick = sub.add_parser("kick", help="end a session (all of a user's without --session)")
    kick.add_argument("user")
    kick.add_argument("--session")
    kick.add_argument("--reason", default="")

    token = sub.add_parser("token", help="mint a client token through the API")
    token.add_argument("user")
    token.add_argument("--ttl", type=int, default=3600)
    token.add_argument("--room", action="append", help="grant a room (or prefix*); repeatable")
    token.add_argument("--name")
    token.add_argument("--home", help="region of the rooms this client opens (regions)")
