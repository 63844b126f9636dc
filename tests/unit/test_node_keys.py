"""Node keys: files ``signalpost keys`` writes, what a node loads, and when it refuses to start."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from signalpost.config import load_settings
from signalpost.errors import ConfigError
from signalpost.node_keys import (
    PUBLIC_SUFFIX,
    SECRET_SUFFIX,
    create_node_keys,
    edge_id_for,
    key_name,
    kind_of,
    node_keys,
    node_user_id,
    read_trusted,
    speaks_as,
)
from signalpost.tickets import TICKET_SECRET_FILE, seat_tickets

CLI = [sys.executable, "-m", "signalpost.cli"]


def test_keys_files_hold_the_pair_and_the_endpoint(tmp_path: Path) -> None:
    public_path, secret_path = create_node_keys(
        tmp_path, "broker-1", "tcp://10.0.0.21:5555", kind="broker"
    )
    assert public_path == tmp_path / ("broker-1" + PUBLIC_SUFFIX)
    assert secret_path.stat().st_mode & 0o777 == 0o600
    public, secret = zmq.auth.load_certificate(secret_path)  # pyzmq reads our files
    assert secret is not None and zmq.curve_public(secret) == public
    assert zmq.auth.load_certificate(public_path) == (public, None)  # no secret in .key
    trusted = read_trusted(tmp_path)
    assert trusted.keys == {public}
    assert trusted.servers == {"tcp://10.0.0.21:5555": public}
    with pytest.raises(ConfigError, match="exists"):
        create_node_keys(tmp_path, "broker-1", kind="broker")  # never overwritten


def test_the_newest_certificate_for_an_endpoint_wins(tmp_path: Path) -> None:
    old, _ = create_node_keys(tmp_path, "old", "tcp://b:1", kind="broker")
    new, _ = create_node_keys(tmp_path, "new", "tcp://b:1", kind="broker")
    os.utime(old, (1_000_000, 1_000_000))
    new_key, _ = zmq.auth.load_certificate(new)
    assert read_trusted(tmp_path).servers == {"tcp://b:1": new_key}


def test_a_node_loads_its_keys_from_a_file_or_the_environment(tmp_path: Path) -> None:
    _, secret_path = create_node_keys(tmp_path, "edge-1", kind="edge")
    public, secret = zmq.auth.load_certificate(secret_path)
    assert secret is not None
    from_file = node_keys(
        load_settings(
            environ={
                "SIGNALPOST_NODE_KEY_FILE": str(secret_path),
                "SIGNALPOST_CLUSTER_KEYS_DIR": str(tmp_path),
            }
        )
    )
    from_env = node_keys(
        load_settings(
            environ={
                "SIGNALPOST_NODE_SECRET_KEY": secret.decode(),
                "SIGNALPOST_CLUSTER_KEYS_DIR": str(tmp_path),
            }
        )
    )
    assert from_file is not None and from_env is not None
    assert (from_file.public, from_file.secret) == (from_env.public, from_env.secret)
    assert (from_file.public, from_file.secret) == (public, secret)


@dataclass(frozen=True)
class KeyFiles:
    secret: str
    public: str
    directory: str


CASES: list[tuple[Callable[[KeyFiles], dict[str, object]], str]] = [
    (lambda f: {}, "node_key_file .*cluster_keys_dir.*--insecure-node-links"),
    (lambda f: {"node_key_file": f.secret}, "cluster_keys_dir"),
    (lambda f: {"cluster_keys_dir": f.directory}, "node_key_file"),
    (lambda f: {"node_secret_key": "short", "cluster_keys_dir": f.directory}, "node_secret_key"),
    (lambda f: {"node_key_file": f.public, "cluster_keys_dir": f.directory}, "no secret key"),
    (lambda f: {"node_key_file": f.directory + "/x", "cluster_keys_dir": f.directory}, "cannot"),
    (lambda f: {"node_key_file": f.secret, "cluster_keys_dir": f.secret}, "not a directory"),
    (lambda f: {"insecure_node_links": True, "cluster_keys_dir": f.directory}, "choose one"),
]


@pytest.mark.parametrize(("overrides", "message"), CASES)
def test_missing_or_bad_keys_are_refused_naming_the_setting(
    tmp_path: Path, overrides: Callable[[KeyFiles], dict[str, object]], message: str
) -> None:
    public_path, secret_path = create_node_keys(tmp_path, "n", kind="edge")
    files = KeyFiles(str(secret_path), str(public_path), str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        node_keys(load_settings(environ={}, **overrides(files)))


def test_insecure_links_are_plaintext_and_logged_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert node_keys(load_settings(environ={}, insecure_node_links=True)) is None
    assert any(
        "INSECURE" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    )


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIGNALPOST_")}
    return subprocess.run(
        [*CLI, *args], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("kind", ["edge", "broker", "presence"])
def test_a_node_without_keys_or_the_flag_exits_with_a_clear_error(kind: str) -> None:
    secret = {"SIGNALPOST_JWT_SECRET": "a-test-secret-0123456789abcdef"}
    args = [kind, "--id", f"{kind}-x"] + ([] if kind == "edge" else ["--bind", "tcp://127.0.0.1:*"])
    done = _cli(*args, env=secret)
    assert done.returncode == 2, done.stderr
    assert "node_key_file" in done.stderr and "--insecure-node-links" in done.stderr


@pytest.mark.parametrize("kind", ["edge", "broker", "cluster"])
def test_an_edge_or_broker_with_the_public_jwt_secret_refuses_to_start(
    kind: str, tmp_path: Path
) -> None:
    state = str(tmp_path / "cluster.json")
    args = {"edge": ["edge"], "broker": ["broker"], "cluster": ["cluster", "--state", state]}
    done = _cli(*args[kind], "--insecure-node-links", env={})
    assert done.returncode == 2, done.stderr
    assert "jwt_secret" in done.stderr and "public default" in done.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was started


def test_signalpost_keys_writes_a_pair(tmp_path: Path) -> None:
    done = _cli(
        "keys",
        "--dir",
        str(tmp_path),
        "--name",
        "presence-1",
        "--kind",
        "presence",
        "--endpoint",
        "tcp://p:5565",
        env={},
    )
    assert done.returncode == 0, done.stderr
    public = (tmp_path / "presence-1.key").read_text()
    assert "secret-key" not in public and 'endpoint = "tcp://p:5565"' in public
    assert 'kind = "presence"' in public
    assert (tmp_path / ("presence-1" + SECRET_SUFFIX)).stat().st_mode & 0o777 == 0o600


def test_a_key_speaks_only_under_its_files_name_and_its_endpoint(tmp_path: Path) -> None:
    create_node_keys(tmp_path, "broker-1", "tcp://10.0.0.21:5555", kind="broker")
    create_node_keys(tmp_path, "edge-1", kind="edge")
    trusted = read_trusted(tmp_path)
    by_name = {user_id.split(" ")[1]: user_id for user_id in trusted.user_ids.values()}
    assert by_name == {
        "broker-1": node_user_id("broker-1", "tcp://10.0.0.21:5555", "broker"),
        "edge-1": node_user_id("edge-1", None, "edge"),
    }
    broker, edge = by_name["broker-1"], by_name["edge-1"]
    assert speaks_as(broker, "broker-1") and speaks_as(broker, "tcp://10.0.0.21:5555")
    assert speaks_as(edge, "edge-1")
    assert not speaks_as(edge, "broker-1") and not speaks_as(edge, "edge-2")
    assert not speaks_as(edge, "") and not speaks_as("", "edge-1")


def test_an_edges_id_is_its_keys_name_and_another_is_refused(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster"
    cluster.mkdir()
    _, secret = create_node_keys(cluster, "edge-7", kind="edge")
    environ = {"SIGNALPOST_NODE_KEY_FILE": str(secret), "SIGNALPOST_CLUSTER_KEYS_DIR": str(cluster)}
    keys = node_keys(load_settings(environ=environ))
    assert keys is not None and key_name(keys) == "edge-7"
    assert edge_id_for(load_settings(environ=environ), keys) == "edge-7"
    same = load_settings(environ={**environ, "SIGNALPOST_NODE_ID": "edge-7"})
    assert edge_id_for(same, keys) == "edge-7"
    other = load_settings(environ={**environ, "SIGNALPOST_NODE_ID": "edge-8"})
    with pytest.raises(ConfigError, match="node_id 'edge-8' is not the name of this node's key"):
        edge_id_for(other, keys)
    assert edge_id_for(other, None) == "edge-8"  # plaintext: nothing to bind to


def test_a_keys_kind_is_in_its_user_id_and_a_key_without_one_admits_nobody(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    create_node_keys(tmp_path, "presence-1", "tcp://p:1", kind="presence")
    _, secret = create_node_keys(tmp_path, "edge-1", kind="edge")
    trusted = read_trusted(tmp_path)
    kinds = {kind_of(user_id) for user_id in trusted.user_ids.values()}
    assert kinds == {"presence", "edge"}
    assert kind_of("") == "" and kind_of("emperor edge-1") == ""
    with pytest.raises(ConfigError, match="kind"):
        create_node_keys(tmp_path, "x", kind="emperor")
    # A certificate made before kinds (no ``kind`` metadata): not admitted, logged, and a
    # node refuses to start over such a directory, saying how to fix it.
    old = tmp_path / "old-broker.key"
    old.write_text((tmp_path / "presence-1.key").read_text().replace('    kind = "presence"\n', ""))
    with caplog.at_level(logging.ERROR):
        trusted = read_trusted(tmp_path)
    assert trusted.kindless == ("old-broker.key",) and len(trusted.keys) == 2
    assert "old-broker.key has no kind" in caplog.text
    environ = {
        "SIGNALPOST_NODE_KEY_FILE": str(secret),
        "SIGNALPOST_CLUSTER_KEYS_DIR": str(tmp_path),
    }
    with pytest.raises(ConfigError, match=r"old-broker.key.*kind = .edge."):
        node_keys(load_settings(environ=environ))


@pytest.mark.parametrize("kind", ["broker", "presence"])
def test_a_broker_or_presence_with_keys_needs_the_ticket_secret(kind: str, tmp_path: Path) -> None:
    _, secret = create_node_keys(tmp_path, kind, "tcp://127.0.0.1:1", kind=kind)
    env = {
        "SIGNALPOST_JWT_SECRET": "a-test-secret-0123456789abcdef",
        "SIGNALPOST_NODE_KEY_FILE": str(secret),
        "SIGNALPOST_CLUSTER_KEYS_DIR": str(tmp_path),
    }
    done = _cli(kind, "--id", f"{kind}-x", "--bind", "tcp://127.0.0.1:*", env=env)
    assert done.returncode == 2, done.stderr
    assert "ticket_secret" in done.stderr and "--ticket-secret" in done.stderr
    short = {**env, "SIGNALPOST_TICKET_SECRET": "short"}
    done = _cli(kind, "--id", f"{kind}-x", "--bind", "tcp://127.0.0.1:*", env=short)
    assert done.returncode == 2 and "too short" in done.stderr, done.stderr


def test_signalpost_keys_writes_a_ticket_secret_once(tmp_path: Path) -> None:
    done = _cli("keys", "--dir", str(tmp_path), "--ticket-secret", env={})
    assert done.returncode == 0, done.stderr
    path = tmp_path / TICKET_SECRET_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    secret = path.read_text().strip()
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert seat_tickets(load_settings(environ={}, ticket_secret=secret), True) is not None
    again = _cli("keys", "--dir", str(tmp_path), "--ticket-secret", env={})
    assert again.returncode == 2 and "never overwritten" in again.stderr
    assert path.read_text().strip() == secret
    assert seat_tickets(load_settings(environ={}), False) is None  # plaintext: unchecked
