"""The chaos checker: a real local cluster under random faults, and a judge of what clients saw.

    checker.py   the journal (what every client sent, received, and when its connections
                 opened and closed) and ``check``, a pure function that finds every
                 violation of "an acknowledged signal is delivered exactly once, in order"
    workload.py  ``ChaosClient``: a raw-WebSocket client that joins rooms, sends numbered
                 acked signals, resumes on the other edge, and writes everything to the journal
    faults.py    ``ChaosCluster`` (``signalpost cluster`` as processes) and the fault
                 injectors: kill -9, SIGSTOP, TCP resets (``ss -K``), Consul restarts, drops
    harness.py   the run (start, joins, faults, settle, markers, judge, report) and its CLI:
                 ``python -m tests.chaos.harness --seed N --seconds 60``

See docs/reliability.md, "The chaos checker".
"""
