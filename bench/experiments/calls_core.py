"""RoomTable CPU per call in process: dev-like (``confirming=False``) or, with ``lossy``,
cluster-like (confirmations, ``rseq``). The calls workload's requests: two joins, an offer
(4 KB) and an answer (3 KB), 12 candidates each way, two leaves; 32 slots of reused
sessions, so each session's reply records reach their bound.

    PYTHONPATH=<tree> .venv/bin/python bench/experiments/calls_core.py [lossy] [tickets]

``tickets``: the table checks seat tickets (a broker with node keys), as a cluster's does.
"""

import itertools
import sys
import time

from broker.rooms import RoomTable
from signalpost.wire import JoinCmd, LeaveCmd, SignalCmd, peer_object, sender_object

OFFER = b'{"type":"offer","sdp":"' + b"x" * 4000 + b'"}'
ANSWER = b'{"type":"answer","sdp":"' + b"y" * 3000 + b'"}'
CAND = b'{"candidate":"' + b"c" * 180 + b'"}'


def run(calls=3000, slots=32, lossy=False, tickets=False):
    counter = itertools.count()
    kw = dict(confirming=lossy) if "confirming" in RoomTable.__init__.__code__.co_varnames else {}
    t = RoomTable(
        capacity=2,
        resume_window=30.0,
        history_max_events=1024,
        history_max_age=120.0,
        new_epoch=lambda: f"e{next(counter)}",
        **kw,
    )
    if tickets:
        from signalpost.tickets import SeatTickets

        t.tickets = SeatTickets("bench-ticket-secret-0123456789abcdef")
    sess = [
        (
            f"s{i}",
            f"c{i}",
            peer_object(f"s{i}", f"u{i}", None, None),
            sender_object(f"s{i}", f"u{i}"),
        )
        for i in range(2 * slots)
    ]
    ids = [itertools.count(1) for _ in sess]
    seqs = [itertools.count(1) for _ in sess]
    rseqs = {}

    def order(i, room):
        if not lossy:
            return ()
        k = (i, room)
        r = rseqs[k] = rseqs.get(k, 0) + 1
        return (r, r)

    h = t.handle
    cpu = 0.0
    for c in range(calls):
        slot = c % slots
        a, b = 2 * slot, 2 * slot + 1
        room = f"call{c}"
        cmds = []
        for i in (a, b):
            s, conn, peer, _ = sess[i]
            cmds.append(
                JoinCmd(s, conn, "edge", next(seqs[i]), next(ids[i]), room, peer, *order(i, room))
            )
        for i, j, sdp in ((a, b, OFFER), (b, a, ANSWER)):
            s, conn, _, sender = sess[i]
            cmds.append(
                SignalCmd(
                    s,
                    conn,
                    "edge",
                    next(seqs[i]),
                    next(ids[i]),
                    room,
                    sess[j][0],
                    sender,
                    sdp,
                    *order(i, room),
                )
            )
            for _ in range(12):
                cmds.append(
                    SignalCmd(
                        s,
                        conn,
                        "edge",
                        next(seqs[i]),
                        next(ids[i]),
                        room,
                        sess[j][0],
                        sender,
                        CAND,
                        *order(i, room),
                    )
                )
        for i in (a, b):
            s, conn, _, _ = sess[i]
            cmds.append(
                LeaveCmd(s, conn, "edge", next(seqs[i]), next(ids[i]), room, *order(i, room))
            )
        t0 = time.process_time()
        for cmd in cmds:
            h(cmd, 1.0 + c * 0.001)
        cpu += time.process_time() - t0
    return cpu / calls * 1e6


if __name__ == "__main__":
    lossy = "lossy" in sys.argv
    rs = [run(lossy=lossy, tickets="tickets" in sys.argv) for _ in range(5)]
    print("us/call", " ".join(f"{r:.1f}" for r in rs), "min", f"{min(rs):.1f}")
