"""What the cluster edges' session core (``edge.core.EdgeCore``, lossy) spends per relayed
signal, in process: the sender's edge numbers the request (``room_order``), keeps it for
resends (``await_answer``) and takes the owner's answer (``reply``); the receiver's edge
checks the owner's term (``stale``) and admits the delivery (``admit``); every tenth
message a confirm tick (``tick``). No sockets, so the figures hold still on a shared
machine: Python calls per message (cProfile) and ns per message (best of the rounds)::

    PYTHONPATH=<tree> .venv/bin/python -m bench.experiments.edge_core_cost

Instructions per message: the difference between two runs under callgrind, e.g.
``valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m
bench.experiments.edge_core_cost --count 20000`` and the same with ``--count 0``
(``bench/experiments/edge_core_cost.sh``).
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

from edge.core import EdgeCore, SessionState
from edge.delivery import Position
from signalpost.wire import Deliver, Reply, SignalCmd

N = 20_000


def run(n: int) -> float:
    sender_core: EdgeCore[SessionState] = EdgeCore("edge-1", lossy=True)
    receiver_core: EdgeCore[SessionState] = EdgeCore("edge-2", lossy=True)
    a = SessionState(session="sa", conn="ca")
    b = SessionState(session="sb", conn="cb")
    sender_core.sessions["sa"] = a
    receiver_core.sessions["sb"] = b
    b.positions["room"] = Position("ep", 0)
    data = b'{"t":1.0,"candidate":"' + b"x" * 180 + b'"}'
    now = 1000.0
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        # the sender's edge (``EdgeServer._dispatch``)
        seq = a.seq = a.seq + 1
        rseq, rbase = sender_core.room_order(a, "room")
        command = SignalCmd("sa", "ca", "edge-1", seq, i, "room", "sb", b"{}", data, rseq, rbase)
        sender_core.await_answer(a, seq, command, now)
        # the receiver's edge (``EdgeServer.receive``): the delivery
        deliver = Deliver(["sb"], data, "room", i, i - 1, 7, "ep")
        if deliver.term != receiver_core.terms.get("room"):
            receiver_core.stale("room", deliver.term)
        receiver_core.admit(b, deliver)
        # the sender's edge: the answer
        sender_core.reply(Reply("sa", "ca", seq, b"ack", True, "", 0, "room", 7))
        if i % 10 == 0:
            now += 0.01
            receiver_core.tick(now)
            sender_core.tick(now)
            receiver_core.take()
            sender_core.take()
    return (time.perf_counter() - t0) / n


def main() -> None:
    if len(sys.argv) > 1:  # under callgrind: ``--count N`` runs N messages and nothing else
        run(int(sys.argv[2]))
        return
    profile = cProfile.Profile()
    profile.enable()
    run(2000)
    profile.disable()
    calls = sum(v[1] for v in pstats.Stats(profile).stats.values())  # type: ignore[attr-defined]
    best = min(run(N) for _ in range(7))
    print(f"python calls per message {calls / 2000:.1f}  ns per message {best * 1e9:.0f}")


if __name__ == "__main__":
    main()
