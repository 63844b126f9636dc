"""compose/ stays consistent with the code: Docker cannot run here, so check what it would run.

``docker-compose.regions.yml`` (two regions, each a Consul datacenter) is checked the same
way, and for what regions need: each node in its region's datacenter, the same ``regions``
and secrets everywhere, Consul servers WAN-joined, ``wan_advertise`` endpoints with keys,
one coturn per region that its edges list.

``make-keys.sh`` is run for real (with this checkout's CLI): every node must load the key
pair its env_file gives it, trust the others' mounted public keys, and find the server
key of every endpoint it dials.

Each signalpost service's command must parse with the real CLI and its environment must load
into ``Settings``; the edges must dial the endpoints the brokers and presence bind; coturn's
config must accept the TURN secret the edges sign with. The coturn config is also started
with the real ``turnserver`` and must allocate a relay for credentials signalpost mints.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from signalpost.auth import turn_credentials
from signalpost.cli import build_parser
from signalpost.config import ENV_PREFIX, Settings, load_settings
from signalpost.node_keys import node_keys, read_trusted
from tests.binaries import require_module
from tests.coturn import run_coturn

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
SIGNALPOST_KINDS = {"edge", "broker", "presence"}


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return loaded


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _signalpost_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in _services().items()
        if service.get("command", [None])[0] in SIGNALPOST_KINDS
    }


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _turn_conf() -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    for line in (COMPOSE / "turnserver.conf").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            options.setdefault(key, []).append(value)
    return options


def test_the_topology_is_complete() -> None:
    kinds = [service["command"][0] for service in _signalpost_services().values()]
    assert sorted(kinds) == ["broker", "broker", "edge", "edge", "presence", "presence"]
    assert {"consul", "coturn"} <= _services().keys()


def test_depends_on_names_existing_services() -> None:
    for name, service in _services().items():
        for dependency in service.get("depends_on", []):
            assert dependency in _services(), f"{name} depends on unknown {dependency}"


def test_the_image_builds_from_files_that_exist() -> None:
    for service in _signalpost_services().values():
        build = service["build"]
        context = (COMPOSE / build["context"]).resolve()
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file()
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (context / source).exists(), f"Dockerfile copies missing {source}"


@pytest.mark.parametrize("name", sorted(_signalpost_services()))
def test_each_service_command_and_environment_are_valid(name: str) -> None:
    service = _signalpost_services()[name]
    args = build_parser().parse_args(service["command"])
    assert args.command in SIGNALPOST_KINDS
    environment = {key: str(value) for key, value in service["environment"].items()}
    fields = {field.name for field in msgspec.structs.fields(Settings)}
    for key in environment:
        assert key.startswith(ENV_PREFIX), key
        assert key.removeprefix(ENV_PREFIX).lower() in fields, f"{name}: unknown setting {key}"
    settings = load_settings(environ=environment)
    assert settings.jwt_secret == _services()["edge-1"]["environment"]["SIGNALPOST_JWT_SECRET"]


def test_edges_dial_what_brokers_and_presence_bind() -> None:
    services = _signalpost_services()
    binds = {service["command"][0]: [] for service in services.values()}  # kind -> bound endpoints
    for service in services.values():
        if service["command"][0] != "edge":
            binds[service["command"][0]].append(_option(service["command"], "--bind"))
    for name, service in services.items():
        settings = load_settings(environ={k: str(v) for k, v in service["environment"].items()})
        assert sorted(settings.broker_endpoints) == sorted(binds["broker"]), name
        assert sorted(settings.presence_endpoints) == sorted(binds["presence"]), name


def _make_keys(keys_dir: Path, *topology: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(COMPOSE / "make-keys.sh"), *topology],
        env={
            **os.environ,
            "SIGNALPOST": f"{sys.executable} -m signalpost.cli",
            "KEYS_DIR": str(keys_dir),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_node_gets_keys_that_admit_and_name_each_other(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    done = _make_keys(keys_dir)
    assert done.returncode == 0, done.stderr
    services = _signalpost_services()
    loaded = {}
    for name, service in services.items():
        # The container paths, as the volume mounts map them to the host.
        (mount,) = service["volumes"]
        host, container, mode = mount.split(":")
        assert host == "./keys/public" and mode == "ro", name
        env_file = service["env_file"]
        assert env_file.startswith("keys/"), name
        environment = {k: str(v) for k, v in service["environment"].items()}
        for line in (keys_dir / env_file.removeprefix("keys/")).read_text().splitlines():
            key, _, value = line.partition("=")
            environment[key] = value
        assert environment["SIGNALPOST_CLUSTER_KEYS_DIR"] == container, name
        environment["SIGNALPOST_CLUSTER_KEYS_DIR"] = str(keys_dir / "public")
        keys = node_keys(load_settings(environ=environment))
        assert keys is not None, name
        loaded[name] = (keys, load_settings(environ=environment))
    assert len({keys.public for keys, _ in loaded.values()}) == len(services)  # one pair each
    trusted = read_trusted(keys_dir / "public")
    assert trusted.keys == {keys.public for keys, _ in loaded.values()}
    for name, (keys, settings) in loaded.items():
        command = services[name]["command"]
        if command[0] != "edge":  # dialled at what it binds, with its own key
            assert trusted.servers[_option(command, "--bind")] == keys.public, name
        for endpoint in [*settings.broker_endpoints, *settings.presence_endpoints]:
            assert endpoint in trusted.servers, f"{name} dials {endpoint}: no server key"
    assert (keys_dir / "edge-1.env").stat().st_mode & 0o077 == 0  # secrets: owner only
    again = _make_keys(keys_dir)
    assert again.returncode != 0 and "exists" in again.stderr  # never overwritten


def test_coturn_accepts_the_secret_the_edges_sign_with() -> None:
    conf = _turn_conf()
    assert "use-auth-secret" in conf
    secrets = conf["static-auth-secret"]
    assert len(secrets) == 2, "rotation: the new secret and the old one"
    coturn = _services()["coturn"]
    published = {port.split(":")[0] for port in coturn["ports"]}
    relay_range = f"{conf['min-port'][0]}-{conf['max-port'][0]}"
    assert relay_range in published
    for name, service in _signalpost_services().items():
        if service["command"][0] != "edge":
            continue
        settings = load_settings(environ={k: str(v) for k, v in service["environment"].items()})
        assert settings.turn_secret in secrets, name
        for url in settings.turn_urls + settings.stun_urls:
            match = re.match(r"^(?:turn|stun):[^:]+:(\d+)", url)
            assert match and match[1] == conf["listening-port"][0], url


@pytest.mark.coturn
def test_the_coturn_config_runs_and_allocates_for_minted_credentials(tmp_path: Path) -> None:
    aioice_turn = require_module("aioice.turn", "pip install -e '.[webrtc]'")  # from aiortc
    secret = load_settings(
        environ={k: str(v) for k, v in _services()["edge-1"]["environment"].items()}
    ).turn_secret
    assert secret is not None

    async def allocate(host: str, port: int) -> tuple[str, int]:
        username, password = turn_credentials(secret, "alice", 60, time.time())
        transport, _ = await aioice_turn.create_turn_endpoint(
            asyncio.DatagramProtocol, (host, port), username, password, lifetime=60
        )
        relayed: tuple[str, int] = transport.get_extra_info("sockname")
        transport.close()
        return relayed

    # The file's own secrets only (none on the command line); loopback ports override it.
    with run_coturn(tmp_path, (), config=COMPOSE / "turnserver.conf") as server:
        host, port = asyncio.run(asyncio.wait_for(allocate(server.host, server.port), 10))
    assert host == server.host and server.min_port <= port <= server.max_port


# ------------------------------------------------------------------ two regions

REGIONS_FILE = COMPOSE / "docker-compose.regions.yml"
REGIONS = ["eu", "us"]


def _regions_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(REGIONS_FILE.read_text())["services"]
    return services


def _regions_signalpost() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in _regions_services().items()
        if service.get("command", [None])[0] in SIGNALPOST_KINDS
    }


def _settings_of(service: dict[str, Any]) -> Settings:
    return load_settings(environ={k: str(v) for k, v in service["environment"].items()})


def test_regions_each_region_is_a_whole_cluster_with_its_consul_datacenter() -> None:
    services = _regions_services()
    for region in REGIONS:
        kinds = sorted(
            s["command"][0]
            for name, s in _regions_signalpost().items()
            if name.startswith(f"{region}-")
        )
        assert kinds == ["broker", "broker", "edge", "edge", "presence"], region
        consul = services[f"consul-{region}"]["command"]
        assert "-server" in consul and f"-datacenter={region}" in consul
        assert {f"coturn-{region}"} <= services.keys()
    # The second datacenter's server joins the first's over the WAN.
    assert "-retry-join-wan=consul-eu" in services["consul-us"]["command"]
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"


@pytest.mark.parametrize("name", sorted(_regions_signalpost()))
def test_regions_each_service_command_and_environment_are_valid(name: str) -> None:
    service = _regions_signalpost()[name]
    args = build_parser().parse_args(service["command"])
    assert args.command in SIGNALPOST_KINDS
    assert args.id == name
    fields = {field.name for field in msgspec.structs.fields(Settings)}
    for key in service["environment"]:
        assert key.startswith(ENV_PREFIX), key
        assert key.removeprefix(ENV_PREFIX).lower() in fields, f"{name}: unknown setting {key}"
    settings = _settings_of(service)
    region = name.split("-", 1)[0]
    assert settings.region == region
    assert settings.regions == REGIONS
    assert settings.consul_addr == f"consul-{region}:8500"
    edge = _regions_signalpost()["eu-edge-1"]["environment"]
    assert settings.jwt_secret == edge["SIGNALPOST_JWT_SECRET"]
    # The region's own nodes only: a region discovers the other through Consul.
    dialled = [*settings.broker_endpoints, *settings.presence_endpoints]
    assert all(endpoint.startswith(f"tcp://{region}-") for endpoint in dialled), name
    if args.command != "edge":
        # What the other region's nodes dial: here the node's own endpoint (one network).
        assert settings.wan_advertise == _option(service["command"], "--bind"), name


def test_regions_edges_dial_what_their_regions_brokers_and_presence_bind() -> None:
    services = _regions_signalpost()
    for region in REGIONS:
        of_region = {n: s for n, s in services.items() if n.startswith(f"{region}-")}
        binds: dict[str, list[str]] = {"broker": [], "presence": []}
        for service in of_region.values():
            if service["command"][0] != "edge":
                binds[service["command"][0]].append(_option(service["command"], "--bind"))
        for name, service in of_region.items():
            settings = _settings_of(service)
            assert sorted(settings.broker_endpoints) == sorted(binds["broker"]), name
            assert sorted(settings.presence_endpoints) == sorted(binds["presence"]), name


def test_regions_keys_admit_every_node_of_both_regions(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    done = _make_keys(keys_dir, "regions")
    assert done.returncode == 0, done.stderr
    services = _regions_signalpost()
    loaded = {}
    tickets = set()
    for name, service in services.items():
        (mount,) = service["volumes"]
        host, container, mode = mount.split(":")
        assert host == "./keys/public" and mode == "ro", name
        environment = {k: str(v) for k, v in service["environment"].items()}
        for line in (keys_dir / service["env_file"].removeprefix("keys/")).read_text().splitlines():
            key, _, value = line.partition("=")
            environment[key] = value
        assert environment["SIGNALPOST_CLUSTER_KEYS_DIR"] == container, name
        environment["SIGNALPOST_CLUSTER_KEYS_DIR"] = str(keys_dir / "public")
        settings = load_settings(environ=environment)
        keys = node_keys(settings)
        assert keys is not None, name
        loaded[name] = (keys, settings)
        if service["command"][0] == "edge":
            assert settings.ticket_secret is None, name  # never given to an edge
        else:
            tickets.add(settings.ticket_secret)
    assert len(tickets) == 1 and None not in tickets  # one secret for both regions
    trusted = read_trusted(keys_dir / "public")
    assert trusted.keys == {keys.public for keys, _ in loaded.values()}
    assert len(trusted.keys) == len(services)
    for name, (keys, settings) in loaded.items():
        command = services[name]["command"]
        if command[0] != "edge":  # dialled at what it binds and at its wan_advertise
            assert trusted.servers[_option(command, "--bind")] == keys.public, name
            assert settings.wan_advertise is not None
            assert trusted.servers[settings.wan_advertise] == keys.public, name
        for endpoint in [*settings.broker_endpoints, *settings.presence_endpoints]:
            assert endpoint in trusted.servers, f"{name} dials {endpoint}: no server key"
    unknown = _make_keys(tmp_path / "other", "three-regions")
    assert unknown.returncode != 0 and "unknown topology" in unknown.stderr


def test_regions_each_region_has_its_coturn_that_its_edges_list() -> None:
    conf = _turn_conf()
    services = _regions_services()
    ranges = []
    for region in REGIONS:
        coturn = services[f"coturn-{region}"]
        command = coturn["command"]
        low = int(next(a for a in command if a.startswith("--min-port=")).split("=")[1])
        high = int(next(a for a in command if a.startswith("--max-port=")).split("=")[1])
        ranges.append(range(low, high + 1))
        published = [port.rsplit("/", 1)[0].split(":") for port in coturn["ports"]]
        assert [f"{low}-{high}", f"{low}-{high}"] in published, region  # relays reachable
        (turn_port,) = {host for host, inner in published if inner == conf["listening-port"][0]}
        for name, service in _regions_signalpost().items():
            if service["command"][0] != "edge" or not name.startswith(f"{region}-"):
                continue
            settings = _settings_of(service)
            assert settings.turn_secret in conf["static-auth-secret"], name
            for url in settings.turn_urls + settings.stun_urls:
                match = re.match(r"^(?:turn|stun):[^:]+:(\d+)", url)
                assert match and match[1] == turn_port, (name, url)
    assert not set(ranges[0]) & set(ranges[1])  # one host: the relay port ranges differ
