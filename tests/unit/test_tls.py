"""The edge's TLS settings: both files or neither, clear errors, reloads that keep the old
certificate when the new files are bad (edge/tls.py)."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge.tls import EdgeTls, fingerprint
from signalpost.config import load_settings
from signalpost.errors import ConfigError
from tests.tls_certs import make_cert


def _tls(**overrides: Any) -> EdgeTls | None:
    return EdgeTls.from_settings(load_settings(environ={}, **overrides))


def test_no_files_no_tls() -> None:
    assert _tls() is None


def test_the_files_come_from_the_environment(tmp_path: Path) -> None:
    files = make_cert(tmp_path, "a")
    settings = load_settings(
        environ={
            "SIGNALPOST_TLS_CERT_FILE": str(files.cert),
            "SIGNALPOST_TLS_KEY_FILE": str(files.key),
        }
    )
    tls = EdgeTls.from_settings(settings)
    assert tls is not None
    assert tls.fingerprint == files.fingerprint == fingerprint(str(files.cert))
    for context in (tls.listening, tls.current):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls.listening.sni_callback is not None  # moves each handshake to ``current``


@pytest.mark.parametrize("given", ["tls_cert_file", "tls_key_file"])
def test_one_file_without_the_other_is_refused(tmp_path: Path, given: str) -> None:
    files = make_cert(tmp_path, "a")
    path = files.cert if given == "tls_cert_file" else files.key
    missing = "tls_key_file" if given == "tls_cert_file" else "tls_cert_file"
    with pytest.raises(ConfigError, match=f"{given} is set but {missing} is not"):
        _tls(**{given: str(path)})


def _write_encrypted_key(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )


@pytest.mark.parametrize(
    ("break_files", "message"),
    [
        (lambda a, b, d: {"tls_cert_file": str(d / "nope.crt")}, r"cannot read tls_cert_file"),
        (lambda a, b, d: {"tls_key_file": str(d / "nope.key")}, r"cannot read tls_key_file"),
        (lambda a, b, d: {"tls_cert_file": str(a.key)}, r"tls_cert_file .* holds no PEM cert"),
        (lambda a, b, d: {"tls_key_file": str(a.cert)}, r"tls_key_file .* holds no PEM private"),
        (lambda a, b, d: {"tls_key_file": str(b.key)}, r"the key does not belong"),
        (lambda a, b, d: {"tls_cert_file": str(d / "cut.crt")}, r"not a valid PEM certificate"),
        (lambda a, b, d: {"tls_key_file": str(d / "locked.key")}, r"encrypted"),
    ],
    ids=["no-cert", "no-key", "key-as-cert", "cert-as-key", "other-key", "cut-cert", "encrypted"],
)
def test_bad_files_are_a_clear_error(tmp_path: Path, break_files: object, message: str) -> None:
    a, b = make_cert(tmp_path, "a"), make_cert(tmp_path, "b")
    text = a.cert.read_text()
    (tmp_path / "cut.crt").write_text(text[: len(text) // 2] + "\n-----END CERTIFICATE-----\n")
    _write_encrypted_key(tmp_path / "locked.key")
    settings = {"tls_cert_file": str(a.cert), "tls_key_file": str(a.key)}
    settings.update(break_files(a, b, tmp_path))  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message):
        _tls(**settings)


def test_a_reload_swaps_the_certificate_and_a_bad_one_keeps_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = make_cert(tmp_path, "a"), make_cert(tmp_path, "b")
    cert, key = tmp_path / "edge.crt", tmp_path / "edge.key"
    cert.write_bytes(a.cert.read_bytes())
    key.write_bytes(a.key.read_bytes())
    tls = _tls(tls_cert_file=str(cert), tls_key_file=str(key))
    assert tls is not None
    first, listening = tls.current, tls.listening

    cert.write_bytes(b.cert.read_bytes())
    key.write_bytes(b.key.read_bytes())
    assert tls.reload()
    assert tls.current is not first and tls.listening is listening
    assert tls.fingerprint == b.fingerprint

    good = tls.current
    cert.write_text("not a certificate\n")
    with caplog.at_level(logging.ERROR, "signalpost.edge.tls"):
        assert not tls.reload()
    assert tls.current is good and tls.fingerprint == b.fingerprint
    assert "still serving the previous certificate" in caplog.text
    assert "holds no PEM certificate" in caplog.text
