"""tests/binaries.py: a missing program or optional package skips a test, and fails it in CI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.binaries import INSTALL, in_ci, require_binary, require_module

NO_SUCH_PROGRAM = "signalpost-no-such-program"
NO_SUCH_MODULE = "signalpost_no_such_module"


@pytest.fixture
def empty_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """PATH holds one empty directory: no program is found, whatever this machine has."""
    monkeypatch.setenv("PATH", str(tmp_path))


@pytest.mark.parametrize("value", ["true", "1", "yes", "TRUE"])
def test_in_ci_a_missing_program_fails(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=f"{NO_SUCH_PROGRAM} is not installed"):
        require_binary(NO_SUCH_PROGRAM)


@pytest.mark.parametrize("value", [None, "", "false", "0", "no"])
def test_outside_ci_a_missing_program_skips(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match=f"{NO_SUCH_PROGRAM} is not installed"):
        require_binary(NO_SUCH_PROGRAM)


@pytest.mark.usefixtures("empty_path")
@pytest.mark.parametrize("program", sorted(INSTALL))
def test_the_message_names_what_to_install(monkeypatch: pytest.MonkeyPatch, program: str) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception) as failed:
        require_binary(program)
    assert INSTALL[program] in str(failed.value)
    assert "in CI that is a failure" in str(failed.value)


def test_the_first_alternative_found_is_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    program = tmp_path / "chromium-browser"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    assert require_binary("chromium", "chromium-browser") == str(program)


@pytest.mark.usefixtures("empty_path")
def test_no_alternative_found_names_them_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="chromium or chromium-browser"):
        require_binary("chromium", "chromium-browser")


def test_a_missing_module_fails_in_ci_and_skips_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{NO_SUCH_MODULE} is not installed"):
        require_module(NO_SUCH_MODULE, "pip install it")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match=r"\(pip install it\)"):
        require_module(NO_SUCH_MODULE, "pip install it")


def test_what_is_there_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert require_module("os.path", "-") is os.path
    assert Path(require_binary("sh")).name == "sh"
