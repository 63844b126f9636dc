"""Node keys: CurveZMQ on every link between nodes, and who may open one.

Every node (edge, broker, presence) has a CurveZMQ key pair. ``signalpost keys`` writes it
as two ZeroMQ certificate files (the format czmq and ``zmq.auth`` read):

* ``<name>.key_secret``: the pair; stays on that node (``node_key_file``, or the secret
  key itself in ``node_secret_key``, e.g. from a secret store through the environment);
* ``<name>.key``: the public key, the node's ``kind`` (``edge``, ``broker`` or
  ``presence``) and, for a node that binds (broker, presence), the ``endpoint`` other
  nodes dial it at, in the certificate's metadata.

The **cluster keys directory** (``cluster_keys_dir``) holds every node's ``<name>.key``,
the same on every node. It is the whole trust model:

* a node that binds (a ROUTER: broker, presence) admits a connecting node only if its
  public key has a file there: ZAP, run by pyzmq's ``ThreadAuthenticator``. The directory
  is read again at each handshake, so adding or removing a node's file takes effect at
  that node's next connection (connections already up stay until they drop). A refused
  node is logged (once per key per interval) and counted in
  ``signalpost_node_links_refused_total{reason="unknown_key"}``. ZAP gives the admitted
  link the User-Id ``"<kind> <name> [<endpoint>]"`` (``node_user_id``): the names the node
  may send under (``speaks_as``) and its kind, which decides the envelopes a ROUTER takes
  from it (``signalpost.wire.SENDER_KINDS``). A file without a valid ``kind`` admits
  nobody (logged; a node refuses to start while its cluster keys directory holds one);
* a node that dials (a DEALER: edge, broker towards a peer) uses, as the server key, the
  key of the file whose ``endpoint`` is the endpoint it dials, so it talks only to the node
  holding that key's secret. An endpoint no file names is not dialled (logged, counted as
  ``reason="no_server_key"``). Several files naming one endpoint (during a rotation): the
  newest file wins.

Every other failed handshake is seen on the socket's monitor (``HandshakeWatch``), logged
and counted too: at a ROUTER a plaintext node (``plaintext``) or one that dialled with
another server key (``bad_handshake``); at a DEALER its own key refused (``refused_by_server``)
or a server that does not hold the key it expected (``server_unverified``).

The server key is not taken from Consul's service metadata: Consul would then decide whom
an edge trusts, and it is only as trustworthy as its ACLs. Here Consul decides only where
a node is; the directory decides who it must be.

Plaintext links only with ``insecure_node_links`` (``--insecure-node-links``), logged as a
warning at start-up; with neither keys nor that flag a node refuses to start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import monitor, z85

from signalpost import metrics
from signalpost.config import Settings
from signalpost.errors import ConfigError

log = logging.getLogger("signalpost.node_keys")

#: The ZAP domain of every ROUTER signalpost binds.
ZAP_DOMAIN: Final = "signalpost"

#: File name endings of the two certificate files (czmq's convention, read by ``zmq.auth``).
PUBLIC_SUFFIX: Final = ".key"
SECRET_SUFFIX: Final = ".key_secret"

_Z85_KEY_LENGTH: Final = 40

#: The kinds of node: a key's ``kind`` metadata says which one holds it.
NODE_KINDS: Final = ("edge", "broker", "presence")

_MIGRATION: Final = (
    'add a line `    kind = "edge"` (or broker, presence) under its `metadata` section, '
    "or make a new key with `signalpost keys --kind ...`"
)


@dataclass(frozen=True, slots=True)
class NodeKeys:
    """This node's key pair (Z85) and the cluster keys directory it trusts."""

    public: bytes
    secret: bytes
    cluster_dir: Path


@dataclass(frozen=True, slots=True)
class TrustedKeys:
    """What the cluster keys directory says now: every node's key, servers by endpoint,
    and who each key is (``node_user_id``: the names its node may send under)."""

    keys: frozenset[bytes]
    servers: dict[str, bytes]
    user_ids: dict[bytes, str] = field(default_factory=dict)
    #: Certificates without a valid ``kind`` (they admit nobody): file names.
    kindless: tuple[str, ...] = ()


def node_user_id(name: str, endpoint: str | None, kind: str) -> str:
    """The ZAP User-Id of a node's key: its kind, its name (the certificate's file name),
    then the endpoint it binds, if any (brokers and presence send under their endpoint)."""
    return f"{kind} {name}" if not endpoint else f"{kind} {name} {endpoint}"


def speaks_as(user_id: str, identity: str) -> bool:
    """Whether the node authenticated as ``user_id`` may use ``identity`` (its ZeroMQ
    routing id, and the sender its envelopes name)."""
    return identity in user_id.split(" ")[1:]


def kind_of(user_id: str) -> str:
    """The kind of node a ZAP User-Id (``node_user_id``) is; "" if none."""
    kind = user_id.partition(" ")[0]
    return kind if kind in NODE_KINDS else ""


def _parse_certificate(path: Path) -> tuple[bytes | None, bytes | None, dict[str, str]]:
    """(public key, secret key, metadata) of a ZeroMQ certificate file (ZPL, czmq's form)."""
    public: bytes | None = None
    secret: bytes | None = None
    metadata: dict[str, str] = {}
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):  # "#" is also a Z85 digit
            continue
        if not line[0].isspace():
            section = line.strip()
            continue
        name, separator, value = line.strip().partition("=")
        if not separator:
            continue
        name, value = name.strip(), value.strip().strip("\"'")
        if section == "curve" and name == "public-key":
            public = value.encode()
        elif section == "curve" and name == "secret-key":
            secret = value.encode()
        elif section == "metadata":
            metadata[name] = value
    return public, secret, metadata


def _valid_key(key: bytes) -> bool:
    if len(key) != _Z85_KEY_LENGTH:
        return False
    try:
        z85.decode(key)
    except (ValueError, KeyError):
        return False
    return True


def read_trusted(directory: Path) -> TrustedKeys:
    """Read every ``*.key`` file of the cluster keys directory (unreadable ones are logged)."""
    keys: set[bytes] = set()
    servers: dict[str, tuple[float, bytes]] = {}
    user_ids: dict[bytes, str] = {}
    kindless: list[str] = []
    try:
        paths = sorted(directory.glob("*" + PUBLIC_SUFFIX))
    except OSError as exc:
        log.error("cannot read the cluster keys directory %s: %s", directory, exc)
        return TrustedKeys(frozenset(), {})
    for path in paths:
        try:
            public, _, metadata = _parse_certificate(path)
            modified = path.stat().st_mtime
        except (OSError, UnicodeDecodeError) as exc:
            log.error("cannot read node certificate %s: %s", path, exc)
            continue
        if public is None or not _valid_key(public):
            log.error("node certificate %s has no valid public key; ignored", path)
            continue
        kind = metadata.get("kind", "")
        if kind not in NODE_KINDS:
            # Which envelopes it may send depends on its kind: without one, none.
            kindless.append(path.name)
            _log_kindless(path, kind)
            continue
        keys.add(public)
        endpoint = metadata.get("endpoint")
        user_ids[public] = node_user_id(path.name.removesuffix(PUBLIC_SUFFIX), endpoint, kind)
        if endpoint and (endpoint not in servers or servers[endpoint][0] <= modified):
            servers[endpoint] = (modified, public)
    servers_now = {e: key for e, (_, key) in servers.items()}
    return TrustedKeys(frozenset(keys), servers_now, user_ids, tuple(kindless))


#: path -> when a certificate without a kind was last logged (read at every handshake).
_kindless_logged: dict[Path, float] = {}


def _log_kindless(path: Path, kind: str) -> None:
    now = time.monotonic()
    if now - _kindless_logged.get(path, -_REFUSAL_LOG_INTERVAL) < _REFUSAL_LOG_INTERVAL:
        return
    if len(_kindless_logged) >= 10_000:
        _kindless_logged.clear()
    _kindless_logged[path] = now
    what = f"an unknown kind {kind!r}" if kind else "no kind"
    log.error("node certificate %s has %s: it admits nobody; %s", path, what, _MIGRATION)


def create_node_keys(
    directory: Path, name: str, endpoint: str | None = None, *, kind: str
) -> tuple[Path, Path]:
    """Write ``<name>.key`` (public, with ``kind`` and ``endpoint``) and ``<name>.key_secret``
    (0600).

    Refuses to overwrite: a new key is a new name (see docs/security.md, rotation).
    """
    if not name or "/" in name or name.startswith(".") or " " in name:
        raise ConfigError(f"invalid key name {name!r}")
    if kind not in NODE_KINDS:
        raise ConfigError(f"invalid node kind {kind!r}: one of {', '.join(NODE_KINDS)}")
    directory.mkdir(parents=True, exist_ok=True)
    public_path = directory / (name + PUBLIC_SUFFIX)
    secret_path = directory / (name + SECRET_SUFFIX)
    for path in (public_path, secret_path):
        if path.exists():
            raise ConfigError(f"{path} exists; pick another name (keys are never overwritten)")
    public, secret = zmq.curve_keypair()
    metadata = f'    kind = "{kind}"\n' + (f'    endpoint = "{endpoint}"\n' if endpoint else "")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def body(banner: str, secret_line: str) -> str:
        return (
            f"#   {banner}\n#   generated by signalpost keys at {stamp}\n"
            f"metadata\n{metadata}curve\n"
            f'    public-key = "{public.decode()}"\n{secret_line}'
        )

    public_path.write_text(body("signalpost node public key: share it", ""))
    descriptor = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as secret_file:
        secret_file.write(
            body("signalpost node SECRET key: keep it on this node only", "")
            + f'    secret-key = "{secret.decode()}"\n'
        )
    return public_path, secret_path


def node_keys(settings: Settings) -> NodeKeys | None:
    """This node's keys from ``settings``; None for plaintext links (``insecure_node_links``).

    Raises ``ConfigError`` naming the settings when keys are missing or unreadable.
    """
    has_key = bool(settings.node_key_file or settings.node_secret_key)
    if settings.insecure_node_links:
        if has_key or settings.cluster_keys_dir:
            raise ConfigError(
                "insecure_node_links is set together with node keys: choose one "
                "(remove --insecure-node-links to use the keys)"
            )
        log.warning(
            "INSECURE: node links are plaintext and unauthenticated (insecure_node_links): "
            "anything that reaches a ZeroMQ port can forge envelopes. Never use this on a "
            "network others can reach; see docs/security.md"
        )
        return None
    if not has_key or not settings.cluster_keys_dir:
        raise ConfigError(
            "node links need CurveZMQ keys: set node_key_file (or node_secret_key) and "
            "cluster_keys_dir (make them with `signalpost keys`), or run with "
            "--insecure-node-links (plaintext; a closed test network only)"
        )
    if settings.node_key_file and settings.node_secret_key:
        raise ConfigError("set node_key_file or node_secret_key, not both")
    if settings.node_secret_key:
        secret = settings.node_secret_key.encode()
        if not _valid_key(secret):
            raise ConfigError("node_secret_key is not a 40-character Z85 CurveZMQ secret key")
    else:
        assert settings.node_key_file is not None
        try:
            _, found, _ = _parse_certificate(Path(settings.node_key_file))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read node_key_file {settings.node_key_file}: {exc}") from exc
        if found is None or not _valid_key(found):
            raise ConfigError(
                f"node_key_file {settings.node_key_file} holds no secret key "
                f"(give the {SECRET_SUFFIX} file, not the {PUBLIC_SUFFIX} one)"
            )
        secret = found
    directory = Path(settings.cluster_keys_dir)
    if not directory.is_dir():
        raise ConfigError(f"cluster_keys_dir {directory} is not a directory")
    public = zmq.curve_public(secret)
    trusted = read_trusted(directory)
    if trusted.kindless:
        raise ConfigError(
            f"cluster_keys_dir {directory} holds certificates without a node kind "
            f"({', '.join(trusted.kindless)}), made before kinds existed: for each, " + _MIGRATION
        )
    if public not in trusted.keys:
        log.warning(
            "this node's public key %s has no file in cluster_keys_dir %s: other nodes will "
            "refuse its links",
            public.decode(),
            directory,
        )
    return NodeKeys(public, secret, directory)


def key_name(keys: NodeKeys) -> str | None:
    """The name this node's public key has in the cluster keys directory (the file's),
    which is the routing id its links must use (``speaks_as``); None if it has no file."""
    user_id = read_trusted(keys.cluster_dir).user_ids.get(keys.public)
    return None if user_id is None else user_id.split(" ")[1]


def edge_id_for(settings: Settings, keys: NodeKeys | None) -> str | None:
    """An edge's id: ``node_id``, else its key's name. Raises ``ConfigError`` when they
    differ: the brokers would refuse every frame of the edge (its key speaks for another)."""
    name = None if keys is None else key_name(keys)
    if settings.node_id and name and settings.node_id != name:
        raise ConfigError(
            f"node_id {settings.node_id!r} is not the name of this node's key in "
            f"cluster_keys_dir ({name!r}): other nodes take its frames only under that name; "
            "leave node_id unset or rename the key file"
        )
    return settings.node_id or name


def serve_curve(socket: zmq.Socket[Any], keys: NodeKeys) -> None:
    """Make a socket that binds a CurveZMQ server checked by ZAP (set before ``bind``)."""
    socket.setsockopt(zmq.CURVE_SERVER, 1)
    socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    socket.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())


def dial_curve(
    socket: zmq.Socket[Any], keys: NodeKeys, endpoint: str, kind: str | None = None
) -> bool:
    """Make a socket a CurveZMQ client of the node at ``endpoint`` (before ``connect``).

    False (logged, counted) when the cluster keys directory names no key for ``endpoint``,
    or (``kind`` given) the key it names is another kind of node's: the caller must not
    connect.
    """
    trusted = read_trusted(keys.cluster_dir)
    server = trusted.servers.get(endpoint)
    if server is not None and kind is not None:
        found = kind_of(trusted.user_ids.get(server, ""))
        if found != kind:
            metrics.NODE_LINKS_REFUSED.labels("wrong_kind").inc()
            log.error(
                "not dialling %s as a %s: the certificate in %s naming this endpoint is a %s's",
                endpoint,
                kind,
                keys.cluster_dir,
                found or "node of no kind",
            )
            return False
    if server is None:
        metrics.NODE_LINKS_REFUSED.labels("no_server_key").inc()
        log.error(
            "not dialling %s: no certificate in %s names this endpoint "
            "(add the node's .key file with `endpoint = %s`)",
            endpoint,
            keys.cluster_dir,
            endpoint,
        )
        return False
    socket.setsockopt(zmq.CURVE_SERVERKEY, server)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    return True


#: How often a refused key is logged again (a refused node retries every second).
_REFUSAL_LOG_INTERVAL: Final = 10.0


class NodeAuthenticator(ThreadAuthenticator):
    """ZAP for one context: admits the CurveZMQ clients whose key is in the directory.

    Runs in pyzmq's authenticator thread; it reads the directory at each handshake.
    """

    def __init__(self, context: zmq.Context[Any], directory: Path) -> None:
        super().__init__(context, log=logging.getLogger("signalpost.node_keys.zap"))
        self._directory = directory
        self._address = ""
        self._logged: dict[bytes, float] = {}

    def start(self) -> None:
        """Bind the context's ZAP handler and admit keys from the directory."""
        super().start()
        self.configure_curve_callback(ZAP_DOMAIN, self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # The address is in the request, not passed on to the key check: kept for the log.
        self._address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def curve_user_id(self, client_public_key: bytes) -> str:
        """Who the admitted key is: a ROUTER takes a node's messages only under the names
        this allows (``speaks_as``), so a node cannot send as another."""
        key = z85.encode(client_public_key)
        return read_trusted(self._directory).user_ids.get(key, "")

    def callback(self, domain: str, key: bytes) -> bool:
        """The ZAP credentials check (pyzmq's provider protocol): is ``key`` trusted?"""
        if key in read_trusted(self._directory).keys:
            return True
        metrics.NODE_LINKS_REFUSED.labels("unknown_key").inc()
        now = time.monotonic()
        if now - self._logged.get(key, -_REFUSAL_LOG_INTERVAL) >= _REFUSAL_LOG_INTERVAL:
            if len(self._logged) >= 10_000:
                self._logged.clear()
            self._logged[key] = now
            log.warning(
                "refused a node link from %s: public key %s is not in %s "
                "(counted in signalpost_node_links_refused_total)",
                self._address,
                key.decode(errors="replace"),
                self._directory,
            )
        return False


_HANDSHAKE_FAILURES: Final = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def handshake_failure(event: int, value: int, *, server: bool) -> str | None:
    """The ``signalpost_node_links_refused_total`` reason of a failed handshake, as a
    socket's monitor reports it; None for what is counted elsewhere or not a failure.

    A ROUTER (``server``) sees a plaintext peer as a mechanism mismatch and a peer that
    dialled with another server key (or sent garbage) as a cryptographic error; a ZAP
    refusal is counted by the authenticator. A DEALER sees a ZAP refusal of its own key
    as an authentication failure, and a server that does not hold the key it expected
    (or runs without keys) as a failure without detail.
    """
    if server:
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                return "plaintext"
            return "bad_handshake"
        return None
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "refused_by_server"
    if event in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
        return "server_unverified"
    return None


_HANDSHAKE_LOGS: Final = {
    "plaintext": "a node tried a plaintext link to %s (no CurveZMQ keys): refused",
    "bad_handshake": "a CurveZMQ handshake on %s failed (dialled with another server key, "
    "or garbage): refused",
    "refused_by_server": "%s refused this node's key: add its public key to the cluster "
    "keys directory of that node",
    "server_unverified": "the CurveZMQ handshake with %s failed: the node there does not hold "
    "the key the cluster keys directory names for it, or runs without keys",
}


class HandshakeWatch:
    """Logs and counts the failed CurveZMQ handshakes of one socket (its monitor).

    Only handshake failures are monitored; each is counted in
    ``signalpost_node_links_refused_total`` and logged at most once per reason per 10 s
    (a refused peer retries every second).
    """

    def __init__(self, socket: zmq.Socket[Any], describe: str, *, server: bool) -> None:
        self._socket = socket
        self._monitor: zmq.Socket[Any] = socket.get_monitor_socket(_HANDSHAKE_FAILURES)
        self._describe = describe
        self._server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._logged: dict[str, float] = {}

    def start(self) -> None:
        """Watch from the running event loop (the monitor's descriptor, like FastSocket)."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(int(self._monitor.getsockopt(zmq.FD)), self._drain)
        self._loop.call_soon(self._drain)  # events may already wait: the fd is edge-triggered

    def _drain(self) -> None:
        if self._monitor.closed:
            return
        while True:
            try:
                parts = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = monitor.parse_monitor_message(parts)
            reason = handshake_failure(
                int(event["event"]), int(event["value"]), server=self._server
            )
            if reason is None:
                continue
            metrics.NODE_LINKS_REFUSED.labels(reason).inc()
            now = time.monotonic()
            if now - self._logged.get(reason, -_REFUSAL_LOG_INTERVAL) >= _REFUSAL_LOG_INTERVAL:
                self._logged[reason] = now
                log.warning(
                    _HANDSHAKE_LOGS[reason] + " (counted in signalpost_node_links_refused_total)",
                    self._describe,
                )

    def close(self) -> None:
        """Stop watching; call before the socket is closed."""
        if self._loop is not None and not self._monitor.closed:
            self._loop.remove_reader(int(self._monitor.getsockopt(zmq.FD)))
        if not self._socket.closed:
            self._socket.disable_monitor()
        self._monitor.close(linger=0)
