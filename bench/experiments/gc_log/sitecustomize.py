"""Experiment only (bench/experiments/cluster_latency.py --gc-log): every cyclic GC
collection of 0.5 ms or more is appended to ``/tmp/gclog.<pid>`` (wall time, generation,
milliseconds) as it ends. Put on PYTHONPATH, this runs at interpreter start-up."""

import gc
import os
import sys
import time

_started = [0.0]
_out = open(f"/tmp/gclog.{os.getpid()}", "a")  # noqa: SIM115 (lives as long as the process)
_out.write(" ".join(sys.argv[:4]) + "\n")
_out.flush()


def _timed(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    took = (time.perf_counter() - _started[0]) * 1000.0
    if took >= 0.5:
        _out.write(f"{time.time():.3f} gen{info['generation']} {took:.2f}ms\n")
        _out.flush()


gc.callbacks.append(_timed)
