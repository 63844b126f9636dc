"""A short seeded chaos run (about a minute): no acked signal lost, doubled or reordered.

The seed is fixed (``DEFAULT_SEED``: broker pauses and kills, link resets, client drops
and a Consul restart in its first 30 s) unless ``SIGNALPOST_CHAOS_SEED`` is set (``random``
draws one), and printed at the start and in the failure message:
``python -m tests.chaos.harness --seed N --seconds 30`` replays the same rooms, clients and
faults (a real cluster's interleaving still varies). ``SIGNALPOST_CHAOS_SECONDS`` sets the
fault time. Long runs with random seeds: docs/reliability.md, "The chaos checker".
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.binaries import require_binary
from tests.chaos.harness import ChaosConfig, run

pytestmark = [pytest.mark.cluster, pytest.mark.consul, pytest.mark.timeout(240)]

#: The seed of the README's test command (see the module docstring).
DEFAULT_SEED = 21


async def test_acknowledged_signals_survive_random_faults() -> None:
    require_binary("consul")
    require_binary("ss")
    chosen = os.environ.get("SIGNALPOST_CHAOS_SEED") or str(DEFAULT_SEED)
    seed = random.SystemRandom().randrange(10**6) if chosen == "random" else int(chosen)
    seconds = float(os.environ.get("SIGNALPOST_CHAOS_SECONDS", "30"))
    # Not tmp_path: pytest sessions running beside this one prune old numbered directories.
    workdir = Path(tempfile.mkdtemp(prefix="signalpost-chaos-"))
    config = ChaosConfig(seed=seed, seconds=seconds, workdir=workdir, marker_timeout=10.0)
    report = await run(config)
    if report.ok:
        shutil.rmtree(workdir, ignore_errors=True)  # kept on failure: node logs, report.txt
    assert report.journal.faults, f"seed {seed}: no fault was injected"
    assert report.ok, (
        f"chaos seed {seed}: {len(report.verdict.violations)} violations "
        f"{dict(report.verdict.by_kind())}; replay: python -m tests.chaos.harness "
        f"--seed {seed} --seconds {seconds:g}\n{report.render(show=2)}"
    )
