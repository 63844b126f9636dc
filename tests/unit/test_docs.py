"""The docs stay true: generated tables, protocol names, example frames, files, links."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import msgspec
import pytest

from signalpost.config import load_settings, settings_table
from signalpost.errors import CloseCode, ErrorCode
from signalpost.wire import ClientMessage, _ServerFrame, decode_client

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PROTOCOL = (DOCS / "protocol.md").read_text()

CLIENT_TYPES = {cls.__struct_config__.tag for cls in typing.get_args(ClientMessage)}
SERVER_FRAMES = _ServerFrame.__subclasses__()
SERVER_TYPES = {cls.__struct_config__.tag for cls in SERVER_FRAMES}


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def _json_values(block: str) -> list[tuple[str, dict[str, Any]]]:
    """``(direction, frame)`` for every JSON object in a block; direction ``>``, ``<`` or ``""``."""
    decoder = json.JSONDecoder()
    found = []
    text = block
    while text.strip():
        text = text.lstrip()
        direction = ""
        if text[:1] in "<>":
            direction, text = text[0], text[1:].lstrip()
        value, end = decoder.raw_decode(text)
        assert isinstance(value, dict) and "type" in value, value
        found.append((direction, value))
        text = text[end:]
    return found


def test_the_settings_table_is_generated_from_the_code() -> None:
    text = (DOCS / "configuration.md").read_text()
    match = re.search(
        r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->", text, re.S
    )
    assert match, "docs/configuration.md lost its settings-table markers"
    assert match.group(1) == settings_table(), "regenerate with signalpost.config.settings_table()"


@pytest.mark.parametrize("block", _blocks((DOCS / "configuration.md").read_text(), "toml"))
def test_every_example_settings_file_loads(block: str, tmp_path: Path) -> None:
    path = tmp_path / "signalpost.toml"
    path.write_text(block)
    load_settings(path, environ={})


@pytest.mark.parametrize("name", sorted(CLIENT_TYPES | SERVER_TYPES))
def test_every_frame_type_is_documented(name: str) -> None:
    assert f'"type": "{name}"' in PROTOCOL, f"docs/protocol.md shows no {name!r} frame"


@pytest.mark.parametrize("code", [c.value for c in ErrorCode])
def test_every_error_code_is_documented(code: str) -> None:
    assert f"| `{code}` |" in PROTOCOL


@pytest.mark.parametrize("code", [c.value for c in CloseCode])
def test_every_close_code_is_documented(code: int) -> None:
    assert f"| {code} |" in PROTOCOL


def test_every_example_frame_is_valid() -> None:
    server_decoder = msgspec.json.Decoder(typing.Union[tuple(SERVER_FRAMES)])  # noqa: UP007
    frames = [frame for block in _blocks(PROTOCOL, "json") for frame in _json_values(block)]
    assert len(frames) > 30
    for direction, frame in frames:
        kind = frame["type"]
        from_client = direction == ">" or (
            direction == "" and kind in CLIENT_TYPES and not _looks_served(frame)
        )
        if from_client:
            decode_client(json.dumps(frame))  # raises on anything the edge would refuse
        else:
            assert kind in SERVER_TYPES, frame
            server_decoder.decode(json.dumps(frame))


def _looks_served(frame: dict[str, Any]) -> bool:
    """A ``signal`` or ``ice-servers`` frame as the server sends it."""
    return "from" in frame or "ice_servers" in frame


def _links(path: Path) -> list[str]:
    return [
        target
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text())
        if not re.match(r"[a-z]+:", target) and not target.startswith("#")
    ]


DOC_FILES = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted(ROOT.glob("*/README.md"))]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(path: Path) -> None:
    for target in _links(path):
        resolved = (path.parent / target.split("#", 1)[0]).resolve()
        assert resolved.exists(), f"{path.relative_to(ROOT)} links to missing {target}"


def test_files_named_in_the_architecture_exist() -> None:
    text = (DOCS / "architecture.md").read_text()
    for name in set(
        re.findall(r"`((?:signalpost|edge|broker|presence)/[\w/.]+\.(?:py|js))`", text)
    ):
        assert (ROOT / name).exists(), name
