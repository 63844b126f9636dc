"""TLS on the edge's listener: ``wss://`` and ``https://`` served natively, reloaded on SIGHUP.

With ``tls_cert_file`` and ``tls_key_file`` set, the edge's one port (``/v1/signal``,
``/healthz``, ``/metrics``, the demo) speaks TLS only (1.2 at least). Without them it is
plain, as behind a TLS load balancer.

Reloading. The listening socket keeps one ``SSLContext`` for its whole life (asyncio
wraps each new connection with it). Its SNI callback, which OpenSSL calls in every
handshake (with or without a server name), moves the connection to ``current``: a context
built from the files at start-up or at the last good reload. So a reload only swaps which
context new handshakes use; connections already up keep the one they were made with and
are not touched. Files that cannot be loaded at a reload are logged as an error and the
previous certificate stays in use; at start-up they stop the process (``ConfigError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from signalpost.config import Settings
from signalpost.errors import ConfigError

log = logging.getLogger("signalpost.edge.tls")

#: The oldest protocol version a client may speak (TLS 1.0 and 1.1 are deprecated, RFC 8996).
MINIMUM_VERSION: Final = ssl.TLSVersion.TLSv1_2

_FIRST_CERTIFICATE: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S
)


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key, and a
    # reload would hang waiting for it: an encrypted key is refused instead.
    raise ConfigError("the key is encrypted: give the edge an unencrypted key file")


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context with the certificate chain and key of these PEM files.

    Raises ``ConfigError`` naming the file when one cannot be read or holds no PEM
    certificate (key), or when the key does not belong to the certificate.
    """
    for setting, path, marker, what in (
        ("tls_cert_file", cert_file, b"-----BEGIN CERTIFICATE-----", "PEM certificate"),
        ("tls_key_file", key_file, b"PRIVATE KEY-----", "PEM private key"),
    ):
        try:
            content = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {setting} {path!r}: {exc.strerror or exc}") from None
        if marker not in content:
            raise ConfigError(f"{setting} {path!r} holds no {what}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.set_alpn_protocols(["http/1.1"])
    files = f"tls_cert_file {cert_file!r} and tls_key_file {key_file!r}"
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except ConfigError as exc:
        raise ConfigError(f"cannot load {files}: {exc}") from None
    except OSError as exc:  # ssl.SSLError is an OSError too
        if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
            detail = "the key does not belong to the certificate"
        elif isinstance(exc, ssl.SSLError):
            detail = f"not a valid PEM certificate chain and its private key ({exc})"
        else:
            detail = exc.strerror or str(exc)
        raise ConfigError(f"cannot load {files}: {detail}") from None
    return context


def fingerprint(cert_file: str) -> str:
    """SHA-256 of the first certificate in ``cert_file`` (the leaf), as hex; "" if none."""
    try:
        match = _FIRST_CERTIFICATE.search(Path(cert_file).read_bytes())
    except OSError:
        return ""
    if match is None:
        return ""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(match.group().decode("ascii"))).hexdigest()


class EdgeTls:
    """The listening context and the certificate new handshakes get (``reload`` swaps it)."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.current = server_context(cert_file, key_file)
        #: Given to ``create_server``: every handshake starts here and moves to ``current``.
        self.listening = server_context(cert_file, key_file)
        self.listening.sni_callback = self._select
        self.fingerprint = fingerprint(cert_file)
        self.reloads = 0
        log.info("TLS certificate %s loaded (SHA-256 %s)", cert_file, self.fingerprint)

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgeTls | None:
        """The edge's TLS, or None for a plain listener; ``ConfigError`` if half set or bad."""
        cert_file, key_file = settings.tls_cert_file, settings.tls_key_file
        if not cert_file and not key_file:
            return None
        if not cert_file or not key_file:
            given, missing = ("tls_cert_file", "tls_key_file")
            if key_file:
                given, missing = missing, given
            raise ConfigError(
                f"{given} is set but {missing} is not: set both for TLS on the edge "
                "(SIGNALPOST_TLS_CERT_FILE, SIGNALPOST_TLS_KEY_FILE), or neither for plain "
                "ws (e.g. behind a TLS load balancer)"
            )
        return cls(cert_file, key_file)

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, _: object) -> None:
        current = self.current
        if ssl_object.context is not current:
            ssl_object.context = current

    def reload(self) -> bool:
        """Read the files again; new handshakes get them. Bad files: logged, nothing changes."""
        try:
            context = server_context(self.cert_file, self.key_file)
        except ConfigError as exc:
            log.error("TLS reload failed, still serving the previous certificate: %s", exc)
            return False
        self.current = context
        self.fingerprint = fingerprint(self.cert_file)
        self.reloads += 1
        log.info("TLS certificate %s reloaded (SHA-256 %s)", self.cert_file, self.fingerprint)
        return True


@contextlib.contextmanager
def reload_on_sighup(tls: EdgeTls | None) -> Iterator[None]:
    """While inside, SIGHUP reloads ``tls`` (nothing is installed for a plain edge)."""
    if tls is None:
        yield
        return
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, tls.reload)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
