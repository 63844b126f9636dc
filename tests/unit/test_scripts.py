"""The shell scripts touch no process they did not start.

``scripts/setup.sh`` once ran ``pkill -x turnserver`` after installing coturn: it stopped
every turnserver on the machine, a user's own coturn included. A script may stop what it
started (a pid it holds, a service its own install just started, through that service's
init system), never processes found by name.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPTS = sorted(
    path
    for pattern in ("scripts/*.sh", "bench/*.sh", "bench/experiments/*.sh", "load/*.sh",
                    "compose/*.sh", ".ci/run")
    for path in ROOT.glob(pattern)
)  # fmt: skip
#: Ways to find processes by name (and so to stop ones this script did not start).
BY_NAME = re.compile(r"\b(pkill|killall|pgrep|pidof|fuser)\b|\bps\b[^\n|]*\|[^\n]*\bkill\b")


def test_the_scripts_are_found() -> None:
    assert ROOT / "scripts" / "setup.sh" in SCRIPTS and ROOT / ".ci" / "run" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_script_stops_processes_by_name(script: Path) -> None:
    for number, line in enumerate(script.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]  # (comments may name them)
        assert not BY_NAME.search(code), f"{script.name}:{number}: {line.strip()}"
