"""Experiment only (bench.systems "dev-gc"): a server process with a lazier cyclic GC.

Put on PYTHONPATH, this runs at interpreter start-up. The young generation is collected
every 50,000 net allocations instead of 700, and a full collection needs 100 (not 10)
middle ones, so the long-lived room histories are scanned far less often. See
docs/performance.md, "Profile".
"""

import gc

gc.set_threshold(50_000, 20, 100)
