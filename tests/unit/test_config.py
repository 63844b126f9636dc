"""load_settings: defaults < TOML file < SIGNALPOST_* variables < explicit overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from signalpost.config import DEV_JWT_SECRET, Settings, load_settings, settings_table
from signalpost.errors import ConfigError, SignalpostError

# PROTOCOL.md "Configuration contract": each name, a value, the field, the typed result.
CONTRACT: list[tuple[str, str, str, Any]] = [
    ("SIGNALPOST_JWT_SECRET", "env-jwt-secret", "jwt_secret", "env-jwt-secret"),
    ("SIGNALPOST_TURN_SECRET", "env-turn-secret", "turn_secret", "env-turn-secret"),
    (
        "SIGNALPOST_TURN_URLS",
        "turn:127.0.0.1:3478?transport=udp,turns:turn.example:5349?transport=tcp",
        "turn_urls",
        ["turn:127.0.0.1:3478?transport=udp", "turns:turn.example:5349?transport=tcp"],
    ),
    (
        "SIGNALPOST_STUN_URLS",
        "stun:stun.example:3478,stun:127.0.0.1:3478",
        "stun_urls",
        ["stun:stun.example:3478", "stun:127.0.0.1:3478"],
    ),
    ("SIGNALPOST_TURN_TTL", "600", "turn_ttl", 600),
    ("SIGNALPOST_ROOM_CAPACITY", "8", "room_capacity", 8),
    ("SIGNALPOST_RESUME_WINDOW", "12.5", "resume_window", 12.5),
    ("SIGNALPOST_HELLO_TIMEOUT", "2", "hello_timeout", 2.0),
    ("SIGNALPOST_MAX_FRAME", "1024", "max_frame", 1024),
]

TOML_VALUES = """
jwt_secret = "toml-jwt-secret"
turn_secret = "toml-turn-secret"
turn_urls = ["turn:toml:3478"]
stun_urls = ["stun:toml:3478"]
turn_ttl = 100
room_capacity = 3
resume_window = 40.0
hello_timeout = 9
max_frame = 2048
"""


def write(tmp_path: Path, text: str, name: str = "signalpost.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ defaults


def test_defaults_follow_the_protocol() -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.room_capacity == 2
    assert settings.resume_window == 30.0
    assert settings.hello_timeout == 5.0
    assert settings.max_frame == 64 * 1024
    assert settings.jwt_secret == DEV_JWT_SECRET
    assert settings.turn_secret is None
    assert settings.turn_urls == [] and settings.stun_urls == []
    assert isinstance(settings.turn_ttl, int) and settings.turn_ttl > 0


def test_settings_are_frozen() -> None:
    settings = load_settings(environ={})
    with pytest.raises(AttributeError):
        settings.room_capacity = 5  # type: ignore[misc]


def test_the_process_environment_is_not_read_when_environ_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [n for n in os.environ if n.startswith("SIGNALPOST_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SIGNALPOST_ROOM_CAPACITY", "9")
    assert load_settings(environ={}).room_capacity == 2
    assert load_settings().room_capacity == 9  # the default is os.environ


# ---------------------------------------------------------------------------------- TOML


def test_toml_with_a_signalpost_table(tmp_path: Path) -> None:
    path = write(tmp_path, "[signalpost]\n" + TOML_VALUES + "\n[other_tool]\nkey = 1\n")
    settings = load_settings(path, environ={})
    assert settings.jwt_secret == "toml-jwt-secret"
    assert settings.turn_secret == "toml-turn-secret"
    assert settings.turn_urls == ["turn:toml:3478"]
    assert settings.stun_urls == ["stun:toml:3478"]
    assert settings.turn_ttl == 100
    assert settings.room_capacity == 3
    assert settings.resume_window == 40.0
    assert settings.hello_timeout == 9.0
    assert settings.max_frame == 2048


def test_toml_without_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, TOML_VALUES)
    settings = load_settings(str(path), environ={})
    assert settings.room_capacity == 3
    assert settings.turn_urls == ["turn:toml:3478"]
    assert settings.host == Settings().host  # unset keys keep their default


def test_the_file_can_be_named_by_signalpost_config(tmp_path: Path) -> None:
    path = write(tmp_path, "room_capacity = 6\n")
    assert load_settings(environ={"SIGNALPOST_CONFIG": str(path)}).room_capacity == 6
    # An explicit path wins over the variable.
    other = write(tmp_path, "room_capacity = 7\n", "other.toml")
    assert load_settings(other, environ={"SIGNALPOST_CONFIG": str(path)}).room_capacity == 7


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("room_capcity = 3\n", id="typo"),
        pytest.param("[signalpost]\nroom_capacity = 3\nbogus = true\n", id="in-table"),
        pytest.param("[rooms]\ncapacity = 3\n", id="unknown-table"),
    ],
)
def test_an_unknown_toml_key_is_a_config_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path, text), environ={})


@pytest.mark.parametrize(
    "text",
    [
        'room_capacity = "two"\n',
        'turn_urls = "turn:x:3478"\n',
        "turn_urls = [1, 2]\n",
        "max_frame = 1.5\n",
        "resume_window = [30]\n",
        "jwt_secret = 5\n",
        "dev_tokens = 3\n",
    ],
)
def test_a_toml_value_of_the_wrong_type_is_a_config_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path, text), environ={})


def test_a_broken_toml_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path, "room_capacity = = 3\n"), environ={})


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "absent.toml", environ={})
    assert isinstance(info.value, SignalpostError)
    assert "absent.toml" in str(info.value)


# ----------------------------------------------------------------------------------- env


@pytest.mark.parametrize(
    ("name", "raw", "field", "expected"), CONTRACT, ids=[c[0] for c in CONTRACT]
)
def test_each_contract_variable_is_read(name: str, raw: str, field: str, expected: Any) -> None:
    settings = load_settings(environ={name: raw})
    value = getattr(settings, field)
    assert value == expected
    assert type(value) is type(expected)
    assert value != getattr(Settings(), field)  # the test sets something other than the default


@pytest.mark.parametrize(
    ("name", "raw", "field", "expected"), CONTRACT, ids=[c[0] for c in CONTRACT]
)
def test_each_contract_variable_overrides_the_toml_file(
    tmp_path: Path, name: str, raw: str, field: str, expected: Any
) -> None:
    path = write(tmp_path, "[signalpost]\n" + TOML_VALUES)
    from_file = getattr(load_settings(path, environ={}), field)
    assert from_file != expected
    assert getattr(load_settings(path, environ={name: raw}), field) == expected


def test_all_contract_variables_together() -> None:
    settings = load_settings(environ={name: raw for name, raw, _, _ in CONTRACT})
    for _, _, field, expected in CONTRACT:
        assert getattr(settings, field) == expected


def test_every_field_has_its_variable() -> None:
    names = {f.name for f in msgspec.structs.fields(Settings)}
    assert names >= {field for _, _, field, _ in CONTRACT}
    for field in msgspec.structs.fields(Settings):
        assert f"`SIGNALPOST_{field.name.upper()}`" in settings_table()


def test_list_variables_split_on_commas_and_trim_blanks() -> None:
    settings = load_settings(
        environ={"SIGNALPOST_TURN_URLS": " turn:a:3478 , ,turn:b:3478,", "SIGNALPOST_STUN_URLS": ""}
    )
    assert settings.turn_urls == ["turn:a:3478", "turn:b:3478"]
    assert settings.stun_urls == []


def test_an_empty_optional_variable_means_none() -> None:
    assert load_settings(environ={"SIGNALPOST_TURN_SECRET": ""}).turn_secret is None


def test_variables_are_upper_case_only() -> None:
    assert load_settings(environ={"signalpost_room_capacity": "7"}).room_capacity == 2


def test_explicit_overrides_beat_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "room_capacity = 3\nhello_timeout = 4\n")
    environ = {"SIGNALPOST_ROOM_CAPACITY": "5", "SIGNALPOST_HELLO_TIMEOUT": "6"}
    settings = load_settings(path, environ=environ, room_capacity=10, hello_timeout=None)
    assert settings.room_capacity == 10
    assert settings.hello_timeout == 6.0  # None means "not given on the command line"


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("SIGNALPOST_TURN_TTL", "an hour"),
        ("SIGNALPOST_TURN_TTL", "1.5"),
        ("SIGNALPOST_ROOM_CAPACITY", "two"),
        ("SIGNALPOST_ROOM_CAPACITY", ""),
        ("SIGNALPOST_RESUME_WINDOW", "30s"),
        ("SIGNALPOST_HELLO_TIMEOUT", "soon"),
        ("SIGNALPOST_MAX_FRAME", "64KiB"),
        ("SIGNALPOST_MAX_FRAME", "1e3x"),
        ("SIGNALPOST_DEV_TOKENS", "maybe"),
    ],
)
def test_an_invalid_variable_is_a_config_error(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={name: raw})
    assert name.removeprefix("SIGNALPOST_").lower() in str(info.value)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("SIGNALPOST_ROOM_CAPACITY", "0"),
        ("SIGNALPOST_ROOM_CAPACITY", "-1"),
        ("SIGNALPOST_MAX_FRAME", "0"),
        ("SIGNALPOST_MAX_FRAME", "-5"),
        ("SIGNALPOST_TURN_TTL", "-60"),
        ("SIGNALPOST_TURN_TTL", "0"),
        ("SIGNALPOST_RESUME_WINDOW", "-3"),
        ("SIGNALPOST_RESUME_WINDOW", "nan"),
        ("SIGNALPOST_HELLO_TIMEOUT", "-1"),
        ("SIGNALPOST_HELLO_TIMEOUT", "nan"),
        ("SIGNALPOST_JWT_SECRET", ""),
    ],
)
def test_an_out_of_range_variable_is_a_config_error(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={name: raw})
    assert name.removeprefix("SIGNALPOST_").lower() in str(info.value)


@pytest.mark.parametrize(
    ("bind", "advertise_host", "dialled"),
    [
        ("tcp://0.0.0.0:5555", "10.0.0.21", "tcp://10.0.0.21:5555"),
        ("tcp://*:5555", "broker-1.internal", "tcp://broker-1.internal:5555"),
        ("tcp://[::]:5555", "fd00::21", "tcp://[fd00::21]:5555"),
        ("tcp://0.0.0.0:5555", None, "tcp://127.0.0.1:5555"),  # host is loopback by default
        ("tcp://10.0.0.5:5555", "10.0.0.21", "tcp://10.0.0.5:5555"),  # an address: as is
        ("tcp://broker:5555", "10.0.0.21", "tcp://broker:5555"),
        ("ipc:///run/signalpost/broker", "10.0.0.21", "ipc:///run/signalpost/broker"),
    ],
)
def test_an_endpoint_is_advertised_as_other_nodes_dial_it(
    bind: str, advertise_host: str | None, dialled: str
) -> None:
    settings = Settings(advertise_host=advertise_host)
    assert settings.dialable(bind) == dialled
