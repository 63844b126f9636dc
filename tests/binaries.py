"""The programs and optional Python packages the test tiers need, and what a missing one means.

Outside CI a missing one skips the tests that need it, with the package to install in the
reason: a laptop without Chromium still runs every other tier. In CI (``CI`` set, as CI
services set it) it fails them: a green CI run must mean every tier ran, not that some
quietly skipped. Every test that needs a program or an optional package asks here.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType
from typing import Final, NoReturn

import pytest

#: Program -> how to install it (Debian), for the message of a missing one.
INSTALL: Final = {
    "consul": "scripts/setup.sh installs it, from Debian bullseye",
    "turnserver": "apt-get install coturn",
    "chromium": "apt-get install chromium",
    "chromium-browser": "apt-get install chromium",
    "ss": "apt-get install iproute2",
    "node": "apt-get install nodejs",
    "npm": "apt-get install npm",
    "redis-server": "apt-get install redis-server",
}

#: ``CI`` values that mean "not CI" (some setups export CI=false locally).
_NOT_CI: Final = frozenset({"", "0", "false", "no"})


def in_ci() -> bool:
    """Whether this run is CI's: ``CI`` is set to anything but empty, 0, false or no."""
    return os.environ.get("CI", "").strip().lower() not in _NOT_CI


def missing(what: str, install: str) -> NoReturn:
    """Skip the calling test (or module), or fail it in CI: ``what`` is not installed."""
    message = f"{what} is not installed ({install})"
    if in_ci():
        pytest.fail(f"{message}; in CI that is a failure, not a skip", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_binary(*names: str) -> str:
    """The path of the first of ``names`` found on PATH (alternative names of one program).

    When none is there, the test skips, or fails in CI.
    """
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    missing(" or ".join(names), INSTALL.get(names[0], f"install {names[0]}"))


def require_module(name: str, install: str) -> ModuleType:
    """Import the optional package module ``name``; skip (fail in CI) when it is absent."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"Python module {name}", install)
