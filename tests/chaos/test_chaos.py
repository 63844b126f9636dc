"""A short seeded chaos run (about a minute): no acked signal lost, doubled or reordered.

The seed is random unless ``SIGNALPOST_CHAOS_SEED`` is set, and printed at the start and
in the failure message: ``python -m tests.chaos.harness --seed N --seconds 30`` replays
the same rooms, clients and faults. ``SIGNALPOST_CHAOS_SECONDS`` sets the fault time.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosConfig, run

pytestmark = [pytest.mark.cluster, pytest.mark.consul, pytest.mark.timeout(240)]


async def test_acknowledged_signals_survive_random_faults() -> None:
    if shutil.which("consul") is None or shutil.which("ss") is None:
        pytest.skip("needs consul and ss (scripts/setup.sh installs consul)")
    seed = int(os.environ.get("SIGNALPOST_CHAOS_SEED") or random.SystemRandom().randrange(10**6))
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
